//! Shared harness of the web tests: a CA, the real router served over real TLS on a
//! loopback port, a small HTTPS client that can pick its source address, and fakes for
//! the dashboard and the block sink.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use zonemesh_ca::{Ca, CaMaterial, TlsNames, TlsPolicy};
use zonemesh_controller::audit::AuditLog;
use zonemesh_controller::auth::{Pepper, SecuritySink, WebConfig};
use zonemesh_controller::web::{
    self, CertSource, DashboardSource, IssuedTls, NodeRow, WebState, ZoneRow,
};

/// One CA for the whole test binary (RSA-4096 generation is slow).
pub fn ca() -> Arc<Ca> {
    static CA: OnceLock<Arc<Ca>> = OnceLock::new();
    CA.get_or_init(|| {
        let m = CaMaterial::generate(
            "test.zonemesh.internal",
            SystemTime::now() - Duration::from_secs(3600),
            |_| {},
        )
        .expect("CA");
        Arc::new(Ca::from_material(&m).expect("CA"))
    })
    .clone()
}

/// Issue the listener's certificate for localhost / 127.0.0.1, as the controller does.
pub fn issue(now: SystemTime, lifetime: Duration) -> IssuedTls {
    let names = TlsNames {
        dns: vec!["localhost".into()],
        ips: vec!["127.0.0.1".parse().unwrap()],
    };
    web::ca_issuer(ca(), TlsPolicy::default(), names, Some(lifetime))(now).expect("issue")
}

/// Records every block.
#[derive(Default)]
pub struct RecordingSink {
    pub blocks: Mutex<Vec<(IpAddr, SystemTime, String)>>,
}

impl SecuritySink for RecordingSink {
    fn source_blocked(&self, ip: IpAddr, until: SystemTime, reason: &str) {
        self.blocks
            .lock()
            .unwrap()
            .push((ip, until, reason.to_string()));
    }
}

/// Two zones, three nodes.
pub struct FakeDashboard;

impl DashboardSource for FakeDashboard {
    fn zones(&self) -> Vec<ZoneRow> {
        vec![
            ZoneRow {
                name: "fra1".into(),
                cidr: "100.64.1.0/24".into(),
                node_count: 2,
            },
            ZoneRow {
                name: "ams2".into(),
                cidr: "100.64.2.0/24".into(),
                node_count: 1,
            },
        ]
    }
    fn nodes(&self) -> Vec<NodeRow> {
        let now = SystemTime::now();
        vec![
            NodeRow {
                zone: "fra1".into(),
                name: "db-1".into(),
                overlay_ip: "100.64.1.10".parse().unwrap(),
                serial: "0a1b2c".into(),
                cert_expiry: now + Duration::from_secs(20 * 86_400),
                revoked: false,
            },
            NodeRow {
                zone: "fra1".into(),
                name: "web-1".into(),
                overlay_ip: "100.64.1.11".parse().unwrap(),
                serial: "0d0e0f".into(),
                cert_expiry: now + Duration::from_secs(86_400),
                revoked: false,
            },
            NodeRow {
                zone: "ams2".into(),
                name: "gw-1".into(),
                overlay_ip: "100.64.2.10".parse().unwrap(),
                serial: "112233".into(),
                cert_expiry: now + Duration::from_secs(10 * 86_400),
                revoked: true,
            },
        ]
    }
}

/// A running admin listener.
pub struct Server {
    pub addr: SocketAddr,
    pub state: WebState,
    pub audit: Arc<AuditLog>,
    pub sink: Arc<RecordingSink>,
    pub certs: Arc<CertSource>,
    pub db: zonemesh_controller::kv::Kv,
    pub dir: tempfile::TempDir,
    pub pepper: Pepper,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Start with the default config changed by `tune`.
    pub async fn start(tune: impl FnOnce(&mut WebConfig)) -> Server {
        Self::start_with_clock(tune, None).await
    }

    /// Start with handlers reading `clock` instead of the system time.
    pub async fn start_with_clock(
        tune: impl FnOnce(&mut WebConfig),
        clock: Option<zonemesh_controller::web::Clock>,
    ) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let db = zonemesh_controller::kv::Kv::sled(&dir.path().join("db")).unwrap();
        let pepper = Pepper::generate(1);
        let mut cfg = WebConfig::new(pepper.clone());
        cfg.max_concurrent_hashes = 2;
        tune(&mut cfg);
        let audit = Arc::new(AuditLog::open(&db).unwrap());
        let sink = Arc::new(RecordingSink::default());
        let state =
            WebState::new(&cfg, audit.clone(), sink.clone(), Arc::new(FakeDashboard)).unwrap();
        let state = match clock {
            Some(c) => state.with_clock(c),
            None => state,
        };
        let now = SystemTime::now();
        let certs = Arc::new(CertSource::new(&issue(now, Duration::from_secs(3600)), now).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let app = web::router(state.clone());
        let task = tokio::spawn(
            web::serve_https(listener, app, certs.clone(), shutdown.clone()).map_ok_unit(),
        );
        Server {
            addr,
            state,
            audit,
            sink,
            certs,
            db,
            dir,
            pepper,
            shutdown,
            task,
        }
    }

    /// A client connecting from `source` (any 127.0.0.0/8 address).
    pub fn client(&self, source: &str) -> Client {
        Client::new(self.addr, source.parse().unwrap())
    }

    /// Stop the listener and wait for it.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }

    /// All bytes under the data directory.
    pub fn data_bytes(&self) -> Vec<(PathBuf, Vec<u8>)> {
        self.db.flush().unwrap();
        let mut out = vec![];
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else {
                    out.push((e.path(), std::fs::read(e.path()).unwrap()));
                }
            }
        }
        out
    }
}

trait MapOkUnit {
    fn map_ok_unit(self) -> impl std::future::Future<Output = ()> + Send;
}

impl<F, E> MapOkUnit for F
where
    F: std::future::Future<Output = Result<(), E>> + Send,
    E: std::fmt::Display,
{
    async fn map_ok_unit(self) {
        if let Err(e) = self.await {
            panic!("serve_https: {e}");
        }
    }
}

/// A response, body as text.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `csrf` hidden field of the page.
    pub fn csrf(&self) -> String {
        let i = self.body.find("name=\"csrf\" value=\"").unwrap_or_else(|| {
            panic!(
                "no csrf field in {} {:?} {}",
                self.status,
                self.location(),
                self.body
            )
        }) + 19;
        self.body[i..].split('"').next().unwrap().to_string()
    }

    pub fn location(&self) -> Option<&str> {
        self.header("location")
    }
}

/// Percent-encode a form value.
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        let mut o = String::new();
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                o.push(b as char);
            } else {
                o.push_str(&format!("%{b:02X}"));
            }
        }
        o
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// A minimal HTTPS client with a cookie jar, trusting the test CA, one connection per request.
pub struct Client {
    server: SocketAddr,
    source: IpAddr,
    pub cookies: HashMap<String, String>,
    /// `Origin` sent with form posts instead of the server's own.
    pub origin: Option<String>,
    tls: TlsConnector,
}

impl Client {
    pub fn new(server: SocketAddr, source: IpAddr) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca().root_der().to_vec()))
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Client {
            server,
            source,
            cookies: HashMap::new(),
            origin: None,
            tls: TlsConnector::from(Arc::new(cfg)),
        }
    }

    /// The leaf certificate the server presents.
    pub async fn peer_leaf(&self) -> Vec<u8> {
        let tcp = self.connect().await;
        let tls = self
            .tls
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
    }

    async fn connect(&self) -> tokio::net::TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(self.source, 0)).unwrap();
        sock.connect(self.server).await.unwrap()
    }

    pub async fn get(&mut self, path: &str) -> Resp {
        self.request("GET", path, None).await
    }

    pub async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Resp {
        self.request("POST", path, Some(form_encode(form))).await
    }

    pub async fn request(&mut self, method: &str, path: &str, body: Option<String>) -> Resp {
        let tcp = self.connect().await;
        let tls = self
            .tls
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("TLS handshake");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        let conn_task = tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("localhost:{}", self.server.port()));
        if !self.cookies.is_empty() {
            let c = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            req = req.header("cookie", c);
        }
        if body.is_some() {
            req = req
                .header("content-type", "application/x-www-form-urlencoded")
                .header(
                    "origin",
                    self.origin
                        .clone()
                        .unwrap_or_else(|| format!("https://localhost:{}", self.server.port())),
                );
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        conn_task.abort();
        for v in headers.get_all("set-cookie") {
            let v = v.to_str().unwrap();
            let (kv, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = kv.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") {
                self.cookies.remove(k);
            } else {
                self.cookies.insert(k.to_string(), val.to_string());
            }
        }
        Resp {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// GET the sign-in page and submit it.
    pub async fn sign_in(&mut self, email: &str, password: &str) -> Resp {
        self.cookies
            .remove(zonemesh_controller::web::SESSION_COOKIE);
        let page = self.get("/signin").await;
        let csrf = page.csrf();
        self.post(
            "/signin",
            &[("csrf", &csrf), ("email", email), ("password", password)],
        )
        .await
    }
}

/// Whether a command exists on PATH.
pub fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `oathtool --totp -b SECRET [-N TIME]`: a TOTP implementation we did not write.
pub fn oathtool(secret_b32: &str, at: Option<SystemTime>) -> String {
    let mut cmd = std::process::Command::new("oathtool");
    cmd.args(["--totp", "-b", secret_b32]);
    if let Some(t) = at {
        let secs = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        cmd.args(["-N", &format!("@{secs}")]);
    }
    let out = cmd.output().expect("oathtool");
    assert!(
        out.status.success(),
        "oathtool: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The base32 secret inside an otpauth:// URI.
pub fn secret_of(uri: &str) -> String {
    let i = uri.find("secret=").expect("secret in URI") + 7;
    uri[i..].split('&').next().unwrap().to_string()
}

/// A clock that stands still until the test moves it.
#[derive(Clone)]
pub struct ManualClock {
    base: SystemTime,
    offset: Arc<Mutex<Duration>>,
}

impl ManualClock {
    pub fn new() -> Self {
        ManualClock {
            base: SystemTime::now(),
            offset: Arc::new(Mutex::new(Duration::ZERO)),
        }
    }

    /// The clock for `Server::start_with_clock`.
    pub fn clock(&self) -> zonemesh_controller::web::Clock {
        let me = self.clone();
        Arc::new(move || me.now())
    }

    pub fn now(&self) -> SystemTime {
        self.base + *self.offset.lock().unwrap()
    }

    pub fn advance(&self, by: Duration) {
        *self.offset.lock().unwrap() += by;
    }
}
