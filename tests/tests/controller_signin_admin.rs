//! The sign-in admin commands of a real controller, driven through its CLI and its HTTPS
//! listener (curl from a chosen loopback source): `throttle list` shows a failing source,
//! `throttle clear --source` clears it, and `user passwd` replaces a password and ends the
//! user's sessions. All of it audited.

use zonemesh_tests::cluster::Controller;

const EMAIL: &str = "ops@corp.test";
const ATTACKER: &str = "127.0.0.2";

#[test]
fn throttle_list_clear_and_user_passwd_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Controller::start_new(dir.path()).unwrap();
    let root = ctl.admin_ok(&["ca", "export", "--root"]).unwrap();
    std::fs::write(dir.path().join("root.pem"), root).unwrap();
    ctl.admin_with_stdin(
        &["user", "add", "--email", EMAIL, "--role", "portal-owner"],
        "the first long passphrase\n",
    );
    assert_eq!(
        ctl.curl_sign_in(dir.path(), "127.0.0.3", EMAIL, "the first long passphrase"),
        303
    );

    // Four wrong passwords from the attacker: the default schedule's free failures and one.
    for i in 0..4 {
        assert_eq!(
            ctl.curl_sign_in(dir.path(), ATTACKER, EMAIL, &format!("guess {i}")),
            401
        );
    }
    assert_eq!(
        ctl.curl_sign_in(dir.path(), ATTACKER, EMAIL, "guess 5"),
        429
    );
    let list: serde_json::Value =
        serde_json::from_str(&ctl.admin_ok(&["throttle", "list", "--json"]).unwrap()).unwrap();
    let rows = list["rows"].as_array().unwrap();
    let src = rows
        .iter()
        .find(|r| r["source"] == ATTACKER && r["account"].is_null())
        .unwrap_or_else(|| panic!("attacker listed: {list}"));
    assert_eq!(src["failures"], 4);
    assert!(src["wait_secs"].as_u64().unwrap() >= 1);
    let human = ctl.admin_ok(&["throttle", "list"]).unwrap();
    assert!(human.contains(ATTACKER) && human.contains(EMAIL), "{human}");

    let out = ctl
        .admin_ok(&["throttle", "clear", "--source", ATTACKER])
        .unwrap();
    assert!(out.contains("cleared"), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&ctl.admin_ok(&["throttle", "list", "--json"]).unwrap()).unwrap();
    assert!(
        list["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["source"] != ATTACKER),
        "{list}"
    );
    // Exactly one of --email and --source.
    assert!(!ctl.admin(&["throttle", "clear"]).unwrap().status.success());

    // The operator sets a new password: the old one stops working, the new one works.
    let out = ctl.admin_with_stdin(
        &["user", "passwd", "--email", EMAIL],
        "the second long passphrase\n",
    );
    assert!(out.contains("1 session(s) ended"), "{out}");
    assert_eq!(
        ctl.curl_sign_in(dir.path(), "127.0.0.3", EMAIL, "the first long passphrase"),
        401
    );
    assert_eq!(
        ctl.curl_sign_in(dir.path(), "127.0.0.3", EMAIL, "the second long passphrase"),
        303
    );
    let audit = ctl.admin_ok(&["audit", "--json"]).unwrap();
    let kinds: Vec<String> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].to_string())
        .map(|k| k.trim_matches('"').to_string())
        .collect();
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    assert!(kinds.contains(&"throttle.cleared"), "{kinds:?}");
    assert!(kinds.contains(&"user.password-changed"), "{kinds:?}");
    ctl.sigterm(std::time::Duration::from_secs(10)).unwrap();
}
