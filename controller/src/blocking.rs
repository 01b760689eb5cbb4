//! The one way the controller runs blocking work (RSA signatures, Argon2, sled flushes,
//! chain checks) from async code: on tokio's blocking pool, never on an async worker.

/// A blocking task that did not finish: it panicked or the runtime shut down under it.
#[derive(Debug, thiserror::Error)]
#[error("blocking task failed: {0}")]
pub struct BlockingError(#[from] pub tokio::task::JoinError);

/// Run `f` on the blocking pool and wait for it. A panic or cancellation comes back as
/// [`BlockingError`] with its cause, convertible into the caller's own error type.
pub async fn run<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<BlockingError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(E::from(BlockingError(e))),
    }
}

/// Run an infallible `f` on the blocking pool and wait for it.
pub async fn run_infallible<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BlockingError> {
    tokio::task::spawn_blocking(f).await.map_err(BlockingError)
}
