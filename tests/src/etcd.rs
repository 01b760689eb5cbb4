//! Real etcd for tests: `n` members of Debian's `etcd` (package `etcd-server`, with
//! `etcdctl` from `etcd-client`) on free loopback ports, each with its own data directory
//! and log. One member for the store suite, three for failover: a member can be killed
//! (`kill -9`) and started again on its data, and the current raft leader is found with
//! `etcdctl endpoint status`. Every member is killed when the guard is dropped.

use crate::cluster::free_port;
use anyhow::{Context, Result, bail};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when the `etcd` and `etcdctl` commands exist.
pub fn available() -> bool {
    crate::have("etcd") && crate::have("etcdctl")
}

/// One member of the cluster.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// `127.0.0.1:PORT` of the member's client listener.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// True while the member's process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running etcd cluster on loopback (one or more members).
pub struct Etcd {
    pub members: Vec<Member>,
    token: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Etcd {
    /// Start `n` members with their data and logs in `dir`; returns once every member
    /// answers and one of them leads. A port taken meanwhile by someone else is retried
    /// with fresh ports.
    pub fn start(dir: &Path, n: usize) -> Result<Self> {
        let mut last = None;
        for round in 0..3 {
            match Self::start_once(&dir.join(format!("etcd{round}")), n) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("three rounds"))
    }

    /// [`Etcd::start`] in a temporary directory of its own (removed on drop).
    pub fn start_temp(n: usize) -> Result<Self> {
        let temp = tempfile::tempdir()?;
        let mut c = Self::start(temp.path(), n)?;
        c._temp = Some(temp);
        Ok(c)
    }

    fn start_once(dir: &Path, n: usize) -> Result<Self> {
        if !available() {
            bail!("etcd not installed");
        }
        std::fs::create_dir_all(dir)?;
        let mut ports = BTreeSet::new();
        while ports.len() < 2 * n {
            ports.insert(free_port());
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                data_dir: dir.join(format!("m{i}")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let mut c = Self {
            members,
            token: format!("zm-{}-{}", std::process::id(), ports[0]),
            dir: dir.to_path_buf(),
            _temp: None,
        };
        for i in 0..n {
            c.spawn(i, "new")?;
        }
        c.wait_healthy(Duration::from_secs(30))?;
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<()> {
        let initial = self.initial_cluster();
        let m = &mut self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)?;
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args([
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                state,
            ])
            .args(["--initial-cluster-token", &self.token])
            // Quicker elections than the defaults: a killed leader is replaced in about a
            // second, and still no spurious elections on a loaded 2-core machine.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning etcd (Debian package etcd-server)")?;
        m.child = Some(child);
        Ok(())
    }

    /// `HOST:PORT` of every member's client listener.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Every member's endpoint, comma-separated (for `etcdctl --endpoints`).
    pub fn endpoint_list(&self) -> String {
        self.endpoints().join(",")
    }

    /// The `--store` URL naming every member (default key prefix).
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoint_list())
    }

    /// The `--store` URL naming every member, keys under `/PREFIX/`.
    pub fn url(&self, prefix: &str) -> String {
        format!("{}/{prefix}", self.store_url())
    }

    /// The `--store` URL naming member `first` first (a client starts on it), then the
    /// others.
    pub fn store_url_from(&self, first: usize) -> String {
        let n = self.members.len();
        let eps: Vec<String> = (0..n)
            .map(|k| self.members[(first + k) % n].endpoint())
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    /// Where the members keep their data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Endpoints of the members running now.
    fn running_endpoints(&mut self) -> Vec<String> {
        self.members
            .iter_mut()
            .filter_map(|m| m.is_running().then(|| m.endpoint()))
            .collect()
    }

    /// `etcdctl endpoint status` of the running members: (member index, is leader).
    fn status(&mut self) -> Result<Vec<(usize, bool)>> {
        let eps = self.running_endpoints();
        if eps.is_empty() {
            bail!("no etcd member is running");
        }
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(eps.join(","))
            .args(["--command-timeout=2s", "endpoint", "status", "-w", "json"])
            .output()
            .context("running etcdctl")?;
        if !out.status.success() {
            bail!(
                "etcdctl endpoint status: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let mut rows = Vec::new();
        for e in v.as_array().context("etcdctl printed no list")? {
            let ep = e["Endpoint"].as_str().unwrap_or_default();
            let me = e["Status"]["header"]["member_id"].as_u64();
            let leader = e["Status"]["leader"].as_u64();
            let i = self
                .members
                .iter()
                .position(|m| ep.ends_with(&format!(":{}", m.client_port)))
                .context("etcdctl named an unknown endpoint")?;
            rows.push((i, me.is_some() && me == leader));
        }
        Ok(rows)
    }

    /// Wait until every running member answers and one of them leads.
    pub fn wait_healthy(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let running = self.running_endpoints().len();
            if running < self.members.iter().filter(|m| m.child.is_some()).count() {
                bail!("an etcd member exited:\n{}", self.logs());
            }
            match self.status() {
                Ok(rows) if rows.len() == running && rows.iter().any(|r| r.1) => return Ok(()),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok(rows) => bail!("etcd has no leader: {rows:?}\n{}", self.logs()),
                Err(e) => bail!("etcd did not come up: {e}\n{}", self.logs()),
            }
        }
    }

    /// The index of the member that leads now (waits up to 15 s for an election).
    pub fn leader(&mut self) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(rows) = self.status()
                && let Some((i, _)) = rows.iter().find(|r| r.1)
            {
                return Ok(*i);
            }
            if Instant::now() > deadline {
                bail!("etcd has no leader:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kill -9` member `i`.
    pub fn kill9(&mut self, i: usize) {
        self.members[i].kill9();
    }

    /// Freeze member `i` (`SIGSTOP`): its sockets stay open but it answers nothing, as a
    /// hung or partitioned host.
    pub fn pause(&mut self, i: usize) -> Result<()> {
        self.signal(i, "-STOP")
    }

    /// Let a frozen member go on (`SIGCONT`).
    pub fn resume(&mut self, i: usize) -> Result<()> {
        self.signal(i, "-CONT")
    }

    fn signal(&mut self, i: usize, sig: &str) -> Result<()> {
        let pid = self.members[i]
            .child
            .as_ref()
            .context("the member is not running")?
            .id();
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        if !st.success() {
            bail!("kill {sig} {pid}: {st}");
        }
        Ok(())
    }

    /// Start member `i` again on its data directory (it rejoins the cluster).
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.kill9(i);
        self.spawn(i, "existing")
    }

    /// Every member's log.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("--- {} ---\n{}", m.name, m.log_text()))
            .collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill9();
        }
    }
}

/// Copy every tree of `from` into `to` (what `store migrate` does, for tests that build
/// a CA with `init` on sled and run it on etcd).
pub fn copy_store(
    from: &zonemesh_controller::store::Store,
    to: &zonemesh_controller::store::Store,
) {
    use zonemesh_controller::kv::Txn;
    for tree in from.kv().tree_names().expect("tree names") {
        let t = from.kv().open_tree(&tree).expect("tree");
        let mut txn = Txn::new();
        for item in t.iter() {
            let (k, v) = item.expect("entry");
            txn.put(&tree, k, v);
            if txn.ops.len() >= 100 {
                assert!(to.kv().commit(&txn).expect("commit"));
                txn = Txn::new();
            }
        }
        if !txn.is_empty() {
            assert!(to.kv().commit(&txn).expect("commit"));
        }
    }
}

/// A store on the etcd cluster named by `url` (its own client, as one controller has).
pub fn open_store(url: &str, data_dir: &Path) -> zonemesh_controller::store::Store {
    let u: zonemesh_controller::kv::url::StoreUrl = url.parse().expect("store URL");
    zonemesh_controller::store::Store::on(u.open(data_dir).expect("open etcd store"))
        .expect("store")
}
