//! A real etcd cluster for tests: `n` members of Debian's `etcd` on free loopback ports,
//! each with its own data directory under the test's directory; members can be killed
//! (`kill -9`) and started again, and the current raft leader is found with `etcdctl`.
//! Every member is killed when the guard is dropped.

use crate::cluster::free_port;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member of the cluster.
struct Member {
    name: String,
    client: u16,
    peer: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    token: String,
}

/// True when the `etcd` and `etcdctl` commands exist (Debian `etcd-server`, `etcd-client`).
pub fn available() -> bool {
    crate::have("etcd") && crate::have("etcdctl")
}

impl EtcdCluster {
    /// Start `n` members in `dir` and wait until the cluster has a leader.
    pub fn start(dir: &Path, n: usize) -> Result<Self> {
        let token = format!("zm-{}-{}", std::process::id(), free_port());
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                data_dir: dir.join(format!("etcd-m{i}")),
                log: dir.join(format!("etcd-m{i}.log")),
                child: None,
            })
            .collect();
        let mut c = Self { members, token };
        for i in 0..n {
            c.spawn(i, "new")?;
        }
        c.wait_healthy(Duration::from_secs(30))?;
        Ok(c)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
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
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg("--listen-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://127.0.0.1:{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            // Quick elections on loopback: a killed leader is replaced in about a second.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning etcd (Debian package etcd-server)")?;
        m.child = Some(child);
        Ok(())
    }

    /// `HOST:PORT` of every member's client listener.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect()
    }

    /// The `--store` URL naming every member.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Endpoints of the members running now.
    fn running_endpoints(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for m in &mut self.members {
            let alive = m
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_none());
            if alive {
                out.push(format!("127.0.0.1:{}", m.client));
            }
        }
        out
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
                .position(|m| ep.ends_with(&format!(":{}", m.client)))
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
            match self.status() {
                Ok(rows) if rows.len() == running && rows.iter().any(|r| r.1) => return Ok(()),
                Ok(_) | Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Ok(rows) => bail!("etcd has no leader: {rows:?}"),
                Err(e) => bail!("etcd did not come up: {e}\n{}", self.logs()),
            }
        }
    }

    /// The index of the member that leads now.
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
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
            .map(|m| {
                format!(
                    "--- {} ---\n{}",
                    m.name,
                    std::fs::read_to_string(&m.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill9(i);
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
