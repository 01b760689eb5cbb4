//! The pages in a real browser: headless Chromium driven over WebDriver (chromedriver)
//! enrolls TOTP with a code from oathtool, reaches the dashboard, signs out, and signs in
//! again with a TOTP code. No JavaScript on our pages is needed for any of it.

mod web_common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use web_common::{Server, have, oathtool};
use zonemesh_controller::auth::Role;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("chromedriver");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    task.abort();
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = tempfile::tempdir().unwrap();
        let args = vec![
            "--headless".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-dev-shm-usage".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // The test CA is not in Chromium's store; the chain is checked by the other tests.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let v = call(addr, "POST", "/session", Some(caps)).await;
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("WebDriver session: {v}"))
            .to_string();
        Driver {
            child,
            addr,
            session,
            _profile: profile,
        }
    }

    async fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let v = call(
            self.addr,
            method,
            &format!("/session/{}{}", self.session, path),
            body,
        )
        .await;
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {method} {path}: {v}"
        );
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({"url": url}))).await;
    }

    async fn url(&self) -> String {
        self.cmd("GET", "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Wait (up to 10 s) for the page at a URL ending in `suffix`: a click returns before
    /// the navigation it starts has finished.
    async fn wait_url(&self, suffix: &str) -> bool {
        for _ in 0..100 {
            let ready = self
                .cmd(
                    "POST",
                    "/execute/sync",
                    Some(json!({"script": "return document.readyState", "args": []})),
                )
                .await;
            if self.url().await.ends_with(suffix) && ready == json!("complete") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    /// Wait (up to 10 s) for the page to contain `needle`.
    async fn wait_source(&self, needle: &str) -> bool {
        for _ in 0..100 {
            if self.source().await.contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }

    async fn source(&self) -> String {
        self.cmd("GET", "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn text(&self, css: &str) -> String {
        let e = self.find(css).await;
        self.cmd("GET", &format!("/element/{e}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({})))
            .await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.find(css).await;
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
            .await;
    }

    async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let v = self.cmd("GET", "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    async fn quit(&self) {
        let _ = call(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_signs_in_with_totp_and_sees_the_dashboard() {
    for cmd in ["chromium", "chromedriver", "oathtool"] {
        if !have(cmd) {
            eprintln!(
                "skipped: {cmd} is not installed (apt-get install -y chromium chromium-driver oathtool)"
            );
            return;
        }
    }
    if std::env::var_os("WEB_TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_test_writer()
            .try_init();
    }
    let server = Server::start(|_| {}).await;
    let email = "browser-admin@example.com";
    let password = "a browser typed passphrase ✓";
    server
        .state
        .users()
        .add_user(email, Role::Admin, password)
        .unwrap();
    let base = format!("https://localhost:{}", server.addr.port());
    let shots = std::env::var_os("ZONEMESH_SCREENSHOT_DIR").map(std::path::PathBuf::from);
    let d = Driver::start().await;

    d.goto(&format!("{base}/")).await;
    assert!(d.wait_url("/signin").await, "{}", d.url().await);
    // Our stylesheet loads under the strict CSP.
    let bg = d.cmd("POST", "/execute/sync", Some(json!({"script": "return getComputedStyle(document.querySelector('header')).backgroundColor", "args": []}))).await;
    assert_eq!(bg, json!("rgb(28, 39, 51)"), "stylesheet applied");
    d.type_into("#email", email).await;
    d.type_into("#password", password).await;
    d.click("#signin").await;
    assert!(
        d.wait_url("/enroll").await,
        "admins enroll first: {} {}",
        d.url().await,
        d.source().await
    );
    assert!(d.source().await.contains("<svg"), "QR code shown");
    if let Some(dir) = &shots {
        d.screenshot(&dir.join("enroll.png")).await;
    }
    let secret = d.text("#secret").await;
    d.type_into("#code", &oathtool(&secret, None)).await;
    d.click("#confirm").await;
    assert!(
        d.wait_source("recovery-codes").await,
        "recovery codes shown"
    );
    d.click("#continue").await;
    assert!(d.wait_url("/dashboard").await);
    let page = d.source().await;
    assert!(
        page.contains("Dashboard")
            && page.contains("db-1")
            && page.contains("100.64.1.0/24")
            && page.contains("revoked")
    );
    if let Some(dir) = &shots {
        d.screenshot(&dir.join("dashboard.png")).await;
    }

    // Sign out, sign in again with a TOTP code.
    d.click("#signout").await;
    assert!(d.wait_url("/signin").await);
    d.goto(&format!("{base}/dashboard")).await;
    assert!(d.wait_url("/signin").await, "signed out");
    d.type_into("#email", email).await;
    d.type_into("#password", password).await;
    d.click("#signin").await;
    assert!(d.wait_url("/signin/code").await, "{}", d.url().await);
    d.type_into(
        "#code",
        &oathtool(&secret, Some(SystemTime::now() + Duration::from_secs(30))),
    )
    .await;
    d.click("#verify").await;
    assert!(d.wait_url("/dashboard").await, "{}", d.url().await);
    assert!(d.text("#dashboard-title").await.contains("Dashboard"));
    let cookies = d.cmd("GET", "/cookie", None).await;
    let session = cookies
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "__Host-zm_session")
        .expect("session cookie");
    assert_eq!(
        (
            session["secure"].as_bool(),
            session["httpOnly"].as_bool(),
            session["sameSite"].as_str()
        ),
        (Some(true), Some(true), Some("Strict"))
    );
    d.quit().await;
    drop(d);
    server.stop().await;
}
