//! A node's revocation and the revocation of its SSH host certificates cannot come apart:
//! the node's revocation transaction leaves a marker in the store, and
//! `Ssh::finish_host_revocations` (run after each `node revoke`, at start-up and on the
//! leader's sweep) revokes the host certificates and only then clears it. Here the
//! controller "stops" between the two steps (the node is revoked on the Mesh alone), a
//! new `Ssh` is opened on the same store as a restart does, and the certificate ends up on
//! the KRL, as `ssh-keygen -Q` reads it. A node enrolled again under the same name keeps
//! its new host certificate.

use anyhow::Result;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use zonemesh_ca::{Kek, RevocationReason};
use zonemesh_controller::secrets::KekSource;
use zonemesh_controller::ssh::{CaKeyType, Ssh, generate_key};
use zonemesh_controller::store::node_key;
use zonemesh_tests::inproc::{Plane, SharedClock};
use zonemesh_tests::{have, run};

fn open_ssh(plane: &Plane, kek: &Kek) -> Result<Arc<Ssh>> {
    let ssh = Ssh::with_clock(
        &plane.store,
        kek,
        "ssh-txn.test",
        None,
        Arc::new(SharedClock(plane.clock.clone())),
    )?;
    ssh.attach_mesh(plane.mesh.clone())?;
    Ok(ssh)
}

/// Sign a fresh host key for node `nkey`; the certificate in OpenSSH form and its serial.
fn host_cert(plane: &Plane, ssh: &Ssh, nkey: &str) -> Result<(String, u64)> {
    let node = plane.store.node(nkey)?.expect("enrolled");
    let key = generate_key(CaKeyType::Ed25519, "host")?;
    let resp = ssh.sign_host(&node, &key.public_key().to_openssh()?)?;
    let serial = ssh
        .certs(None)?
        .into_iter()
        .filter(|c| c.key_id == nkey)
        .map(|c| c.serial)
        .max()
        .expect("recorded");
    Ok((resp.certificate, serial))
}

fn revoked(ssh: &Ssh, serial: u64) -> Result<bool> {
    Ok(ssh
        .certs(None)?
        .iter()
        .any(|c| c.serial == serial && c.revoked))
}

/// Whether `ssh-keygen -Q` finds `cert` revoked in `ssh`'s KRL.
fn keygen_says_revoked(ssh: &Ssh, cert: &str, dir: &std::path::Path) -> Result<bool> {
    let (krl, c) = (dir.join("krl"), dir.join("host-cert.pub"));
    std::fs::write(&krl, ssh.krl()?)?;
    std::fs::write(&c, format!("{cert}\n"))?;
    let o = run(Command::new("ssh-keygen")
        .arg("-Q")
        .arg("-f")
        .arg(&krl)
        .arg(&c))?;
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    Ok(!o.status.success() && text.contains("REVOKED"))
}

#[test]
fn host_certificates_of_a_node_revoked_just_before_a_stop_are_revoked_on_restart() -> Result<()> {
    let plane = Plane::new()?;
    // `init` made the SSH CA, sealed with the installation's KEK.
    let kek = KekSource::new(&plane.dir.path().join("ctl"), None).load()?;
    let ssh = open_ssh(&plane, &kek)?;
    plane.enroll("eu", "web1", 0, [1; 32])?;
    plane.enroll("eu", "web2", 1, [2; 32])?;
    let (a, b) = (node_key("eu", "web1"), node_key("eu", "web2"));
    let (cert_a, serial_a) = host_cert(&plane, &ssh, &a)?;
    let (_, serial_b) = host_cert(&plane, &ssh, &b)?;

    let before = plane.store.node(&a)?.expect("enrolled");
    // The node's revocation commits; the controller stops before its second step.
    plane
        .mesh
        .revoke_node(&a, RevocationReason::KeyCompromise, plane.mesh.now())?;
    assert!(!revoked(&ssh, serial_a)?, "the second step has not run yet");
    // A host certificate asked for by the node as its revocation commits (its caller
    // check passed just before) is refused.
    let late = ssh.sign_host(
        &before,
        &generate_key(CaKeyType::Ed25519, "late")?
            .public_key()
            .to_openssh()?,
    );
    let err = late.expect_err("signed for a revoked node").to_string();
    assert!(err.contains("is revoked"), "{err}");
    let pending = plane.store.pending_host_revocations()?;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].0, a);
    drop(ssh);

    // A restart: the same store, a new Ssh, the start-up pass.
    let ssh = open_ssh(&plane, &kek)?;
    let done = ssh.finish_host_revocations("controller")?;
    assert_eq!(done, vec![serial_a]);
    assert!(revoked(&ssh, serial_a)?);
    assert!(
        !revoked(&ssh, serial_b)?,
        "the other node keeps its certificate"
    );
    assert!(plane.store.pending_host_revocations()?.is_empty());
    let listed: Vec<u64> = ssh.revoked_hosts()?.iter().map(|h| h.serial).collect();
    assert_eq!(listed, vec![serial_a]);
    if have("ssh-keygen") {
        let dir = tempfile::tempdir()?;
        assert!(keygen_says_revoked(&ssh, &cert_a, dir.path())?);
    } else {
        println!("ssh-keygen not installed: the KRL is not checked with OpenSSH");
    }
    // Nothing left: a second pass revokes nothing.
    assert!(ssh.finish_host_revocations("controller")?.is_empty());

    // Enrolled again under the same name: its new host certificate stays valid, even
    // through a later pass.
    plane.clock.advance(Duration::from_secs(2));
    plane.enroll("eu", "web1", 2, [3; 32])?;
    let (cert_new, serial_new) = host_cert(&plane, &ssh, &a)?;
    assert!(ssh.finish_host_revocations("controller")?.is_empty());
    assert!(!revoked(&ssh, serial_new)?);
    if have("ssh-keygen") {
        let dir = tempfile::tempdir()?;
        assert!(!keygen_says_revoked(&ssh, &cert_new, dir.path())?);
    }

    // The one path `node revoke` and the console take does both steps.
    zonemesh_controller::ssh::revoke_node(
        &plane.mesh,
        Some(&ssh),
        &a,
        RevocationReason::Superseded,
        plane.mesh.now(),
        "cli",
    )?;
    assert!(revoked(&ssh, serial_new)?);
    assert!(plane.store.pending_host_revocations()?.is_empty());
    Ok(())
}
