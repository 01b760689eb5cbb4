//! The two HTTP services of the edge: on HTTPS, a reverse proxy to the upstream that adds
//! HSTS to every response; on plain HTTP, the HTTP-01 answers and a redirect to HTTPS for
//! everything else.

use super::Shared;
use super::listen::{InFlight, Tracked};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Bodies the edge answers with: streamed from the upstream or a short text of our own.
pub(crate) type EdgeBody = Tracked<BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>>;

/// At least a year, as browsers' preload lists ask.
pub const HSTS: &str = "max-age=31536000";
/// The path prefix of HTTP-01 challenges (RFC 8555 §8.3).
pub const ACME_CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

/// Hop-by-hop headers (RFC 9110 §7.6.1), never forwarded either way.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Deadlines towards the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// To open a TCP connection.
    pub connect: Duration,
    /// From sending the request to the response's headers.
    pub response: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            response: Duration::from_secs(60),
        }
    }
}

fn boxed(b: Full<Bytes>) -> BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>> {
    b.map_err(|never| match never {}).boxed()
}

fn text(status: StatusCode, body: &'static str, guard: InFlight) -> Response<EdgeBody> {
    let mut r = Response::new(Tracked::new(
        boxed(Full::new(Bytes::from_static(body.as_bytes()))),
        guard,
    ));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

/// The upstream as configured: `http://host:port` with an optional path prefix.
#[derive(Clone, Debug)]
pub(crate) struct Upstream {
    authority: http::uri::Authority,
    prefix: String,
}

impl Upstream {
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("upstream {url:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "upstream {url:?}: only http:// upstreams are proxied"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("upstream {url:?}: no host"))?;
        if uri.query().is_some() {
            return Err(format!("upstream {url:?}: a query is not allowed"));
        }
        Ok(Self {
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    fn uri_for(&self, req: &Uri) -> Result<Uri, http::Error> {
        let pq = req.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(format!("{}{pq}", self.prefix))
            .build()
    }
}

/// The reverse proxy behind the HTTPS listener.
pub(crate) struct Proxy {
    upstream: Upstream,
    client: Client<HttpConnector, Incoming>,
    timeouts: UpstreamTimeouts,
    auth_failures: Option<Arc<dyn super::AuthFailureHook>>,
}

impl Proxy {
    pub(crate) fn new(
        upstream: Upstream,
        timeouts: UpstreamTimeouts,
        auth_failures: Option<Arc<dyn super::AuthFailureHook>>,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeouts.connect));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(connector);
        Self {
            upstream,
            client,
            timeouts,
            auth_failures,
        }
    }

    /// Forward one request; every answer carries HSTS.
    pub(crate) async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        guard: InFlight,
    ) -> Response<EdgeBody> {
        let mut resp = self.forward(req, peer, guard).await;
        let status = resp.status();
        if (status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
            && let Some(hook) = &self.auth_failures
        {
            hook.auth_failure(peer.ip().to_canonical(), status.as_u16());
        }
        resp.headers_mut().insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static(HSTS),
        );
        resp
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        guard: InFlight,
    ) -> Response<EdgeBody> {
        let (mut parts, body) = req.into_parts();
        let host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let Ok(uri) = self.upstream.uri_for(&parts.uri) else {
            return text(StatusCode::BAD_REQUEST, "bad request target\n", guard);
        };
        strip_hop_by_hop(&mut parts.headers);
        let h = &mut parts.headers;
        h.remove(header::HOST);
        if let Ok(v) = HeaderValue::from_str(self.upstream.authority.as_str()) {
            h.insert(header::HOST, v);
        }
        // We are the first proxy: what a client claims in these is not passed on.
        if let Ok(v) = HeaderValue::from_str(&peer.ip().to_canonical().to_string()) {
            h.insert(HeaderName::from_static("x-forwarded-for"), v);
        }
        h.insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        match host {
            Some(v) => {
                h.insert(HeaderName::from_static("x-forwarded-host"), v);
            }
            None => {
                h.remove("x-forwarded-host");
            }
        }
        parts.uri = uri;
        parts.version = Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, body);
        let resp = match tokio::time::timeout(
            self.timeouts.response,
            self.client.request(upstream_req),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(upstream = %self.upstream.authority, error = %crate::ocsp::error_chain(&e), "upstream request failed");
                return text(
                    StatusCode::BAD_GATEWAY,
                    "bad gateway: the upstream did not answer\n",
                    guard,
                );
            }
            Err(_) => {
                tracing::warn!(upstream = %self.upstream.authority, "upstream response timed out");
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    "gateway timeout: the upstream was too slow\n",
                    guard,
                );
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, Tracked::new(body.map_err(Into::into).boxed(), guard))
    }
}

/// Host names (with an optional port) we are willing to redirect to.
fn redirect_host(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let (host, port) = if s.starts_with('[') {
        let end = s.find(']')?;
        let rest = &s[end + 1..];
        if !rest.is_empty() && !rest.starts_with(':') {
            return None;
        }
        (&s[..=end], rest.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    ok.then_some(host)
}

/// The plain-HTTP listener: HTTP-01 answers, and a redirect to HTTPS for the rest.
pub(crate) fn plain(
    shared: &Shared,
    req: &Request<Incoming>,
    https_port: Option<u16>,
    guard: InFlight,
) -> Response<EdgeBody> {
    let path = req.uri().path();
    if let Some(token) = path.strip_prefix(ACME_CHALLENGE_PREFIX) {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n",
                guard,
            );
        }
        return match shared.challenge_answer(token) {
            Some(answer) => {
                let mut r =
                    Response::new(Tracked::new(boxed(Full::new(Bytes::from(answer))), guard));
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                r
            }
            None => text(StatusCode::NOT_FOUND, "no such challenge\n", guard),
        };
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(redirect_host)
        .map(str::to_string)
        .or_else(|| req.uri().host().map(str::to_string));
    let Some(host) = host else {
        return text(
            StatusCode::BAD_REQUEST,
            "a Host header is required\n",
            guard,
        );
    };
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let location = match https_port {
        Some(p) if p != 443 => format!("https://{host}:{p}{pq}"),
        _ => format!("https://{host}{pq}"),
    };
    let Ok(location) = HeaderValue::from_str(&location) else {
        return text(StatusCode::BAD_REQUEST, "bad request target\n", guard);
    };
    let status = if req.method() == Method::GET || req.method() == Method::HEAD {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut r = text(status, "moved to https\n", guard);
    r.headers_mut().insert(header::LOCATION, location);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_hosts_drop_the_port_and_refuse_odd_characters() {
        let h = |s: &'static str| redirect_host(&HeaderValue::from_static(s)).map(str::to_string);
        assert_eq!(
            h("portal.example.test:80").as_deref(),
            Some("portal.example.test")
        );
        assert_eq!(
            h("portal.example.test").as_deref(),
            Some("portal.example.test")
        );
        assert_eq!(h("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(h("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(h("evil.test/@x"), None);
        assert_eq!(h("a.test:8x"), None);
    }

    #[test]
    fn upstream_urls_are_plain_http_with_an_optional_prefix() {
        let u = Upstream::parse("http://127.0.0.1:8080/app/").unwrap();
        let uri = u.uri_for(&"/x?y=1".parse().unwrap()).unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:8080/app/x?y=1");
        assert!(Upstream::parse("https://127.0.0.1:8443").is_err());
        assert!(Upstream::parse("127.0.0.1:8080").is_err());
    }
}
