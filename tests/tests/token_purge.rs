//! Used-up and expired enrollment tokens are purged from the store once they have been
//! unusable for the grace period (7 days, so `token list --all` still shows recent ones);
//! live tokens, and tokens with uses left, stay.

use std::time::{Duration, SystemTime};
use zonemesh_controller::mesh::TOKEN_PURGE_GRACE;
use zonemesh_tests::cluster::wg_key;
use zonemesh_tests::inproc::Plane;

#[test]
fn used_up_and_expired_tokens_go_after_the_grace_and_live_ones_stay() {
    let plane = Plane::new().unwrap();
    let mesh = &plane.mesh;
    let now = SystemTime::now();
    // A used-up token (Plane::enroll takes a one-use token and uses it).
    plane.enroll("eu", "n1", 0, wg_key(1)).unwrap();
    let expiring = mesh
        .create_token("eu", Duration::from_secs(60), 1, now)
        .unwrap();
    let _live = mesh
        .create_token("eu", Duration::from_secs(30 * 86_400), 1, now)
        .unwrap();
    let _partly_used = mesh
        .create_token("eu", Duration::from_secs(30 * 86_400), 5, now)
        .unwrap();
    assert_eq!(plane.store.tokens().unwrap().len(), 4);

    // Within the grace nothing goes, used up or expired.
    assert_eq!(mesh.purge_tokens(now).unwrap(), 0);
    let expired_at = SystemTime::UNIX_EPOCH + Duration::from_secs(expiring.expires_unix);
    assert_eq!(
        mesh.purge_tokens(expired_at + TOKEN_PURGE_GRACE - Duration::from_secs(120))
            .unwrap(),
        0
    );
    assert_eq!(plane.store.tokens().unwrap().len(), 4);

    // Past it, the used-up and the expired token go; the others stay.
    let later = now + TOKEN_PURGE_GRACE + Duration::from_secs(3600);
    assert_eq!(mesh.purge_tokens(later).unwrap(), 2);
    let left = plane.store.tokens().unwrap();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter()
            .all(|(_, t)| t.uses_left > 0
                && t.expires_unix > zonemesh_controller::store::unix(later)),
        "{left:?}"
    );
    // Running again removes nothing more.
    assert_eq!(mesh.purge_tokens(later).unwrap(), 0);
}
