//! A portal-certificate lab: a real controller (optionally pointed at pebble), and edges:
//! real `zonemesh-agent run --edge-*` processes, each in its own network namespace joined
//! to the test's namespace by a veth pair on 198.19.<tag>.0/24 (inside the underlay range
//! 198.18.0.0/15). Edge `i` is 198.19.<tag>.(4i+2) with its HTTPS on :443 and HTTP on :80;
//! the host side is .(4i+1), where the controller's gRPC and PKI listeners sit (on edge 0's
//! host address) and where the upstream every edge proxies to answers. pebble validates
//! HTTP-01 on port 80 of whatever its mock DNS says. Root only.
//!
//! Everything is torn down by a [`Janitor`] when the lab is dropped or the test process
//! ends, so a lab can be shared by every test of a file through a `static`.

use crate::cluster::{Controller, free_port};
use crate::janitor::Janitor;
use crate::pebble::Pebble;
use crate::{bin, run_ok};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The zone every lab edge is enrolled in.
pub const EDGE_ZONE: &str = "edge";
/// A zone with no nodes: a domain there has no edge.
pub const EMPTY_ZONE: &str = "lonely";

/// Why an edge test cannot run here (printed as `skipped: <reason>`), or `None`.
pub fn skip_reason(needs_pebble: bool) -> Option<String> {
    if !crate::is_root() {
        return Some("not root (edges run agents in network namespaces with TUN)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing".into());
    }
    for tool in ["ip", "openssl", "curl"] {
        if !crate::have(tool) {
            return Some(format!("{tool} not installed"));
        }
    }
    if needs_pebble && !crate::pebble::installed() {
        return Some("pebble not installed".into());
    }
    None
}

/// One edge: its namespace, addresses and agent.
pub struct Edge {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub host_ip: Ipv4Addr,
    pub state_dir: PathBuf,
    /// `--edge-files` directory, when the edge writes files.
    pub files_dir: Option<PathBuf>,
    pub log: PathBuf,
    child: Mutex<Option<std::process::Child>>,
    args: Vec<String>,
}

impl Edge {
    /// The edge's HTTPS listener.
    pub fn https(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 443))
    }

    /// The edge's HTTP listener (HTTP-01 and the redirect).
    pub fn http(&self) -> SocketAddr {
        SocketAddr::from((self.ip, 80))
    }

    /// A command run inside the edge's namespace.
    pub fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(argv);
        c
    }

    /// The agent's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while the agent runs.
    pub fn is_running(&self) -> bool {
        self.child.lock().ok().is_some_and(|mut c| {
            c.as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none())
        })
    }
}

/// Where the lab's edges send proxied requests: a small HTTP/1.1 server in the test process
/// that answers every request with a page naming the request line, its Host and its
/// X-Forwarded-Host.
pub struct Upstream {
    pub addr: SocketAddr,
    /// Requests seen (request lines).
    pub seen: std::sync::Arc<Mutex<Vec<String>>>,
}

/// The marker in every upstream page.
pub const UPSTREAM_MARKER: &str = "zonemesh-test-upstream";

impl Upstream {
    fn start(ip: Ipv4Addr) -> Result<Self> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        // Lives as long as the test process; each connection gets a thread.
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = serve_upstream(conn, &log);
                });
            }
        });
        Ok(Self { addr, seen })
    }

    /// The upstream URL for `--edge-upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn serve_upstream(conn: TcpStream, log: &Mutex<Vec<String>>) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let request = line.trim_end().to_string();
        let (mut host, mut fwd, mut len) = (String::new(), String::new(), 0usize);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "host" => host = v.trim().to_string(),
                    "x-forwarded-host" => fwd = v.trim().to_string(),
                    "content-length" => len = v.trim().parse().unwrap_or(0),
                    _ => {}
                }
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        if let Ok(mut l) = log.lock()
            && l.len() < 10_000
        {
            l.push(request.clone());
        }
        let page = format!(
            "<html><body>{UPSTREAM_MARKER} host={host} forwarded-host={fwd} request={request}</body></html>\n"
        );
        write!(
            w,
            "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{page}",
            page.len()
        )?;
        w.flush()?;
    }
}

/// How the lab is built.
pub struct LabOptions {
    /// 198.19.<tag>.0/24 and the namespace names; unique per test file (in use: 21
    /// `deploy_internal`, 22 `deploy_acme`, 23 the deploy benchmark).
    pub tag: u8,
    /// Point the controller at a pebble started for the lab.
    pub acme: bool,
    /// Directory with the binaries (default: the test build's).
    pub bin_dir: Option<PathBuf>,
}

/// A controller, optionally pebble, and edges.
pub struct EdgeLab {
    pub dir: PathBuf,
    pub tag: u8,
    pub ctl: Controller,
    pub pebble: Option<Pebble>,
    pub upstream: Upstream,
    pub edges: Vec<Edge>,
    bin_dir: PathBuf,
    pid_tag: u32,
    // Dropped last: tears down what the fields above did not.
    pub janitor: Janitor,
}

fn ip_cmd(args: &[&str]) -> Result<String> {
    run_ok(Command::new("ip").args(args))
}

impl EdgeLab {
    /// Namespaces, veths, pebble (when asked), a controller serving, the zones. No edges yet.
    pub fn new(opts: LabOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("zm-edgelab-{}-", opts.tag))
            .tempdir()?
            .keep();
        let janitor = Janitor::new(&dir)?;
        let pid_tag = std::process::id() % 100_000;
        let tag = opts.tag;
        let bin_dir = match opts.bin_dir {
            Some(d) => d,
            None => bin("zonemesh-agent")
                .parent()
                .context("bin dir")?
                .to_path_buf(),
        };
        // Host side of edge 0 carries the controller; make it now.
        let host0 = Ipv4Addr::new(198, 19, tag, 1);
        Self::veth(&janitor, pid_tag, tag, 0)?;
        let pebble = if opts.acme {
            Some(Pebble::start(&dir.join("pebble"), 80, Some(&janitor))?)
        } else {
            None
        };
        let mut ctl = Controller::init_with(&dir, bin_dir.join("zonemesh-controller"))?;
        ctl.grpc = SocketAddr::from((host0, free_port()));
        ctl.pki = SocketAddr::from((host0, free_port()));
        if let Some(p) = &pebble {
            ctl.serve_args = p.serve_args("acme-admin@corp.test");
        }
        ctl.start()?;
        if let Some(pid) = ctl.pid() {
            janitor.track_pid(pid)?;
        }
        ctl.zone_add(EDGE_ZONE, &format!("100.64.{tag}.0/24"))?;
        ctl.zone_add(EMPTY_ZONE, &format!("100.65.{tag}.0/24"))?;
        let upstream = Upstream::start(host0)?;
        Ok(Self {
            dir,
            tag,
            ctl,
            pebble,
            upstream,
            edges: Vec::new(),
            bin_dir,
            pid_tag,
            janitor,
        })
    }

    fn ns_name(pid_tag: u32, tag: u8, i: usize) -> String {
        format!("zme{pid_tag}t{tag}e{i}")
    }

    /// Namespace and veth pair number `i` of lab `tag` (198.19.<tag>.4i+1 on the host side,
    /// .4i+2 inside); returns (namespace, inner ip, host ip). Shared with the SSH lab.
    pub fn veth(
        j: &Janitor,
        pid_tag: u32,
        tag: u8,
        i: usize,
    ) -> Result<(String, Ipv4Addr, Ipv4Addr)> {
        let ns = Self::ns_name(pid_tag, tag, i);
        let host_if = format!("ze{pid_tag}t{tag}e{i}");
        let base = u8::try_from(4 * i).context("too many edges")?;
        let host_ip = Ipv4Addr::new(198, 19, tag, base + 1);
        let ip = Ipv4Addr::new(198, 19, tag, base + 2);
        if Path::new("/run/netns").join(&ns).exists() {
            return Ok((ns, ip, host_ip));
        }
        j.track_netns(&ns)?;
        ip_cmd(&["netns", "add", &ns])?;
        ip_cmd(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip_cmd(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip_cmd(&["link", "set", &host_if, "up"])?;
        let x = |a: &[&str]| {
            let mut v = vec!["-n", ns.as_str()];
            v.extend_from_slice(a);
            ip_cmd(&v)
        };
        x(&["link", "set", "lo", "up"])?;
        x(&["addr", "add", &format!("{ip}/30"), "dev", "eth0"])?;
        x(&["link", "set", "eth0", "up"])?;
        x(&["route", "add", "default", "via", &host_ip.to_string()])?;
        Ok((ns, ip, host_ip))
    }

    /// Enroll one more edge in the edge zone and start its agent with the HTTPS and HTTP
    /// listeners and the upstream; `files` adds `--edge-files DIR [--edge-reload CMD]`.
    pub fn add_edge(&mut self, files: bool, reload: Option<&str>) -> Result<&Edge> {
        let i = self.edges.len();
        let (ns, ip, host_ip) = Self::veth(&self.janitor, self.pid_tag, self.tag, i)?;
        let name = format!("edge-{i}");
        let state_dir = self.dir.join(&name);
        let token = self.ctl.token(EDGE_ZONE, 1)?;
        run_ok(
            Command::new(self.bin_dir.join("zonemesh-agent"))
                .arg("enroll")
                .args(["--controller", &self.ctl.grpc_addr()])
                .args(["--ca-fingerprint", &self.ctl.fingerprint])
                .args(["--token", &token])
                .arg("--state-dir")
                .arg(&state_dir)
                .args(["--name", &name, "--zone", EDGE_ZONE])
                .args(["--endpoint", &format!("{ip}:51820")]),
        )
        .with_context(|| format!("enrolling {name}"))?;
        let mut args = vec![
            "--edge-https".to_string(),
            format!("{ip}:443"),
            "--edge-http".into(),
            format!("{ip}:80"),
            "--edge-upstream".into(),
            self.upstream.url(),
        ];
        let files_dir = files.then(|| self.dir.join(format!("{name}-files")));
        if let Some(d) = &files_dir {
            std::fs::create_dir_all(d)?;
            args.push("--edge-files".into());
            args.push(d.to_string_lossy().into_owned());
            if let Some(r) = reload {
                args.push("--edge-reload".into());
                args.push(r.into());
            }
        }
        let edge = Edge {
            log: self.dir.join(format!("{name}.log")),
            name,
            ns,
            ip,
            host_ip,
            state_dir,
            files_dir,
            child: Mutex::new(None),
            args,
        };
        self.start_agent(&edge)?;
        self.edges.push(edge);
        Ok(self.edges.last().expect("just pushed"))
    }

    /// Start (or restart) an edge's agent and wait for its status socket.
    pub fn start_agent(&self, edge: &Edge) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&edge.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &edge.ns])
            .arg(self.bin_dir.join("zonemesh-agent"))
            .arg("run")
            .arg("--state-dir")
            .arg(&edge.state_dir)
            .args(["--interface", "zm0", "--listen-port", "51820"])
            .args(&edge.args)
            .env(
                "ZONEMESH_LOG",
                std::env::var("ZONEMESH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning zonemesh-agent run")?;
        self.janitor.track_pid(child.id())?;
        let mut slot = edge.child.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        *slot = Some(child);
        drop(slot);
        let sock = edge.state_dir.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            if !edge.is_running() {
                bail!("agent {} exited:\n{}", edge.name, edge.log_text());
            }
            if Instant::now() > deadline {
                bail!("agent {} did not start:\n{}", edge.name, edge.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Wait until the controller counts every lab edge as an edge of the edge zone (each
    /// has opened WatchEdge), seen through a sentinel domain that is never deployed.
    pub fn wait_edges_connected(&self, within: Duration) -> Result<Duration> {
        const SENTINEL: &str = "edges-ready.lab.test";
        let start = Instant::now();
        if self.domain(SENTINEL).is_err() {
            let owner = "lab-sentinel@lab.test";
            self.add_domain(SENTINEL, "internal", owner, EDGE_ZONE)?;
        }
        let n = self.edges.len();
        self.wait_domain(SENTINEL, within, |d| d["edges_total"] == n)?;
        Ok(start.elapsed())
    }

    /// Stop an edge's agent (SIGTERM, then KILL after 5 s).
    pub fn stop_agent(&self, edge: &Edge) {
        let child = edge.child.lock().ok().and_then(|mut c| c.take());
        if let Some(mut c) = child {
            crate::cluster::signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Add a user with a password (`user add ... --role ROLE`).
    pub fn add_user(&self, email: &str, role: &str, password: &str) {
        self.ctl.admin_with_stdin(
            &["user", "add", "--email", email, "--role", role],
            &format!("{password}\n"),
        );
    }

    /// `domain add NAME --issuer ISSUER --owner OWNER --edge-zone ZONE`.
    pub fn add_domain(&self, name: &str, issuer: &str, owner: &str, zone: &str) -> Result<()> {
        self.ctl
            .admin_ok(&[
                "domain",
                "add",
                name,
                "--issuer",
                issuer,
                "--owner",
                owner,
                "--edge-zone",
                zone,
            ])
            .map(drop)
    }

    /// Every domain (`domain list --json`).
    pub fn domains(&self) -> Result<Vec<Value>> {
        let out = self.ctl.admin_ok(&["domain", "list", "--json"])?;
        serde_json::from_str(&out).with_context(|| format!("domain list --json: {out}"))
    }

    /// One domain's object from `domain list --json`.
    pub fn domain(&self, name: &str) -> Result<Value> {
        self.domains()?
            .into_iter()
            .find(|d| d["name"] == name)
            .with_context(|| format!("{name} not in domain list"))
    }

    /// Poll `domain list --json` until `done` holds for the domain; returns it.
    pub fn wait_domain(
        &self,
        name: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + within;
        loop {
            let d = self.domain(name)?;
            if done(&d) {
                return Ok(d);
            }
            if Instant::now() > deadline {
                bail!(
                    "{name}: condition not met within {within:?}; last: {d}\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Poll every edge until each serves `serial` for `sni`; returns how long it took.
    pub fn wait_served(&self, sni: &str, serial: &str, within: Duration) -> Result<Duration> {
        let start = Instant::now();
        for e in &self.edges {
            loop {
                let got = crate::tlsprobe::fetch(e.https(), sni).and_then(|s| s.serial());
                if got.as_deref().ok().map(norm_serial) == Some(norm_serial(serial)) {
                    break;
                }
                if start.elapsed() > within {
                    bail!(
                        "{} does not serve {serial} for {sni} within {within:?} (serves {got:?})\n{}",
                        e.name,
                        self.logs()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(start.elapsed())
    }

    /// Tails of the controller's and every edge's logs (and pebble's), for failure messages.
    pub fn logs(&self) -> String {
        let tail = |t: String| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(25)..].join("\n")
        };
        let mut s = format!("--- controller\n{}\n", tail(self.ctl.log_text()));
        for e in &self.edges {
            s.push_str(&format!("--- {}\n{}\n", e.name, tail(e.log_text())));
        }
        if let Some(p) = &self.pebble {
            s.push_str(&format!("--- pebble\n{}\n", tail(p.log())));
        }
        s
    }

    /// Sign in as `email` over curl (a cookie jar of its own); the session is then used for
    /// the pages and the API.
    pub fn sign_in(&self, email: &str, password: &str) -> Result<WebSession> {
        // A cookie jar per sign-in: tests of a shared lab sign in at the same time.
        static SESSIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = self.dir.join("sessions").join(format!("{email}-{n}"));
        std::fs::create_dir_all(&dir)?;
        // Sign-ins of one account are taken one at a time (429 while another is being
        // checked): tests of a shared lab sign the same user in at once, so wait a turn.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let code = self.ctl.curl_sign_in(&dir, "127.0.0.1", email, password);
            match code {
                302 | 303 => break,
                429 if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                _ => bail!("sign-in of {email} answered {code}"),
            }
        }
        Ok(WebSession {
            jar: dir.join("jar-127.0.0.1"),
            root: dir.join("root.pem"),
            base: format!("https://{}", self.ctl.https),
        })
    }
}

impl Drop for EdgeLab {
    fn drop(&mut self) {
        for e in &self.edges {
            self.stop_agent(e);
        }
    }
}

/// A signed-in browser session, played by curl with a cookie jar.
pub struct WebSession {
    pub jar: PathBuf,
    pub root: PathBuf,
    pub base: String,
}

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("not JSON ({}): {}", self.status, self.body))
    }
}

impl WebSession {
    fn curl(&self, extra: &[&str]) -> Result<Answer> {
        let out = run_ok(
            Command::new("curl")
                .args(["-sS", "--max-time", "20", "--cacert"])
                .arg(&self.root)
                .arg("-c")
                .arg(&self.jar)
                .arg("-b")
                .arg(&self.jar)
                .args(["-w", "\n%{http_code}"])
                .args(extra),
        )?;
        let (body, code) = out.rsplit_once('\n').context("no status from curl")?;
        Ok(Answer {
            status: code.trim().parse()?,
            body: body.to_string(),
        })
    }

    /// GET a path.
    pub fn get(&self, path: &str) -> Result<Answer> {
        self.curl(&[&format!("{}{path}", self.base)])
    }

    /// The CSRF token of this session, read from a signed-in page.
    pub fn csrf(&self) -> Result<String> {
        let page = self.get("/domains")?;
        let i = page.body.find("name=\"csrf\" value=\"").with_context(|| {
            format!("no csrf field on /domains ({}): {}", page.status, page.body)
        })? + 19;
        Ok(page.body[i..]
            .split('"')
            .next()
            .unwrap_or_default()
            .to_string())
    }

    /// POST with the session's CSRF token in `x-csrf-token` and an Origin of our own.
    pub fn post(&self, path: &str) -> Result<Answer> {
        let csrf = self.csrf()?;
        self.curl(&[
            "-X",
            "POST",
            "-H",
            &format!("x-csrf-token: {csrf}"),
            "-H",
            &format!("Origin: {}", self.base),
            &format!("{}{path}", self.base),
        ])
    }

    /// Press Deploy Certificate: `POST /api/domains/{name}/deploy-certificate`.
    pub fn deploy(&self, domain: &str) -> Result<Answer> {
        self.post(&format!("/api/domains/{domain}/deploy-certificate"))
    }

    /// `GET /api/domains/{name}`.
    pub fn domain(&self, domain: &str) -> Result<Answer> {
        self.get(&format!("/api/domains/{domain}"))
    }
}

/// `openssl s_client -connect ADDR -servername NAME [-status]` with an empty stdin; returns
/// everything it printed (the certificate, the OCSP response when asked).
pub fn s_client(addr: SocketAddr, sni: &str, status: bool) -> Result<String> {
    let mut c = crate::openssl(&[
        "s_client",
        "-connect",
        &addr.to_string(),
        "-servername",
        sni,
    ]);
    c.arg("-showcerts");
    if status {
        c.arg("-status");
    }
    let out = c
        .stdin(Stdio::null())
        .output()
        .context("running openssl s_client")?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// The PEM certificates in `text`, in order.
pub fn pem_certs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(j) = rest[i..].find("-----END CERTIFICATE-----") else {
            break;
        };
        let end = i + j + "-----END CERTIFICATE-----".len();
        out.push(format!("{}\n", &rest[i..end]));
        rest = &rest[end..];
    }
    out
}

/// The certificates of the chain `openssl s_client -showcerts` printed (leaf first), not
/// the ones inside a printed OCSP response.
pub fn s_client_chain(text: &str) -> Vec<String> {
    let from = text.find("Certificate chain").unwrap_or(text.len());
    pem_certs(&text[from..])
}

/// A serial as lowercase hex without separators or leading zeros, so serials from
/// openssl, the controller and DER integers (which may start with 00) compare equal.
pub fn norm_serial(serial: &str) -> String {
    let s: String = serial
        .chars()
        .filter(char::is_ascii_hexdigit)
        .collect::<String>()
        .to_ascii_lowercase();
    let t = s.trim_start_matches('0');
    if t.is_empty() { "0".into() } else { t.into() }
}
