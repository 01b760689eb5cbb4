//! Cleanup that survives the test process: a small shell process that waits for the end of
//! its stdin (the test process exiting, normally or not, or the guard being dropped) and
//! then stops the processes the test registered, deletes the network namespaces it created
//! and removes its directory. A lab shared by every test of a file lives in a `static`,
//! whose destructor never runs; this is what tears it down.

use anyhow::{Context, Result};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

/// Stops what a test started once the test process ends (or on drop).
pub struct Janitor {
    dir: PathBuf,
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Option<Child>>,
}

/// Runs at the end of stdin: kill every registered pid whose command line or environment names the
/// lab directory (so a reused pid is never hit), every process left in the lab's
/// namespaces, then delete the namespaces and the directory.
const SCRIPT: &str = r#"
dir=$1
cat >/dev/null
stop() {
  for p in $(cat "$dir/janitor.pids" 2>/dev/null); do
    if cat "/proc/$p/cmdline" "/proc/$p/environ" 2>/dev/null | tr '\0' ' ' | grep -qF "$dir"; then kill "-$1" "$p" 2>/dev/null; fi
  done
  for ns in $(cat "$dir/janitor.netns" 2>/dev/null); do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill "-$1" "$p" 2>/dev/null; done
  done
}
stop TERM
sleep 0.3
stop KILL
for ns in $(cat "$dir/janitor.netns" 2>/dev/null); do ip netns del "$ns" 2>/dev/null; done
case "$dir" in /tmp/*) rm -rf "$dir" ;; esac
"#;

impl Janitor {
    /// Watch over `dir` (created if missing; removed at the end when it is under /tmp).
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut child = Command::new("bash")
            .args(["-c", SCRIPT, "janitor"])
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning the janitor shell")?;
        let stdin = child.stdin.take();
        Ok(Self {
            dir: dir.to_path_buf(),
            stdin: Mutex::new(stdin),
            child: Mutex::new(Some(child)),
        })
    }

    fn append(&self, file: &str, line: &str) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(file))?;
        writeln!(f, "{line}")?;
        Ok(())
    }

    /// Stop this process at the end; its command line or environment must contain the
    /// janitor's directory.
    pub fn track_pid(&self, pid: u32) -> Result<()> {
        self.append("janitor.pids", &pid.to_string())
    }

    /// Delete this network namespace (and stop everything in it) at the end.
    pub fn track_netns(&self, ns: &str) -> Result<()> {
        self.append("janitor.netns", ns)
    }

    /// Clean up now and wait for it.
    pub fn finish(&self) {
        drop(self.stdin.lock().map(|mut s| s.take()));
        if let Some(mut c) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let _ = c.wait();
        }
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        self.finish();
    }
}
