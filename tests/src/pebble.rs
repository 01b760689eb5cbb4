//! A local ACME CA for tests: Debian's `pebble` with `pebble-challtestsrv` as its DNS.
//! pebble's HTTPS listener gets a certificate from a mini CA made here with openssl (the
//! package ships none); pebble validates HTTP-01 on `http_port` of whatever address the mock
//! DNS gives for the name (`map_a`). Both listen on loopback only. Every process is killed
//! on drop (and registered with a [`Janitor`](crate::janitor::Janitor) when one is given).

use crate::cluster::free_port;
use crate::janitor::Janitor;
use crate::{openssl, run_ok};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running pebble and its mock DNS.
pub struct Pebble {
    pub dir: PathBuf,
    pub acme_port: u16,
    pub mgmt_port: u16,
    pub dns_port: u16,
    pub dns_mgmt_port: u16,
    /// Trust anchor for pebble's own HTTPS (ACME directory and management API).
    pub https_ca: PathBuf,
    children: Vec<Child>,
}

/// True when the Debian pebble package is installed.
pub fn installed() -> bool {
    crate::have("pebble") && crate::have("pebble-challtestsrv")
}

impl Pebble {
    /// Start pebble in `dir` (created), validating HTTP-01 on port `http_port`.
    pub fn start(dir: &Path, http_port: u16, janitor: Option<&Janitor>) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let p = |n: &str| dir.join(n);
        let s = |n: &str| p(n).to_string_lossy().into_owned();
        run_ok(&mut openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=zonemesh test pebble HTTPS CA",
            "-keyout",
            &s("https-ca.key"),
            "-out",
            &s("https-ca.pem"),
        ]))?;
        run_ok(&mut openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &s("https.key"),
            "-out",
            &s("https.csr"),
        ]))?;
        std::fs::write(
            p("https.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        run_ok(&mut openssl(&[
            "x509",
            "-req",
            "-in",
            &s("https.csr"),
            "-CA",
            &s("https-ca.pem"),
            "-CAkey",
            &s("https-ca.key"),
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &s("https.ext"),
            "-out",
            &s("https.pem"),
        ]))?;
        let (acme_port, mgmt_port, dns_port, dns_mgmt_port) =
            (free_port(), free_port(), free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": s("https.pem"),
            "privateKey": s("https.key"),
            "httpPort": http_port,
            "tlsPort": 5001,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(p("pebble-config.json"), config.to_string())?;
        let mut me = Self {
            dir: dir.to_path_buf(),
            acme_port,
            mgmt_port,
            dns_port,
            dns_mgmt_port,
            https_ca: p("https-ca.pem"),
            children: Vec::new(),
        };
        let log = |n: &str| std::fs::File::create(p(n));
        // The data directory is on the command line so the janitor recognises the process.
        let dns = Command::new("pebble-challtestsrv")
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-management", &format!("127.0.0.1:{dns_mgmt_port}")])
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .env("ZM_LAB", dir)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log("challtestsrv.log")?)
            .stderr(log("challtestsrv.err")?)
            .spawn()
            .context("spawning pebble-challtestsrv")?;
        me.track(dns, janitor)?;
        let pebble = Command::new("pebble")
            .arg("-config")
            .arg(p("pebble-config.json"))
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            // No sleeps before validation, no random nonce rejections, no reuse of an
            // earlier valid authorization: each order really runs its HTTP-01 challenge.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log("pebble.log")?)
            .stderr(log("pebble.err")?)
            .spawn()
            .context("spawning pebble")?;
        me.track(pebble, janitor)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let dns_up = || std::net::TcpStream::connect(("127.0.0.1", dns_mgmt_port)).is_ok();
        while !dns_up() || me.curl(&me.directory_url()).is_err() {
            if Instant::now() > deadline {
                bail!("pebble did not come up:\n{}", me.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    fn track(&mut self, child: Child, janitor: Option<&Janitor>) -> Result<()> {
        if let Some(j) = janitor {
            j.track_pid(child.id())?;
        }
        self.children.push(child);
        Ok(())
    }

    /// The ACME directory URL.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    fn curl(&self, url: &str) -> Result<String> {
        run_ok(
            Command::new("curl")
                .args(["-sSf", "--max-time", "10", "--cacert"])
                .arg(&self.https_ca)
                .arg(url),
        )
    }

    fn dns_post(&self, path: &str, body: &str) -> Result<String> {
        run_ok(Command::new("curl").args([
            "-sSf",
            "--max-time",
            "10",
            "--data",
            body,
            &format!("http://127.0.0.1:{}{path}", self.dns_mgmt_port),
        ]))
    }

    /// Make the mock DNS answer `host` (A) with `addrs` only (`add-a` appends, so the old
    /// answers are cleared first).
    pub fn map_a(&self, host: &str, addrs: &[&str]) -> Result<()> {
        let fqdn = format!("{host}.");
        self.dns_post("/clear-a", &serde_json::json!({ "host": fqdn }).to_string())?;
        let body = serde_json::json!({"host": fqdn, "addresses": addrs});
        self.dns_post("/add-a", &body.to_string()).map(drop)
    }

    /// pebble's issuing root (PEM). It is made anew each time pebble starts.
    pub fn root_pem(&self) -> Result<String> {
        self.curl(&format!("https://127.0.0.1:{}/roots/0", self.mgmt_port))
    }

    /// pebble's current intermediate (PEM).
    pub fn intermediate_pem(&self) -> Result<String> {
        self.curl(&format!(
            "https://127.0.0.1:{}/intermediates/0",
            self.mgmt_port
        ))
    }

    /// `serve` arguments that point the controller at this pebble.
    pub fn serve_args(&self, email: &str) -> Vec<String> {
        vec![
            "--acme-directory".into(),
            self.directory_url(),
            "--acme-root".into(),
            self.https_ca.to_string_lossy().into_owned(),
            "--acme-email".into(),
            email.into(),
        ]
    }

    /// pebble's log (what it validated and why it refused).
    pub fn log(&self) -> String {
        let r = |n: &str| std::fs::read_to_string(self.dir.join(n)).unwrap_or_default();
        format!("{}{}", r("pebble.log"), r("pebble.err"))
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
