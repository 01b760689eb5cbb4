//! A real systemd journal for a test: Debian's `systemd-journald` in its own mount
//! namespace, with tmpfs over `/run/systemd`, `/run/log` and `/var/log/journal`, so that
//! nothing it writes or listens on is seen outside. Processes enter that namespace with
//! [`Journal::wrapper`] (`nsenter --mount=...`): `systemd-cat` there writes records with
//! credentials journald takes from the kernel, and `journalctl` there reads them. Root
//! only; journald stops on drop.

use crate::janitor::Janitor;
use anyhow::{Context, Result, bail};
use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JOURNALD: &str = "/lib/systemd/systemd-journald";

/// Why a journal cannot run here (printed as `skipped: <reason>`), or `None`.
pub fn skip_reason() -> Option<String> {
    if !crate::is_root() {
        return Some("not root (journald needs its own mount namespace)".into());
    }
    if !Path::new(JOURNALD).exists() {
        return Some("systemd-journald not installed".into());
    }
    for tool in ["journalctl", "systemd-cat", "unshare", "nsenter", "setpriv"] {
        if !crate::have(tool) {
            return Some(format!("{tool} not installed"));
        }
    }
    None
}

/// A running journald in a private mount namespace.
pub struct Journal {
    child: Child,
    pub pid: u32,
}

impl Journal {
    /// Start journald and wait until its native socket is up.
    pub fn start(janitor: &Janitor) -> Result<Self> {
        let script = format!(
            "set -e; for d in /run/systemd /run/log /var/log/journal; do mkdir -p $d; mount -t tmpfs -o mode=0755 tmpfs $d; done; mkdir -p /run/systemd/journal; exec {JOURNALD}"
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning systemd-journald")?;
        let pid = child.id();
        janitor.track_pid(pid)?;
        let me = Self { child, pid };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !me.socket_up() {
            if Instant::now() > deadline {
                bail!("systemd-journald did not open its socket");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    fn socket_up(&self) -> bool {
        self.cmd("test")
            .args(["-S", "/run/systemd/journal/socket"])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The command prefix that runs a program in the journal's mount namespace.
    pub fn wrapper(&self) -> Vec<String> {
        vec![
            "nsenter".into(),
            format!("--mount=/proc/{}/ns/mnt", self.pid),
            "--".into(),
        ]
    }

    /// `program` in the journal's mount namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let w = self.wrapper();
        let mut c = Command::new(&w[0]);
        c.args(&w[1..]).arg(program);
        c
    }

    /// Write `lines` as records tagged `identifier`, from root or (`uid`) another user.
    pub fn write(&self, identifier: &str, uid: Option<u32>, lines: &str) -> Result<()> {
        let mut c = match uid {
            Some(u) => {
                let mut c = self.cmd("setpriv");
                c.args([
                    &format!("--reuid={u}"),
                    &format!("--regid={u}"),
                    "--clear-groups",
                    "systemd-cat",
                ]);
                c
            }
            None => self.cmd("systemd-cat"),
        };
        let mut child = c
            .args(["-t", identifier])
            .stdin(Stdio::piped())
            .spawn()
            .context("spawning systemd-cat")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(lines.as_bytes())?;
        let st = child.wait()?;
        if !st.success() {
            bail!("systemd-cat -t {identifier} failed: {st}");
        }
        Ok(())
    }

    /// `journalctl -o json` of records matching `matches` (e.g. `SYSLOG_IDENTIFIER=sshd`).
    pub fn records(&self, matches: &[&str]) -> Result<Vec<serde_json::Value>> {
        let o = self
            .cmd("journalctl")
            .args(["-o", "json", "--no-pager"])
            .args(matches)
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect())
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Child processes of `pid` whose command name is `comm` (from `/proc`).
pub fn children_named(pid: u32, comm: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                // pid (comm) state ppid ...
                let (Some(open), Some(close)) = (s.find('('), s.rfind(')')) else {
                    return false;
                };
                let name = &s[open + 1..close];
                let ppid = s[close + 1..].split_whitespace().nth(1);
                name == comm && ppid == Some(&pid.to_string())
            })
        })
        .collect()
}
