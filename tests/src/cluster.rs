//! A running controller for black-box tests: `init`, `serve` on free loopback ports, the
//! admin CLI, and in-process gRPC clients with real (m)TLS. Every spawned process is killed
//! when its guard is dropped.

use crate::{bin, run, run_ok};
use anyhow::{Context, Result, bail};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use zonemesh_agent::control::client;
use zonemesh_proto as pb;

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

/// A controller data directory with its listen addresses and (while serving) its process.
pub struct Controller {
    pub data_dir: PathBuf,
    pub grpc: SocketAddr,
    pub https: SocketAddr,
    pub pki: SocketAddr,
    /// Root SHA-256 fingerprint printed by `init`.
    pub fingerprint: String,
    /// Which controller binary to run (debug by default; the benchmark uses release).
    pub binary: PathBuf,
    /// Run `serve` with this `RLIMIT_NOFILE` (soft and hard), as under a stingy init system.
    pub fd_limit: Option<u64>,
    /// More arguments for `serve` (e.g. `--tls-name`).
    pub serve_args: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Controller {
    /// One password sign-in to the HTTPS side through curl from the loopback address
    /// `source` (cookies in `dir`, the root written to `dir/root.pem` when missing); returns
    /// the HTTP status.
    pub fn curl_sign_in(&self, dir: &Path, source: &str, email: &str, password: &str) -> u16 {
        let root = dir.join("root.pem");
        if !root.exists() {
            let pem = self
                .admin_ok(&["ca", "export", "--root"])
                .expect("ca export --root");
            std::fs::write(&root, pem).expect("write root.pem");
        }
        let jar = dir.join(format!("jar-{source}"));
        let base = format!("https://{}", self.https);
        let curl = |extra: &[&str]| {
            let out = Command::new("curl")
                .args(["-sS", "--max-time", "20", "--interface", source, "--cacert"])
                .arg(dir.join("root.pem"))
                .arg("-c")
                .arg(&jar)
                .arg("-b")
                .arg(&jar)
                .args(extra)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "curl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let page = curl(&[&format!("{base}/signin")]);
        let i = page.find("name=\"csrf\" value=\"").expect("csrf field") + 19;
        let csrf = page[i..].split('"').next().unwrap().to_string();
        let code = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            &format!("Origin: {base}"),
            "--data-urlencode",
            &format!("csrf={csrf}"),
            "--data-urlencode",
            &format!("email={email}"),
            "--data-urlencode",
            &format!("password={password}"),
            &format!("{base}/signin"),
        ]);
        code.trim().parse().unwrap()
    }

    /// `openssl ocsp` against the controller's responder for a node's stored certificate;
    /// the response must verify. Returns everything openssl printed.
    pub fn ocsp_status(&self, state: &Path) -> String {
        self.ocsp_cert_status(state, &state.join("node.crt"))
    }

    /// `openssl ocsp` for any certificate `cert` (PEM) issued by the intermediate in
    /// `state/chain.pem`, trusting `state/ca.crt`; the response must verify.
    pub fn ocsp_cert_status(&self, state: &Path, cert: &Path) -> String {
        let out = crate::openssl(&["ocsp", "-issuer"])
            .arg(state.join("chain.pem"))
            .arg("-cert")
            .arg(cert)
            .args(["-url", &format!("http://{}/ocsp", self.pki)])
            .arg("-CAfile")
            .arg(state.join("ca.crt"))
            .output()
            .expect("running openssl ocsp");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "openssl ocsp failed: {text}");
        assert!(text.contains("Response verify OK"), "{text}");
        text
    }

    /// `init` a new CA in `dir/ctl` (not started yet).
    pub fn init(dir: &Path) -> Result<Self> {
        Self::init_with(dir, bin("zonemesh-controller"))
    }

    /// `init` with an explicit controller binary.
    pub fn init_with(dir: &Path, binary: PathBuf) -> Result<Self> {
        Self::init_args(dir, binary, &[])
    }

    /// `init --store URL` (saved in the data directory, so `serve` uses it too).
    pub fn init_on_store(dir: &Path, store: &str) -> Result<Self> {
        Self::init_args(dir, bin("zonemesh-controller"), &["--store", store])
    }

    /// `init` with an explicit controller binary and further `init` arguments.
    pub fn init_args(dir: &Path, binary: PathBuf, extra: &[&str]) -> Result<Self> {
        let data_dir = dir.join("ctl");
        let out = run_ok(
            Command::new(&binary)
                .arg("init")
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--trust-domain", "corp.test"])
                .args(extra),
        )?;
        let fingerprint = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .context("init printed nothing")?
            .trim()
            .to_string();
        if fingerprint.len() != 64 {
            bail!("init's last line is not a fingerprint: {fingerprint:?}");
        }
        let mut c = Self::existing(dir, data_dir, fingerprint);
        c.binary = binary;
        Ok(c)
    }

    /// A controller over an existing data directory `data_dir` (restored from a backup,
    /// say) whose root has `fingerprint`, on new free ports, logging to `dir`; not started.
    pub fn existing(dir: &Path, data_dir: PathBuf, fingerprint: String) -> Self {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        Self {
            log: dir.join("controller.log"),
            data_dir,
            grpc: addr(free_port()),
            https: addr(free_port()),
            pki: addr(free_port()),
            fingerprint,
            binary: bin("zonemesh-controller"),
            fd_limit: None,
            serve_args: Vec::new(),
            child: None,
            starts: 0,
        }
    }

    /// `init` and `serve`.
    pub fn start_new(dir: &Path) -> Result<Self> {
        let mut c = Self::init(dir)?;
        c.start()?;
        Ok(c)
    }

    /// Start `serve` and wait until the gRPC port and the admin socket answer.
    pub fn start(&mut self) -> Result<()> {
        assert!(self.child.is_none(), "controller already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.fd_limit {
            // prlimit sets the limit on itself and then execs the controller.
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        let child = cmd
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--grpc-listen")
            .arg(self.grpc.to_string())
            .arg("--https-listen")
            .arg(self.https.to_string())
            .arg("--pki-listen")
            .arg(self.pki.to_string())
            .args(&self.serve_args)
            .env(
                "ZONEMESH_LOG",
                std::env::var("ZONEMESH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning zonemesh-controller serve")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "controller exited during start ({status}):\n{}",
                    self.log_text()
                );
            }
            let up = std::net::TcpStream::connect(self.grpc).is_ok()
                && std::net::TcpStream::connect(self.pki).is_ok()
                && self
                    .admin(&["zone", "list", "--json"])
                    .is_ok_and(|o| o.status.success());
            if up {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("controller did not come up:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The controller's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `kill -9`, no chance to flush.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `within`; returns the exit status (or an error on timeout,
    /// after which the process is killed).
    pub fn sigterm(&mut self, within: Duration) -> Result<ExitStatus> {
        let mut c = self.child.take().context("controller is not running")?;
        signal(c.id(), "TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                bail!("controller did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop cleanly and start again on the same ports.
    pub fn restart(&mut self) -> Result<()> {
        let s = self.sigterm(Duration::from_secs(10))?;
        if !s.success() {
            bail!("controller exited with {s} on SIGTERM");
        }
        self.start()
    }

    /// Everything the controller has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An admin command (`zone add ...`), whatever its exit status.
    pub fn admin(&self, args: &[&str]) -> Result<Output> {
        run(Command::new(&self.binary)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir))
    }

    /// An admin command that must succeed; returns stdout.
    pub fn admin_ok(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new(&self.binary)
                .args(args)
                .arg("--data-dir")
                .arg(&self.data_dir),
        )
    }

    /// An admin command that reads `stdin` (a password, say) and must succeed; returns stdout.
    pub fn admin_with_stdin(&self, args: &[&str], stdin: &str) -> String {
        use std::io::Write as _;
        let mut child = Command::new(&self.binary)
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the admin command");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("admin command output");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// A curl session on this controller's HTTPS side from 127.0.0.1, trusting its root
    /// (written to `dir/root.pem` when missing), with the cookie jar `dir/jar-<name>`.
    pub fn web_session(
        &self,
        dir: &Path,
        name: &str,
    ) -> Result<crate::webcurl::CurlSession<'static>> {
        let root = dir.join("root.pem");
        if !root.exists() {
            std::fs::write(&root, self.admin_ok(&["ca", "export", "--root"])?)?;
        }
        Ok(crate::webcurl::CurlSession::new(
            &format!("https://{}", self.https),
            root,
            dir.join(format!("jar-{name}")),
            Box::new(|args: &[String]| run_ok(Command::new("curl").args(args))),
        ))
    }

    /// `zone add NAME --cidr CIDR`.
    pub fn zone_add(&self, name: &str, cidr: &str) -> Result<()> {
        self.admin_ok(&["zone", "add", name, "--cidr", cidr])
            .map(drop)
    }

    /// `token create --zone Z --uses N`; returns the token.
    pub fn token(&self, zone: &str, uses: u32) -> Result<String> {
        let out = self.admin_ok(&[
            "token",
            "create",
            "--zone",
            zone,
            "--uses",
            &uses.to_string(),
        ])?;
        Ok(out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .context("no token printed")?
            .trim()
            .to_string())
    }

    /// `node list --json`.
    pub fn nodes(&self) -> Result<Vec<serde_json::Value>> {
        let out = self.admin_ok(&["node", "list", "--json"])?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Serials of every node certificate the CA has recorded, read from the store while
    /// the controller is stopped (sled allows one process at a time).
    pub fn issued_node_serials(&self) -> Result<Vec<String>> {
        use zonemesh_controller::store::{CertKind, CertRecord, Store};
        assert!(
            self.child.is_none(),
            "stop the controller before opening its store"
        );
        let store = Store::open(&self.data_dir.join("db"))?;
        let mut out = Vec::new();
        for item in store.certs.iter() {
            let (k, v) = item?;
            let rec: CertRecord = zonemesh_controller::store::decode("certs", &v)?;
            if rec.kind == CertKind::Node {
                out.push(String::from_utf8_lossy(&k).into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// The gRPC address as `HOST:PORT`.
    pub fn grpc_addr(&self) -> String {
        self.grpc.to_string()
    }

    /// `zonemesh-agent enroll` into `state_dir`, whatever its exit status.
    pub fn enroll_cli(
        &self,
        token: &str,
        state_dir: &Path,
        name: &str,
        extra: &[&str],
    ) -> Result<Output> {
        run(Command::new(bin("zonemesh-agent"))
            .arg("enroll")
            .args(["--controller", &self.grpc_addr()])
            .args(["--ca-fingerprint", &self.fingerprint])
            .args(["--token", token])
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--name", name])
            .args(extra))
    }

    /// `zonemesh-agent enroll` that must succeed.
    pub fn enroll_ok(&self, token: &str, state_dir: &Path, name: &str) -> Result<()> {
        let out = self.enroll_cli(token, state_dir, name, &[])?;
        if !out.status.success() {
            bail!(
                "enroll {name} failed: {}\ncontroller log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log_text()
            );
        }
        Ok(())
    }
}

impl Controller {
    /// Enroll `name` over gRPC with `token`, the pooled RSA-4096 key `slot` and the
    /// WireGuard key of `slot`; returns its mTLS credentials.
    pub async fn enroll_pooled(&self, token: &str, name: &str, slot: usize) -> NodeCreds {
        let ch = enrollment_channel(&self.grpc_addr(), &self.fingerprint)
            .await
            .unwrap();
        enroll_rpc(ch, token, name, &crate::rsa4096(slot), wg_key(slot as u64))
            .await
            .unwrap()
            .0
    }

    /// Enroll `node` into `zone` with the agent library, into a new state directory `dir`
    /// that already holds the pooled RSA-4096 key `slot` (so enrollment generates none),
    /// announcing `endpoint`.
    pub async fn enroll_agent(
        &self,
        dir: &Path,
        zone: &str,
        node: &str,
        slot: usize,
        endpoint: &str,
    ) -> (
        zonemesh_agent::control::state::StateDir,
        zonemesh_agent::control::state::Identity,
    ) {
        self.enroll_agent_via(dir, zone, node, slot, endpoint, &self.grpc_addr())
            .await
    }

    /// [`Controller::enroll_agent`] with a token of this controller, given the agent's
    /// `--controller` list (`A,B,...`: tried in order, all saved for failover).
    pub async fn enroll_agent_via(
        &self,
        dir: &Path,
        zone: &str,
        node: &str,
        slot: usize,
        endpoint: &str,
        controllers: &str,
    ) -> (
        zonemesh_agent::control::state::StateDir,
        zonemesh_agent::control::state::Identity,
    ) {
        use zonemesh_agent::control::enroll::{EnrollParams, enroll};
        let state = zonemesh_agent::control::state::StateDir::new(dir);
        state.create().unwrap();
        zonemesh_agent::control::state::write_file(
            &state.node_key(),
            zonemesh_ca::to_pem("PRIVATE KEY", &crate::rsa4096(slot).serialize_der()).as_bytes(),
            0o600,
        )
        .unwrap();
        let params = EnrollParams {
            controller: controllers.to_string(),
            ca_fingerprint: self.fingerprint.clone(),
            token: self.token(zone, 1).unwrap(),
            node: node.into(),
            zone: None,
            endpoints: vec![endpoint.into()],
        };
        let id = enroll(&state, &params).await.unwrap();
        (state, id)
    }

    /// [`Controller::enroll_pooled`] with a fresh one-use token for `zone`.
    pub async fn enroll_in_zone(&self, zone: &str, name: &str, slot: usize) -> NodeCreds {
        let token = self.token(zone, 1).unwrap();
        self.enroll_pooled(&token, name, slot).await
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Send a signal (`TERM`, `KILL`, ...) to a process this test started.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

/// A node identity held in memory: key, certificate, chain and root (DER).
#[derive(Clone)]
pub struct NodeCreds {
    pub key_pkcs8: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub chain_der: Vec<Vec<u8>>,
    pub root_der: Vec<u8>,
}

impl NodeCreds {
    /// Read an enrolled agent's state directory.
    pub fn from_state_dir(dir: &Path) -> Result<Self> {
        let s = zonemesh_agent::control::state::StateDir::new(dir);
        Ok(Self {
            key_pkcs8: s.read_node_key()?.to_vec(),
            cert_der: s.read_cert()?,
            chain_der: s.read_chain()?,
            root_der: s.read_ca()?,
        })
    }

    /// Mutual TLS with this identity.
    pub fn tls(&self) -> Result<rustls::ClientConfig> {
        client::mtls_config_from(
            &self.root_der,
            &self.cert_der,
            &self.chain_der,
            &self.key_pkcs8,
        )
    }
}

/// Server-authenticated TLS pinned to `fingerprint`, as an enrolling agent uses.
pub async fn enrollment_channel(addr: &str, fingerprint: &str) -> Result<Channel> {
    client::connect(addr, client::pinned_config(fingerprint)?).await
}

/// A mutual-TLS channel for `creds`.
pub async fn mesh_channel(addr: &str, creds: &NodeCreds) -> Result<Channel> {
    client::connect(addr, creds.tls()?).await
}

/// A fresh mTLS connection with `creds` and a Watch on it: `Ok(true)` when the controller
/// served a first message, `Ok(false)` when it refused (handshake or call), an error
/// when it neither served nor refused within `within`.
pub async fn watch_served(addr: &str, creds: &NodeCreds, within: Duration) -> Result<bool> {
    let attempt = async {
        let ch = mesh_channel(addr, creds).await?;
        let mut s = pb::mesh_client::MeshClient::new(ch)
            .watch(pb::WatchRequest::default())
            .await?
            .into_inner();
        Ok::<_, anyhow::Error>(s.message().await?.is_some())
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok(served)) => Ok(served),
        Ok(Err(_)) => Ok(false),
        Err(_) => bail!("the Watch neither answered nor failed within {within:?}"),
    }
}

/// Enroll over the Enrollment RPC in-process with a given key (fast: no key generation).
pub async fn enroll_rpc(
    channel: Channel,
    token: &str,
    name: &str,
    key: &rcgen::KeyPair,
    wg_public: [u8; 32],
) -> std::result::Result<(NodeCreds, pb::EnrollResponse), tonic::Status> {
    let csr = zonemesh_agent::control::enroll::csr_for(key, name)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let resp = pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            token: token.into(),
            csr_der: csr,
            wg_public_key: wg_public.to_vec(),
            endpoints: vec![],
            node_name: name.into(),
            zone: String::new(),
        })
        .await?
        .into_inner();
    let creds = NodeCreds {
        key_pkcs8: key.serialize_der(),
        cert_der: resp.certificate_der.clone(),
        chain_der: resp.chain_der.clone(),
        root_der: resp.root_der.clone(),
    };
    Ok((creds, resp))
}

/// Renew `creds` (same key `key`, node name `node`) over a fresh connection; the new
/// credentials on success.
pub async fn renew_rpc(
    addr: &str,
    creds: &NodeCreds,
    key: &rcgen::KeyPair,
    node: &str,
) -> Result<NodeCreds> {
    let csr = zonemesh_agent::control::enroll::csr_for(key, node)?;
    let resp = pb::mesh_client::MeshClient::new(mesh_channel(addr, creds).await?)
        .renew(pb::RenewRequest {
            csr_der: csr,
            rotate_key: false,
        })
        .await?
        .into_inner();
    Ok(NodeCreds {
        cert_der: resp.certificate_der,
        chain_der: resp.chain_der,
        ..creds.clone()
    })
}

/// A distinct, valid-looking WireGuard public key for agent number `i`.
pub fn wg_key(i: u64) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[..8].copy_from_slice(&i.to_be_bytes());
    k[31] = 0x5a;
    k
}

/// Wait for the next message of a Watch stream, at most `within`.
/// `Ok(None)` means the stream ended; `Err` means a timeout or a stream error.
pub async fn next_update(
    stream: &mut tonic::Streaming<pb::MeshUpdate>,
    within: Duration,
) -> Result<Option<pb::MeshUpdate>> {
    match tokio::time::timeout(within, stream.message()).await {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(s)) => bail!("watch stream error: {s}"),
        Err(_) => bail!("no watch update within {within:?}"),
    }
}

/// Serial numbers (lowercase hex, no leading zeros stripped) listed in a DER CRL.
pub fn crl_serials(crl_der: &[u8]) -> Result<Vec<String>> {
    use x509_parser::prelude::{CertificateRevocationList, FromDer};
    let (_, crl) = CertificateRevocationList::from_der(crl_der)
        .map_err(|e| anyhow::anyhow!("parsing CRL: {e}"))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect())
}

/// Serial (lowercase hex of the raw DER integer) of a certificate.
pub fn cert_serial(cert_der: &[u8]) -> Result<String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, c) =
        X509Certificate::from_der(cert_der).map_err(|e| anyhow::anyhow!("parsing cert: {e}"))?;
    Ok(hex::encode(c.raw_serial()))
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// How a test dials the controller's gRPC port, beyond what an agent does.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dial {
    /// HTTP/2 receive windows (per stream and per connection): a client that does not
    /// read stops the controller's stream once this much is in flight (a stuck watcher).
    pub window: Option<u32>,
    /// The loopback address to connect from (many simulated agents spread over several,
    /// as a fleet comes from many hosts).
    pub source: Option<std::net::IpAddr>,
}

/// A mutual-TLS channel for `creds`, dialled as `dial` says.
pub async fn mesh_channel_dial(addr: &str, creds: &NodeCreds, dial: Dial) -> Result<Channel> {
    use std::sync::Arc;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(creds.tls()?));
    let target: SocketAddr = addr.parse().context("controller address")?;
    let name = rustls_pki_types::ServerName::from(target.ip());
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let (tls, name) = (tls.clone(), name.clone());
        async move {
            let sock = if target.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(ip) = dial.source {
                sock.bind(SocketAddr::new(ip, 0))?;
            }
            let tcp = sock.connect(target).await?;
            tcp.set_nodelay(true)?;
            let io = tls.connect(name, tcp).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper_util::rt::TokioIo::new(io))
        }
    });
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    if let Some(w) = dial.window {
        endpoint = endpoint
            .initial_stream_window_size(w)
            .initial_connection_window_size(w);
    }
    Ok(endpoint.connect_with_connector(connector).await?)
}

/// Give a new data directory `to` a copy of `from`'s `secrets/` (KEK and pepper), as a
/// further controller on a shared store needs (directories 0700, files 0600).
pub fn copy_secrets(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to.join("secrets"))?;
    for d in [to.to_path_buf(), to.join("secrets")] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700))?;
    }
    for e in std::fs::read_dir(from.join("secrets"))? {
        let e = e?;
        let dst = to.join("secrets").join(e.file_name());
        std::fs::copy(e.path(), &dst)?;
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
