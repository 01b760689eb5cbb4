//! The data directory holds the audit log, password hashes and sealed CA keys: `init`
//! makes it private, and `serve` refuses one that other local users can read.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tempfile::TempDir;
use zonemesh_tests::cluster::Controller;

/// Every path under `dir` (itself included) whose mode lets group or others in.
fn shared_paths(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push(format!("{} {mode:o}", p.display()));
        }
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
    }
    out
}

#[test]
fn init_makes_a_private_data_dir_and_serve_refuses_a_shared_one() {
    let dir = TempDir::new().unwrap();
    let mut ctl = Controller::init(dir.path()).unwrap();
    let mode = std::fs::metadata(&ctl.data_dir)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "data directory after init");
    let shared = shared_paths(&ctl.data_dir);
    assert!(
        shared.is_empty(),
        "readable by others after init: {shared:?}"
    );

    // What serve writes (sled segments, the admin socket, audit records) stays private too.
    ctl.start().unwrap();
    ctl.zone_add("fra1", "100.64.1.0/24").unwrap();
    ctl.token("fra1", 1).unwrap();
    let shared = shared_paths(&ctl.data_dir);
    assert!(
        shared.is_empty(),
        "readable by others while serving: {shared:?}"
    );
    ctl.sigterm(Duration::from_secs(10)).unwrap();

    for (path, what) in [
        (ctl.data_dir.clone(), "data directory"),
        (ctl.data_dir.join("db"), "database directory"),
    ] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = ctl
            .start()
            .expect_err("serve must refuse a directory others can read");
        let text = err.to_string();
        assert!(
            text.contains(what) && text.contains(&format!("chmod 700 {}", path.display())),
            "{text}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    ctl.start().unwrap();
}
