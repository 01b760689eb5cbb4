//! A CA rotation or retirement is one store transaction, planned from the records the
//! controller holds: a store that fails the commit leaves the CA as it was (nothing
//! half-written), and a controller whose records are stale (another controller of the
//! same store rotated meanwhile) is refused with a clear error instead of writing a
//! second active intermediate over the first (records it would change must be stored as
//! it holds them, and the ones it adds absent). Once it has reloaded, it rotates.

use anyhow::Result;
use std::time::{Duration, SystemTime};
use zonemesh_controller::authority::Authority;
use zonemesh_controller::secrets::KekSource;
use zonemesh_controller::store::Store;
use zonemesh_tests::faultkv::Faulty;

/// `(id, state)` of every CA certificate, as stored (a fresh load) and sorted.
fn stored(store: &Store, kek: &zonemesh_ca::Kek) -> Result<Vec<(String, String)>> {
    states(&Authority::load(store.clone(), kek, SystemTime::now())?)
}

fn states(a: &Authority) -> Result<Vec<(String, String)>> {
    let mut v: Vec<(String, String)> = a
        .ca_certificates()
        .into_iter()
        .map(|c| (c.id, c.state))
        .collect();
    v.sort();
    Ok(v)
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = p
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    v.sort();
    v
}

#[test]
fn rotations_apply_whole_or_not_at_all_and_never_over_a_newer_ca() -> Result<()> {
    let (plane, faulty) = Faulty::plane()?;
    let kek = KekSource::new(&plane.dir.path().join("ctl"), None).load()?;
    let now = SystemTime::now();
    let spread = Duration::from_secs(60);
    let a = plane.auth.clone();
    let b = Authority::load(plane.store.clone(), &kek, now)?;
    let initial = pairs(&[("root-1", "active"), ("int-1", "active")]);
    assert_eq!(stored(&plane.store, &kek)?, initial);

    // The store refuses the commit: nothing changes, in the store or in A.
    faulty.set_failing(true);
    let err = a.rotate_intermediate(spread, now).unwrap_err();
    faulty.set_failing(false);
    println!("refused by the store: {err}");
    assert_eq!(stored(&plane.store, &kek)?, initial);
    assert_eq!(states(&a)?, initial);

    // A rotates.
    a.rotate_intermediate(spread, now)?;
    let after_a = pairs(&[
        ("root-1", "active"),
        ("int-1", "retiring"),
        ("int-2", "active"),
    ]);
    assert_eq!(stored(&plane.store, &kek)?, after_a);
    let int2 = a.chain()[0].clone();

    // B still holds the records from before: its rotation is refused, and A's
    // intermediate stays the one in force.
    let err = b.rotate_intermediate(spread, now).unwrap_err();
    assert!(
        err.to_string().contains("changed by another controller"),
        "{err}"
    );
    assert_eq!(stored(&plane.store, &kek)?, after_a);
    let fresh = Authority::load(plane.store.clone(), &kek, now)?;
    assert_eq!(fresh.chain()[0], int2, "B wrote no intermediate of its own");

    // Once B has taken A's rotation in, it rotates; now A is the stale one, and a root
    // rotation planned from its records is refused until it reloads too.
    assert!(b.reload_ca(now)?);
    b.rotate_intermediate(spread, now)?;
    let after_b = pairs(&[
        ("root-1", "active"),
        ("int-1", "retiring"),
        ("int-2", "retiring"),
        ("int-3", "active"),
    ]);
    assert_eq!(stored(&plane.store, &kek)?, after_b);
    let grace = Duration::from_secs(3600);
    let err = a.rotate_root(grace, spread, now).unwrap_err();
    assert!(
        err.to_string().contains("changed by another controller"),
        "{err}"
    );
    assert_eq!(stored(&plane.store, &kek)?, after_b);
    assert!(a.reload_ca(now)?);
    a.rotate_root(grace, spread, now)?;
    let s = stored(&plane.store, &kek)?;
    assert!(s.contains(&("root-2".into(), "active".into())), "{s:?}");
    assert!(s.contains(&("int-4".into(), "active".into())), "{s:?}");
    let active = s.iter().filter(|(_, st)| st == "active").count();
    assert_eq!(active, 2, "one root and one intermediate in force: {s:?}");

    // Retirement after the grace, through B once it has taken the new root in: the old
    // root and everything under it, in one transaction.
    let later = now + grace + Duration::from_secs(1);
    assert!(b.reload_ca(now)?);
    let retired: Vec<String> = b.retire_due(later)?.into_iter().map(|c| c.id).collect();
    assert!(retired.contains(&"root-1".to_string()), "{retired:?}");
    let s = stored(&plane.store, &kek)?;
    assert!(s.contains(&("root-1".into(), "retired".into())), "{s:?}");
    assert!(s.contains(&("int-4".into(), "active".into())), "{s:?}");
    Ok(())
}
