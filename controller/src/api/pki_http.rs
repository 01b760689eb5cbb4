//! HTTP endpoints for relying parties: the CRL and the OCSP responder (RFC 6960 over HTTP).

use crate::authority::Authority;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use std::sync::Arc;
use std::time::SystemTime;

const MAX_OCSP_REQUEST: usize = 16 * 1024;

/// `/crl` (the issuing intermediate's), `/crl/{id}` (any trusted intermediate's, by its
/// `ca show` id), `/ocsp` (POST) and `/ocsp/{base64}` (GET).
pub fn router(auth: Arc<Authority>) -> axum::Router {
    axum::Router::new()
        .route("/crl", get(crl))
        .route("/crl/{id}", get(crl_of))
        .route("/ocsp", post(ocsp_post))
        .route("/ocsp/{*req}", get(ocsp_get))
        .layer(DefaultBodyLimit::max(MAX_OCSP_REQUEST))
        .with_state(auth)
}

async fn crl(State(auth): State<Arc<Authority>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/pkix-crl")],
        auth.crl_der().to_vec(),
    )
        .into_response()
}

async fn crl_of(State(auth): State<Arc<Authority>>, Path(id): Path<String>) -> Response {
    match auth.crl_of(&id) {
        Some(der) => (
            [(header::CONTENT_TYPE, "application/pkix-crl")],
            der.to_vec(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no trusted intermediate by that id").into_response(),
    }
}

fn ocsp_reply(auth: &Authority, der: &[u8]) -> Response {
    let resp = auth.ocsp(der, SystemTime::now());
    ([(header::CONTENT_TYPE, "application/ocsp-response")], resp).into_response()
}

async fn ocsp_post(State(auth): State<Arc<Authority>>, body: Bytes) -> Response {
    let auth2 = auth.clone();
    match crate::blocking::run_infallible(move || ocsp_reply(&auth2, &body)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "OCSP request failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn ocsp_get(State(auth): State<Arc<Authority>>, Path(req): Path<String>) -> Response {
    let cleaned = req
        .replace("%2B", "+")
        .replace("%2F", "/")
        .replace("%3D", "=");
    let Ok(der) = base64::engine::general_purpose::STANDARD.decode(cleaned.trim_start_matches('/'))
    else {
        return (StatusCode::BAD_REQUEST, "OCSP GET request is not base64").into_response();
    };
    if der.len() > MAX_OCSP_REQUEST {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    }
    match crate::blocking::run_infallible(move || ocsp_reply(&auth, &der)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "OCSP request failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Serve a router over plain HTTP until shutdown, with the limits and deadlines of
/// `crate::listen` (a plain `TcpListener` gets the defaults).
pub async fn serve_plain(
    listener: impl Into<crate::listen::GuardedListener>,
    app: axum::Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let mut listener = listener.into();
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (io, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = listener.accept() => c,
        };
        let activity = io.activity();
        let opts = crate::listen::HttpOptions {
            h2_only: false,
            max_concurrent_streams: 16,
            keep_alive: std::time::Duration::from_secs(15),
        };
        let (app, stop) = (app.clone(), shutdown.clone());
        conns.spawn(async move {
            let ext = axum::extract::ConnectInfo(peer);
            if let Err(e) =
                crate::listen::serve_connection(io, app, ext, activity, opts, stop).await
            {
                tracing::debug!(peer = %peer, error = %e, "PKI connection ended with an error");
            }
        });
    }
    drop(listener);
    crate::listen::drain(conns).await;
    Ok(())
}
