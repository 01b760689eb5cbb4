//! The Debian packages (root): `scripts/package.sh --debug` builds both from the debug
//! binaries, `lintian` finds no error, `dpkg -i` installs binaries, units, configuration,
//! man pages, completions and the system user, `systemd-analyze verify` accepts the
//! installed units, the installed controller initialises a data directory from the
//! installed configuration, and `dpkg -r` / `dpkg -P` remove the package without removing
//! the data directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use zonemesh_tests::{have, is_root, run, run_ok, target_dir};

const PACKAGES: [&str; 2] = ["zonemesh-controller", "zonemesh-agent"];
const DATA_DIR: &str = "/var/lib/zonemesh";

fn skip() -> Option<String> {
    if !is_root() {
        return Some("packaging test needs root (dpkg -i)".into());
    }
    for tool in ["cargo-deb", "lintian", "systemd-analyze", "dpkg", "runuser"] {
        if !have(tool) {
            return Some(format!("{tool} not installed"));
        }
    }
    for p in PACKAGES {
        if run(Command::new("dpkg").args(["-s", p])).is_ok_and(|o| o.status.success()) {
            return Some(format!("{p} is already installed on this machine"));
        }
    }
    if Path::new(DATA_DIR).exists() {
        return Some(format!("{DATA_DIR} already exists on this machine"));
    }
    None
}

/// Purges whatever this test installed and the data directory it created, even when an
/// assertion failed half-way.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").arg("-P").args(PACKAGES).output();
        let _ = std::fs::remove_dir_all(DATA_DIR);
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn packages_pass_lintian_install_with_units_config_and_user_and_remove_keeping_the_data() {
    if let Some(why) = skip() {
        println!("skipped: {why}");
        return;
    }
    let out = run_ok(
        Command::new(workspace().join("scripts/package.sh"))
            .arg("--debug")
            .env("CARGO_TARGET_DIR", target_dir()),
    )
    .unwrap();
    let debs: Vec<PathBuf> = out
        .lines()
        .filter(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .collect();
    assert_eq!(debs.len(), 2, "{out}");
    for (deb, name) in debs.iter().zip(PACKAGES) {
        assert!(
            deb.exists() && deb.to_string_lossy().contains(name),
            "{deb:?}"
        );
    }

    let lint = run(Command::new("lintian")
        .args(["--tag-display-limit", "0"])
        .args(&debs))
    .unwrap();
    let text = String::from_utf8_lossy(&lint.stdout);
    assert!(
        !text.lines().any(|l| l.starts_with("E: ")),
        "lintian errors:\n{text}"
    );
    assert!(lint.status.success(), "lintian failed: {text}");
    println!("lintian:\n{text}");

    let _cleanup = Installed;
    run_ok(Command::new("dpkg").arg("-i").args(&debs)).unwrap();
    let installed = [
        "/usr/bin/zonemesh-controller",
        "/usr/bin/zonemesh-agent",
        "/usr/lib/systemd/system/zonemesh-controller.service",
        "/usr/lib/systemd/system/zonemesh-agent.service",
        "/etc/zonemesh/controller.toml",
        "/etc/zonemesh/agent.toml",
        "/usr/share/man/man1/zonemesh-controller.1.gz",
        "/usr/share/man/man1/zonemesh-controller-backup.1.gz",
        "/usr/share/man/man1/zonemesh-agent-run.1.gz",
        "/usr/share/bash-completion/completions/zonemesh-controller",
        "/usr/share/zsh/vendor-completions/_zonemesh-agent",
        "/usr/share/doc/zonemesh-agent/edge.conf",
    ];
    for f in installed {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    // The binaries are stripped.
    let file = run_ok(Command::new("file").arg("/usr/bin/zonemesh-controller"));
    if let Ok(f) = file {
        assert!(f.contains("stripped") && !f.contains("not stripped"), "{f}");
    }
    // The system user, without a login shell.
    let user = run_ok(Command::new("getent").args(["passwd", "zonemesh"])).unwrap();
    let fields: Vec<&str> = user.trim().split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    assert!(uid < 1000, "not a system user: {user}");
    assert_eq!(fields[5], DATA_DIR);
    assert!(fields[6].ends_with("nologin"), "{user}");

    // The installed units pass systemd's own check, with nothing to warn about.
    let verify = run(Command::new("systemd-analyze").args([
        "verify",
        "/usr/lib/systemd/system/zonemesh-controller.service",
        "/usr/lib/systemd/system/zonemesh-agent.service",
    ]))
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(verify.status.success(), "{said}");
    assert!(
        !said.contains("zonemesh"),
        "systemd-analyze complains about our units: {said}"
    );
    let unit = std::fs::read_to_string("/usr/lib/systemd/system/zonemesh-agent.service").unwrap();
    for line in [
        "CapabilityBoundingSet=CAP_NET_ADMIN\n",
        "Restart=on-failure\n",
        "ProtectSystem=strict\n",
        "StateDirectory=zonemesh-agent\n",
    ] {
        assert!(unit.contains(line), "agent unit lacks {line:?}");
    }

    // The installed controller, as its user, from the installed configuration (what
    // StateDirectory= would create first).
    std::fs::create_dir(DATA_DIR).unwrap();
    run_ok(Command::new("chown").args(["zonemesh:zonemesh", DATA_DIR])).unwrap();
    run_ok(Command::new("chmod").args(["700", DATA_DIR])).unwrap();
    let as_zonemesh = |args: &[&str]| {
        run_ok(
            Command::new("runuser")
                .args(["-u", "zonemesh", "--", "/usr/bin/zonemesh-controller"])
                .args(["--config", "/etc/zonemesh/controller.toml"])
                .args(args)
                .env_remove("ZONEMESH_DATA_DIR"),
        )
        .unwrap()
    };
    as_zonemesh(&["init", "--trust-domain", "pkg.test"]);
    let ca = as_zonemesh(&["ca", "show", "--json"]);
    assert!(ca.contains("pkg.test"), "{ca}");
    run_ok(Command::new("/usr/bin/zonemesh-agent").args([
        "--config",
        "/etc/zonemesh/agent.toml",
        "run",
        "--help",
    ]))
    .unwrap();

    // Remove: binaries and units go, configuration (conffiles) stays until purge, the
    // data directory stays in both cases.
    run_ok(Command::new("dpkg").arg("-r").args(PACKAGES)).unwrap();
    for f in &installed[..4] {
        assert!(!Path::new(f).exists(), "{f} left after dpkg -r");
    }
    assert!(Path::new("/etc/zonemesh/controller.toml").exists());
    assert!(
        Path::new(DATA_DIR).join("db").exists(),
        "dpkg -r removed the data"
    );
    run_ok(Command::new("dpkg").arg("-P").args(PACKAGES)).unwrap();
    assert!(!Path::new("/etc/zonemesh/controller.toml").exists());
    assert!(
        Path::new(DATA_DIR).join("secrets").exists(),
        "dpkg -P removed the data"
    );
}
