//! Headless Chromium driven over WebDriver (chromedriver), blocking, for black-box tests
//! of the controller's pages. The test CA is not in Chromium's store, so certificate errors
//! are accepted here; other tests check the chains.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Why a browser test cannot run here, or `None`.
pub fn skip_reason() -> Option<String> {
    for tool in ["chromium", "chromedriver"] {
        if !crate::have(tool) {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

/// A chromedriver with one Chromium session; both stop on drop.
pub struct Browser {
    child: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
    downloads: PathBuf,
}

fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open: read the head, then Content-Length bytes.
    let mut r = std::io::BufReader::new(s);
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if std::io::BufRead::read_line(&mut r, &mut line)? == 0 {
            bail!("WebDriver closed the connection");
        }
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().context("Content-Length")?;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
}

impl Browser {
    /// Start chromedriver and a headless Chromium session.
    pub fn start() -> Result<Self> {
        let port = crate::cluster::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning chromedriver")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if Instant::now() > deadline {
                bail!("chromedriver did not start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let profile = tempfile::tempdir()?;
        let downloads = profile.path().join("downloads");
        std::fs::create_dir_all(&downloads)?;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.path().display()),
            ], "prefs": {
                "download.default_directory": downloads.display().to_string(),
                "download.prompt_for_download": false,
            }}
        }}});
        let mut me = Self {
            child,
            addr,
            session: String::new(),
            _profile: profile,
            downloads,
        };
        let v = call(addr, "POST", "/session", Some(&caps))?;
        me.session = v["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("WebDriver session: {v}"))?
            .to_string();
        Ok(me)
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let v = call(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body.as_ref(),
        )?;
        if v["value"].get("error").is_some() {
            bail!("WebDriver {method} {path}: {v}");
        }
        Ok(v["value"].clone())
    }

    /// Navigate to `url`.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.cmd("POST", "/url", Some(json!({ "url": url })))
            .map(drop)
    }

    /// The current URL.
    pub fn url(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/url", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// The page's HTML.
    pub fn source(&self) -> Result<String> {
        Ok(self
            .cmd("GET", "/source", None)?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Run a script, returning its value.
    pub fn script(&self, js: &str) -> Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
    }

    fn find_by(&self, using: &str, value: &str) -> Result<String> {
        let v = self.cmd(
            "POST",
            "/element",
            Some(json!({"using": using, "value": value})),
        )?;
        Ok(v[ELEMENT].as_str().context("element id")?.to_string())
    }

    /// Type into the element matching a CSS selector (cleared first).
    pub fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find_by("css selector", css)?;
        self.cmd("POST", &format!("/element/{e}/clear"), Some(json!({})))?;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        )
        .map(drop)
    }

    /// Click the element matching a CSS selector.
    pub fn click(&self, css: &str) -> Result<()> {
        let e = self.find_by("css selector", css)?;
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
            .map(drop)
    }

    /// Click the element matching an XPath expression.
    pub fn click_xpath(&self, xpath: &str) -> Result<()> {
        let e = self.find_by("xpath", xpath)?;
        self.cmd("POST", &format!("/element/{e}/click"), Some(json!({})))
            .map(drop)
    }

    /// Choose `path` in the file input matching a CSS selector.
    pub fn upload(&self, css: &str, path: &Path) -> Result<()> {
        let e = self.find_by("css selector", css)?;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": path.display().to_string() })),
        )
        .map(drop)
    }

    /// Wait for a finished download named `name`; returns its bytes and removes it (so
    /// the next download of the same name is not renamed).
    pub fn take_download(&self, name: &str, within: Duration) -> Result<Vec<u8>> {
        let p = self.downloads.join(name);
        let partial = |d: &Path| {
            std::fs::read_dir(d).is_ok_and(|mut r| {
                r.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".crdownload")))
            })
        };
        let deadline = Instant::now() + within;
        while !p.exists() || partial(&self.downloads) {
            if Instant::now() > deadline {
                bail!(
                    "no download {name} in {} (has {:?})",
                    self.downloads.display(),
                    std::fs::read_dir(&self.downloads)?
                        .filter_map(|e| e.ok().map(|e| e.file_name()))
                        .collect::<Vec<_>>()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let bytes = std::fs::read(&p)?;
        std::fs::remove_file(&p)?;
        Ok(bytes)
    }

    /// Names of the files downloaded so far (and not taken).
    pub fn downloads(&self) -> Result<Vec<String>> {
        Ok(std::fs::read_dir(&self.downloads)?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect())
    }

    /// Wait until the page is loaded at a URL whose path ends in `suffix`.
    pub fn wait_url(&self, suffix: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let ready = self.script("return document.readyState")? == json!("complete");
            let url = self.url()?;
            if ready && url.trim_end_matches('/').ends_with(suffix) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("page never reached *{suffix} (at {url})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The text of the first element matching a CSS selector (`""` when none).
    pub fn text(&self, css: &str) -> Result<String> {
        let css = serde_json::to_string(css)?;
        Ok(self
            .script(&format!(
                "const e = document.querySelector({css}); return e ? e.textContent : '';"
            ))?
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// Wait until an element matches a CSS selector.
    pub fn wait_for(&self, css: &str, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let js = format!(
            "return document.querySelector({}) !== null;",
            serde_json::to_string(css)?
        );
        while self.script(&js)? != json!(true) {
            if Instant::now() > deadline {
                bail!("no {css} on {}: {}", self.url()?, self.source()?);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Sign in at `base` (`https://host:port`) as an admin that has no authenticator yet:
    /// password, then the TOTP set-up with a code from `oathtool`, then the dashboard.
    pub fn sign_in_new_admin(&self, base: &str, email: &str, password: &str) -> Result<()> {
        self.sign_in(base, email, password, "/enroll")?;
        self.enroll_totp()
    }

    /// The password step of signing in at `base`, until the browser is at `lands_on`
    /// (`/enroll` for an admin without an authenticator, `/dashboard` for a portal owner
    /// without one).
    ///
    /// An attempt refused with "Try again" (the controller takes one sign-in per source at a
    /// time, and other tests of a shared lab sign in from the same address) is made again
    /// until 30 s have passed; any other refusal fails at once with the page's words.
    pub fn sign_in(&self, base: &str, email: &str, password: &str, lands_on: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.goto(&format!("{base}/signin"))?;
            self.wait_url("/signin", Duration::from_secs(20))?;
            self.type_into("#email", email)?;
            self.type_into("#password", password)?;
            self.click("#signin")?;
            // The answer: the landing page, or a page under /signin whose #message says why
            // not (the form again, or a notice).
            let answered = loop {
                let ready = self.script("return document.readyState")? == json!("complete");
                let url = self.url()?;
                let path = url.trim_end_matches('/');
                if ready && path.ends_with(lands_on) {
                    return Ok(());
                }
                let message = self.text("#message")?;
                if ready && path.ends_with("/signin") && !message.trim().is_empty() {
                    break message;
                }
                if Instant::now() > deadline {
                    bail!("sign-in of {email} never reached *{lands_on} (at {url})");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            let words = answered.split_whitespace().collect::<Vec<_>>().join(" ");
            if !words.contains("Try again") || Instant::now() > deadline {
                bail!("sign-in of {email} refused: {words}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// On the `/enroll` page: set up TOTP with a code from `oathtool`, past the recovery
    /// codes, to the dashboard.
    pub fn enroll_totp(&self) -> Result<()> {
        let within = Duration::from_secs(20);
        let secret = self.text("#secret")?;
        self.type_into("#code", &totp(&secret)?)?;
        self.click("#confirm")?;
        self.wait_for("#recovery-codes", within)?;
        self.click("#continue")?;
        self.wait_url("/dashboard", within)
    }
}

/// Why a test that signs in (TOTP codes from `oathtool`) cannot run here, if it cannot.
pub fn sign_in_skip_reason() -> Option<String> {
    skip_reason().or_else(|| (!crate::have("oathtool")).then(|| "oathtool not installed".into()))
}

/// The current TOTP code of a base32 `secret`, from `oathtool`.
pub fn totp(secret: &str) -> Result<String> {
    let code = crate::run_ok(Command::new("oathtool").args(["--totp", "-b", secret.trim()]))?;
    Ok(code.trim().to_string())
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
