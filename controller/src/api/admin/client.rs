//! The CLI's side of the admin socket: one request line, one reply line, within a deadline
//! and a size limit.

use super::proto::{AdminRequest, AdminResponse};
use anyhow::{Result, bail};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// Connect, send and receive the whole reply within this (every admin command is quick:
/// the slowest, `ca sign-csr` and `ca issue-tls`, is one RSA signature or key).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest reply accepted (a full audit log or node list fits many times over).
pub const MAX_REPLY: usize = 16 * 1024 * 1024;

/// Send one command to the controller serving `data_dir`; `Ok(None)` when none is listening.
pub async fn call(data_dir: &Path, req: &AdminRequest) -> Result<Option<AdminResponse>> {
    call_socket(&super::socket_path(data_dir), req, CALL_TIMEOUT, MAX_REPLY).await
}

/// [`call`] on an explicit socket, deadline and reply limit.
pub async fn call_socket(
    path: &Path,
    req: &AdminRequest,
    timeout: Duration,
    max_reply: usize,
) -> Result<Option<AdminResponse>> {
    match tokio::time::timeout(timeout, exchange(path, req, max_reply)).await {
        Ok(r) => r,
        Err(_) => bail!(
            "the controller at {} did not answer within {}s",
            path.display(),
            timeout.as_secs_f32()
        ),
    }
}

async fn exchange(
    path: &Path,
    req: &AdminRequest,
    max_reply: usize,
) -> Result<Option<AdminResponse>> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => bail!("cannot reach the controller at {}: {e}", path.display()),
    };
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut reply = Vec::new();
    // One byte past the limit tells a reply that is too large from one that just fits.
    let mut reader = BufReader::new(r).take(max_reply as u64 + 1);
    reader.read_until(b'\n', &mut reply).await?;
    if reply.last() != Some(&b'\n') {
        if reply.len() > max_reply {
            bail!(
                "the controller's reply is larger than {} bytes; refusing it",
                max_reply
            );
        }
        bail!("the controller closed the connection without a complete reply");
    }
    match serde_json::from_slice(&reply) {
        Ok(r) => Ok(Some(r)),
        Err(e) => bail!("bad reply from the controller: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn a_server_that_never_answers_fails_within_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        // Accepts and reads, never writes.
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 1024];
            loop {
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    break;
                }
            }
        });
        let started = std::time::Instant::now();
        let err = call_socket(
            &path,
            &AdminRequest::ZoneList,
            Duration::from_millis(300),
            1024,
        )
        .await
        .unwrap_err()
        .to_string();
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(err.contains("did not answer within 0.3s"), "{err}");
        server.abort();
    }

    #[tokio::test]
    async fn a_reply_over_the_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 1024];
            let _ = s.read(&mut buf).await;
            // A valid reply, just too long, and no end in sight.
            let big = format!("{{\"ok\":false,\"error\":\"{}\"}}\n", "x".repeat(64 * 1024));
            let _ = s.write_all(big.as_bytes()).await;
        });
        let err = call_socket(
            &path,
            &AdminRequest::ZoneList,
            Duration::from_secs(10),
            4096,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("larger than 4096 bytes"), "{err}");
    }

    #[tokio::test]
    async fn no_socket_means_no_controller() {
        let dir = tempfile::tempdir().unwrap();
        let r = call_socket(
            &dir.path().join("admin.sock"),
            &AdminRequest::ZoneList,
            Duration::from_secs(1),
            1024,
        )
        .await
        .unwrap();
        assert!(r.is_none());
    }
}
