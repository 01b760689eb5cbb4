//! The admin CLI against a running controller: every list's `--json` holds the same rows
//! and values as its table, and `node revoke` takes a bare node name when it is unique.

use serde_json::Value;
use std::path::Path;
use tempfile::TempDir;
use zonemesh_proto as pb;
use zonemesh_tests::cluster::{Controller, mesh_channel};

const EMAIL: &str = "ops@corp.test";

/// The table's data lines (everything after the title line).
fn data_lines(table: &str) -> Vec<&str> {
    table.lines().skip(1).collect()
}

/// `line` shows every value, in this order.
fn assert_row(line: &str, values: &[String]) {
    let mut rest = line;
    for v in values {
        let at = rest
            .find(v.as_str())
            .unwrap_or_else(|| panic!("{v:?} not in table line {line:?} (in order)"));
        rest = &rest[at + v.len()..];
    }
}

/// A JSON string or number as the table shows it.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn rfc3339(secs: &Value) -> String {
    zonemesh_controller::cli::render::fmt_unix(secs.as_u64().unwrap())
}

/// The table and the `--json` of one list command.
fn both(ctl: &Controller, args: &[&str]) -> (String, String) {
    let table = ctl.admin_ok(args).unwrap();
    let mut with_json = args.to_vec();
    with_json.push("--json");
    (table, ctl.admin_ok(&with_json).unwrap())
}

/// Each JSON row against its table line, by the fields the table shows.
fn check_list(table: &str, rows: &[Value], fields: impl Fn(&Value) -> Vec<String>) {
    let lines = data_lines(table);
    assert_eq!(lines.len(), rows.len(), "table:\n{table}\njson: {rows:?}");
    for (line, row) in lines.iter().zip(rows) {
        assert_row(line, &fields(row));
    }
}

/// One wrong sign-in from 127.0.0.1, so `throttle list` has a row.
fn wrong_sign_in(ctl: &Controller, dir: &Path) {
    assert_eq!(
        ctl.curl_sign_in(dir, "127.0.0.1", EMAIL, "not the password"),
        401
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_tables_agree_and_bare_node_names_resolve() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    ctl.zone_add("us", "100.64.2.0/24").unwrap();
    let a_eu = ctl.enroll_in_zone("eu", "a", 0).await;
    ctl.enroll_in_zone("us", "a", 1).await;
    ctl.enroll_in_zone("eu", "solo", 2).await;

    // Bare names: ambiguous fails with the candidates, unique revokes.
    let out = ctl.admin(&["node", "revoke", "a"]).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ambiguous") && err.contains("eu/a") && err.contains("us/a"),
        "{err}"
    );
    let revoked = ctl.admin_ok(&["node", "revoke", "solo"]).unwrap();
    assert!(
        revoked.starts_with("node eu/solo revoked (serial "),
        "{revoked}"
    );
    let solo = ctl
        .nodes()
        .unwrap()
        .into_iter()
        .find(|n| n["node"] == "solo")
        .unwrap();
    assert_eq!(solo["revoked"], true);
    let out = ctl.admin(&["node", "revoke", "nobody"]).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node nobody"));

    // Something in every list.
    pb::mesh_client::MeshClient::new(mesh_channel(&ctl.grpc_addr(), &a_eu).await.unwrap())
        .report_health(pb::HealthReport {
            peers: vec![pb::PeerHealth {
                peer: "us/a".into(),
                loss: 0.25,
                rtt_micros: 1500,
            }],
        })
        .await
        .unwrap();
    ctl.admin_ok(&["block", "add", "192.0.2.9", "--reason", "scanning us"])
        .unwrap();
    ctl.admin_with_stdin(
        &["user", "add", "--email", EMAIL, "--role", "portal-owner"],
        "a long enough passphrase here\n",
    );
    wrong_sign_in(&ctl, tmp.path());

    let (table, json) = both(&ctl, &["zone", "list"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 2);
    check_list(&table, &rows, |z| {
        ["name", "cidr", "nodes", "intra_zone_tunnels"]
            .iter()
            .map(|k| cell(&z[*k]))
            .collect()
    });

    let (table, json) = both(&ctl, &["node", "list"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 3);
    check_list(&table, &rows, |n| {
        vec![
            format!("{}/{}", cell(&n["zone"]), cell(&n["node"])),
            cell(&n["overlay_ip"]),
            cell(&n["serial"]),
            rfc3339(&n["not_after_unix"]),
            if n["revoked"] == true {
                "revoked"
            } else {
                "active"
            }
            .into(),
        ]
    });

    let (table, json) = both(&ctl, &["block", "list"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert!(rows.iter().any(|b| b["address"] == "192.0.2.9"), "{json}");
    check_list(&table, &rows, |b| {
        vec![
            cell(&b["address"]),
            rfc3339(&b["since_unix"]),
            rfc3339(&b["until_unix"]),
            if b["offence"] == 0 {
                "manual".into()
            } else {
                cell(&b["offence"])
            },
            cell(&b["reason"]),
        ]
    });

    ctl.admin_ok(&["block", "allow", "198.51.100.0/24", "--note", "the office"])
        .unwrap();
    let (table, json) = both(&ctl, &["block", "allow", "--list"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 1, "{json}");
    check_list(&table, &rows, |a| {
        vec![
            cell(&a["cidr"]),
            rfc3339(&a["added_unix"]),
            cell(&a["note"]),
        ]
    });

    let (table, json) = both(&ctl, &["health"]);
    let matrix: Value = serde_json::from_str(&json).unwrap();
    let rows = matrix["pairs"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 1, "{json}");
    check_list(&table, &rows, |r| {
        vec![
            cell(&r["node"]),
            cell(&r["peer"]),
            format!("{:.0}%", r["loss"].as_f64().unwrap() * 100.0),
            format!("{:.2}ms", r["rtt_micros"].as_f64().unwrap() / 1000.0),
        ]
    });

    let (table, json) = both(&ctl, &["user", "list"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 1, "{json}");
    check_list(&table, &rows, |u| {
        vec![
            cell(&u["email"]),
            cell(&u["role"]),
            if u["disabled"] == true {
                "disabled"
            } else {
                "active"
            }
            .into(),
            if u["totp_confirmed"] == true {
                "yes"
            } else {
                "no"
            }
            .into(),
            cell(&u["recovery_codes_left"]),
        ]
    });

    let (table, json) = both(&ctl, &["throttle", "list"]);
    let list: Value = serde_json::from_str(&json).unwrap();
    let rows = list["rows"].as_array().unwrap();
    assert!(!rows.is_empty(), "{json}");
    check_list(&table, rows, |r| {
        vec![
            r["account"].as_str().unwrap_or("*").to_string(),
            r["source"]
                .as_str()
                .unwrap_or("(sources not known good)")
                .to_string(),
            cell(&r["failures"]),
            format!("{}s", r["wait_secs"]),
        ]
    });

    let (table, json) = both(&ctl, &["audit"]);
    let rows: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.iter().any(|r| r["kind"] == "node.revoked"), "{json}");
    check_list(&table, &rows, |r| {
        vec![
            cell(&r["seq"]),
            cell(&r["kind"]),
            cell(&r["outcome"]),
            r["actor"].as_str().unwrap_or("-").to_string(),
            r["subject"].as_str().unwrap_or("-").to_string(),
            r["source"].as_str().unwrap_or("-").to_string(),
            r["detail"].as_str().unwrap_or("").to_string(),
        ]
    });

    // SSH grants and certificates.
    ctl.admin_ok(&[
        "ssh",
        "grant",
        "--email",
        EMAIL,
        "--zone",
        "eu",
        "--principal",
        "deploy",
        "--max-ttl",
        "4h",
        "--allow",
        "agent-forwarding",
    ])
    .unwrap();
    let key = tmp.path().join("id");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti u\n",
    )
    .unwrap();
    let out = tmp.path().join("id-cert.pub");
    ctl.admin_ok(&[
        "ssh",
        "sign-user",
        "--email",
        EMAIL,
        "--pubkey",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ])
    .unwrap();
    let (table, json) = both(&ctl, &["ssh", "grants"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 1);
    check_list(&table, &rows, |g| {
        vec![
            cell(&g["email"]),
            cell(&g["zone"]),
            cell(&g["principal"]),
            cell(&g["certificate_principal"]),
            "4h".into(),
            "permit-pty,permit-agent-forwarding".into(),
        ]
    });
    let (table, json) = both(&ctl, &["ssh", "certs"]);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 1);
    check_list(&table, &rows, |c| {
        vec![
            cell(&c["serial"]),
            cell(&c["kind"]),
            cell(&c["key_id"]),
            "deploy@eu".into(),
            rfc3339(&c["valid_before_unix"]),
            "valid".into(),
        ]
    });

    let (text, json) = both(&ctl, &["ca", "show"]);
    let ca: Value = serde_json::from_str(&json).unwrap();
    let certs = ca["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{json}");
    assert!(text.starts_with(&format!("trust domain: {}\n", cell(&ca["trust_domain"]))));
    for c in certs {
        assert_eq!(c["state"], "active", "{json}");
        assert!(
            text.contains(&format!(
                "{} ({}, {}):\n  subject:    {}\n  issuer:     {}\n  sha256:     {}\n  key:        RSA-{}\n  not before: {}\n  not after:  {}\n",
                cell(&c["id"]),
                cell(&c["kind"]),
                cell(&c["state"]),
                cell(&c["subject"]),
                cell(&c["issuer"]),
                cell(&c["sha256"]),
                c["key_bits"],
                cell(&c["not_before"]),
                cell(&c["not_after"])
            )),
            "{text}"
        );
    }
}
