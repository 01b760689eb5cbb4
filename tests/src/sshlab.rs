//! A server-access lab: a real controller and servers, each a network namespace (joined to
//! the test's namespace by a veth pair on 198.19.<tag>.0/24, see [`EdgeLab::veth`]) running
//! `zonemesh-agent run --manage-sshd` and an sshd that the agent alone configures: the
//! lab's base sshd_config only sets the port, the address, the pid file and the host key,
//! and `Include`s the agent's drop-in directory. The `ssh` client runs in the test's own
//! namespace. Root only; torn down by a [`Janitor`].

use crate::cluster::{Controller, free_port};
use crate::edge::EdgeLab;
use crate::janitor::Janitor;
use crate::{bin, run, run_ok};
use anyhow::{Context, Result, bail};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why an SSH lab cannot run here (printed as `skipped: <reason>`), or `None`.
pub fn skip_reason() -> Option<String> {
    if !crate::is_root() {
        return Some("not root (servers are network namespaces with TUN)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun missing".into());
    }
    if !Path::new("/usr/sbin/sshd").exists() {
        return Some("openssh-server not installed".into());
    }
    for tool in ["ip", "ssh", "ssh-keygen"] {
        if !crate::have(tool) {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

/// One server: its namespace, address, agent and sshd.
pub struct Server {
    pub name: String,
    pub zone: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    agent: Mutex<Option<Child>>,
    sshd: Mutex<Option<Child>>,
}

impl Server {
    pub fn host_key(&self) -> PathBuf {
        self.dir.join("ssh_host_ed25519_key")
    }
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("sshd_config.d")
    }
    pub fn files_dir(&self) -> PathBuf {
        self.dir.join("zonemesh")
    }
    pub fn drop_in(&self) -> PathBuf {
        self.config_dir().join("50-zonemesh.conf")
    }
    pub fn krl(&self) -> PathBuf {
        self.files_dir().join("revoked.krl")
    }
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
    pub fn sshd_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
    fn pid_file(&self) -> PathBuf {
        self.dir.join("sshd.pid")
    }
    /// `--manage-sshd` and where its files go.
    fn manage_args(&self) -> Vec<String> {
        let pid = self.pid_file();
        vec![
            "--manage-sshd".into(),
            "--ssh-host-key".into(),
            self.host_key().display().to_string(),
            "--sshd-config-dir".into(),
            self.config_dir().display().to_string(),
            "--sshd-files-dir".into(),
            self.files_dir().display().to_string(),
            "--sshd-reload".into(),
            format!("test ! -f {p} || kill -HUP $(cat {p})", p = pid.display()),
        ]
    }
}

/// A controller and servers in zones.
pub struct SshLab {
    pub dir: PathBuf,
    pub tag: u8,
    pub ctl: Controller,
    pub servers: Vec<Server>,
    pid_tag: u32,
    // Dropped last.
    pub janitor: Janitor,
}

/// How long a server has to come up (enroll, host certificate, drop-in, sshd).
const START: Duration = Duration::from_secs(30);

impl SshLab {
    /// A controller and, per `(zone, count)`, that many servers; every sshd is listening
    /// with the agent's drop-in when this returns.
    pub fn new(tag: u8, zones: &[(&str, usize)]) -> Result<Self> {
        Self::new_with(tag, zones, &[])
    }

    /// [`Self::new`] with extra `serve` arguments for the controller.
    pub fn new_with(tag: u8, zones: &[(&str, usize)], serve_args: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("zm-sshlab-{tag}-"))
            .tempdir()?
            .keep();
        let janitor = Janitor::new(&dir)?;
        let pid_tag = std::process::id() % 100_000;
        std::fs::create_dir_all("/run/sshd")?;
        let (_, _, host0) = EdgeLab::veth(&janitor, pid_tag, tag, 0)?;
        let mut ctl = Controller::init(&dir)?;
        ctl.grpc = SocketAddr::from((host0, free_port()));
        ctl.pki = SocketAddr::from((host0, free_port()));
        ctl.serve_args = serve_args.iter().map(|a| a.to_string()).collect();
        ctl.start()?;
        if let Some(pid) = ctl.pid() {
            janitor.track_pid(pid)?;
        }
        let mut lab = Self {
            dir,
            tag,
            ctl,
            servers: Vec::new(),
            pid_tag,
            janitor,
        };
        for (zi, (zone, n)) in zones.iter().enumerate() {
            lab.ctl
                .zone_add(zone, &format!("100.{}.{tag}.0/24", 64 + zi))?;
            for _ in 0..*n {
                lab.add_server(zone)?;
            }
        }
        for s in &lab.servers {
            lab.wait_sshd(s)?;
        }
        Ok(lab)
    }

    fn add_server(&mut self, zone: &str) -> Result<()> {
        let i = self.servers.len();
        let (ns, ip, _) = EdgeLab::veth(&self.janitor, self.pid_tag, self.tag, i)?;
        let name = format!("srv-{zone}-{i}");
        let dir = self.dir.join(&name);
        std::fs::create_dir_all(&dir)?;
        let state_dir = dir.join("state");
        let token = self.ctl.token(zone, 1)?;
        run_ok(
            Command::new(bin("zonemesh-agent"))
                .arg("enroll")
                .args(["--controller", &self.ctl.grpc_addr()])
                .args(["--ca-fingerprint", &self.ctl.fingerprint])
                .args(["--token", &token])
                .arg("--state-dir")
                .arg(&state_dir)
                .args(["--name", &name, "--zone", zone])
                .args(["--endpoint", &format!("{ip}:51820")]),
        )
        .with_context(|| format!("enrolling {name}"))?;
        let s = Server {
            name,
            zone: zone.into(),
            ns,
            ip,
            dir,
            state_dir,
            agent: Mutex::new(None),
            sshd: Mutex::new(None),
        };
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", &s.name, "-f"])
                .arg(s.host_key()),
        )?;
        std::fs::create_dir_all(s.config_dir())?;
        // StrictModes no: the lab's files live under /tmp, which is world-writable, and
        // sshd refuses principals files below such a directory. On a real server they
        // are in /etc/ssh/zonemesh.
        std::fs::write(
            s.dir.join("sshd_config"),
            format!(
                "Include {}/*.conf\nPort 22\nListenAddress {}\nPidFile {}\nHostKey {}\nAuthorizedKeysFile none\nUsePAM no\nStrictModes no\nLogLevel VERBOSE\n",
                s.config_dir().display(),
                s.ip,
                s.pid_file().display(),
                s.host_key().display()
            ),
        )?;
        self.start_agent(&s, true)?;
        self.servers.push(s);
        Ok(())
    }

    /// Start (or restart) a server's agent, with or without `--manage-sshd`.
    pub fn start_agent(&self, s: &Server, manage: bool) -> Result<()> {
        self.start_agent_with(s, manage, &[], &[]).map(drop)
    }

    /// [`Self::start_agent`] run through `wrapper` (e.g. `nsenter --mount=...`, which
    /// must exec the rest) and with `extra` `run` arguments; returns the agent's pid.
    pub fn start_agent_with(
        &self,
        s: &Server,
        manage: bool,
        wrapper: &[&str],
        extra: &[&str],
    ) -> Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.dir.join("agent.log"))?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("ip");
                c
            }
            None => Command::new("ip"),
        };
        cmd.args(["netns", "exec", &s.ns])
            .arg(bin("zonemesh-agent"))
            .arg("run")
            .arg("--state-dir")
            .arg(&s.state_dir)
            .args(["--interface", "zm0", "--listen-port", "51820"]);
        if manage {
            cmd.args(s.manage_args());
        }
        cmd.args(extra);
        let child = cmd
            .env(
                "ZONEMESH_LOG",
                std::env::var("ZONEMESH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning zonemesh-agent run")?;
        let pid = child.id();
        self.janitor.track_pid(pid)?;
        *s.agent.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(child);
        Ok(pid)
    }

    /// Stop a server's agent (SIGTERM, then KILL after 5 s).
    pub fn stop_agent(&self, s: &Server) {
        if let Some(mut c) = s.agent.lock().ok().and_then(|mut c| c.take()) {
            crate::cluster::signal(c.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait for the agent's drop-in, then start sshd on it and wait until it listens.
    fn wait_sshd(&self, s: &Server) -> Result<()> {
        let deadline = Instant::now() + START;
        while !(s.drop_in().exists() && s.dir.join("ssh_host_ed25519_key-cert.pub").exists()) {
            if Instant::now() > deadline {
                bail!("{} wrote no drop-in:\n{}", s.name, s.agent_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::File::create(s.dir.join("sshd.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &s.ns, "/usr/sbin/sshd", "-D", "-e", "-f"])
            .arg(s.dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning sshd")?;
        self.janitor.track_pid(child.id())?;
        *s.sshd.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(child);
        while std::net::TcpStream::connect_timeout(
            &SocketAddr::from((s.ip, 22)),
            Duration::from_millis(200),
        )
        .is_err()
        {
            if Instant::now() > deadline {
                bail!("sshd on {} does not listen:\n{}", s.name, s.sshd_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Servers of one zone.
    pub fn zone(&self, zone: &str) -> Vec<&Server> {
        self.servers.iter().filter(|s| s.zone == zone).collect()
    }

    /// A `known_hosts` file holding only `ssh known-hosts`' `@cert-authority` line.
    pub fn known_hosts(&self) -> Result<PathBuf> {
        let p = self.dir.join("known_hosts");
        if !p.exists() {
            let line = self.ctl.admin_ok(&["ssh", "known-hosts"])?;
            std::fs::write(&p, line)?;
        }
        Ok(p)
    }

    /// A portal-owner user with a password.
    pub fn add_user(&self, email: &str) {
        self.ctl.admin_with_stdin(
            &["user", "add", "--email", email, "--role", "portal-owner"],
            "a long lab password for ssh tests\n",
        );
    }

    /// A fresh Ed25519 key pair in the lab directory; returns the private key's path.
    pub fn user_key(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.join(format!("id-{name}"));
        if !p.exists() {
            run_ok(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
                    .arg(&p),
            )?;
        }
        Ok(p)
    }

    /// `ssh sign-user` for `key` (its `.pub`); returns the certificate's path.
    pub fn sign(&self, email: &str, key: &Path, ttl: Option<&str>) -> Result<PathBuf> {
        let cert = PathBuf::from(format!("{}-cert.pub", key.display()));
        let pubkey = format!("{}.pub", key.display());
        let out = cert.display().to_string();
        let mut args = vec![
            "ssh",
            "sign-user",
            "--email",
            email,
            "--pubkey",
            &pubkey,
            "--out",
            &out,
        ];
        if let Some(t) = ttl {
            args.extend(["--ttl", t]);
        }
        self.ctl.admin_ok(&args)?;
        Ok(cert)
    }

    /// `ssh` as `user` to `server:port` with `key` (and its certificate beside it, which
    /// ssh picks up as `<key>-cert.pub`), trusting hosts only through the lab's
    /// `@cert-authority` line; runs `true` there.
    pub fn ssh_at(&self, ip: Ipv4Addr, port: u16, user: &str, key: &Path) -> Result<Output> {
        let kh = self.known_hosts()?;
        run(Command::new("ssh")
            .args(["-F", "/dev/null", "-p", &port.to_string()])
            .args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes"])
            .arg("-o")
            .arg(format!("IdentityFile={}", key.display()))
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", kh.display()))
            .args(["-o", "GlobalKnownHostsFile=/dev/null"])
            .args(["-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=5"])
            .arg(format!("{user}@{ip}"))
            .arg("true"))
    }

    /// [`Self::ssh_at`] on a server's sshd.
    pub fn ssh(&self, s: &Server, user: &str, key: &Path) -> Result<Output> {
        self.ssh_at(s.ip, 22, user, key)
    }
}
