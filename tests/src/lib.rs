//! Shared fixtures for zonemesh's black-box tests: the built binaries, a pool of RSA keys
//! generated once per target directory, and small helpers around external verifiers.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The cargo target directory the tests were built into (`target/debug/deps/..` → `target`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors().nth(3).expect("target dir").to_path_buf()
}

/// Path of a built workspace binary (`cargo build --workspace --bins` builds them first).
pub fn bin(name: &str) -> PathBuf {
    // Benchmarks run other builds' binaries (e.g. release) from `ZM_BIN_DIR`.
    if let Some(dir) = std::env::var_os("ZM_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.ancestors().nth(2).expect("profile dir");
    let p = profile_dir.join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

fn pool_dir() -> PathBuf {
    let d = std::env::var_os("ZONEMESH_TEST_KEYS")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("zm-test-keys"));
    std::fs::create_dir_all(&d).expect("create key pool dir");
    d
}

fn pooled_key(bits: u32, slot: usize) -> rcgen::KeyPair {
    let path = pool_dir().join(format!("rsa{bits}-{slot}.pk8"));
    if let Ok(der) = std::fs::read(&path) {
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der);
        if let Ok(k) = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256) {
            return k;
        }
    }
    let k = match bits {
        4096 => zonemesh_ca::generate_rsa_4096(),
        _ => zonemesh_ca::generate_rsa_2048(),
    }
    .expect("generate RSA key");
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, k.serialize_der()).expect("write pooled key");
    std::fs::rename(&tmp, &path).expect("rename pooled key");
    k
}

/// An RSA-4096 key from the pool; the same slot gives the same key across tests and runs.
pub fn rsa4096(slot: usize) -> rcgen::KeyPair {
    pooled_key(4096, slot)
}

/// An RSA-2048 key from the pool.
pub fn rsa2048(slot: usize) -> rcgen::KeyPair {
    pooled_key(2048, slot)
}

/// Run a command, returning its output whatever the exit status.
pub fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

/// Run a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `openssl` with arguments.
pub fn openssl(args: &[&str]) -> Command {
    let mut c = Command::new("openssl");
    c.args(args);
    c
}

/// Write `contents` to `dir/name` and return the path.
pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, contents).expect("write fixture file");
    p
}

/// True when running as root (namespace and TUN tests need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

pub mod attacklab;
pub mod cluster;
pub mod etcd;
pub mod fakeagent;
pub mod inproc;
pub mod janitor;
pub mod meshlab;
pub mod pebble;
pub mod webcurl;

/// True when `cmd` is on the PATH.
pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
pub mod browser;
pub mod edge;
pub mod journal;
pub mod nginx;
pub mod sshlab;
pub mod tlsprobe;
