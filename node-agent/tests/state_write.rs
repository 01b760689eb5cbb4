//! The agent's atomic file writes never follow a link planted in its state directory.

use std::os::unix::fs::PermissionsExt;
use zonemesh_agent::control::state::write_file;

#[test]
fn write_file_never_follows_a_planted_symlink() {
    let d = tempfile::tempdir().unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let target = d.path().join("node.key");
    // The name the agent used to write through, pointing at a file it must not touch.
    std::os::unix::fs::symlink(&victim, d.path().join(".node.key.tmp")).unwrap();
    write_file(&target, b"secret key", 0o600).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(std::fs::read(&target).unwrap(), b"secret key");
    let meta = std::fs::symlink_metadata(&target).unwrap();
    assert!(meta.file_type().is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp") && n != ".node.key.tmp")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
