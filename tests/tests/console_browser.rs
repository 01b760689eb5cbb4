//! Headless Chromium drives the admin console against a real controller: an admin (TOTP
//! set up through the page) adds a zone, creates a token, copies the enroll command from
//! the page and runs it (`zonemesh-agent enroll` as a real process), sees the node listed,
//! revokes it through the confirmation step and sees it revoked; the node's certificate
//! is then refused over mTLS.

use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use zonemesh_tests::browser::{self, Browser};
use zonemesh_tests::cluster::{Controller, NodeCreds, watch_served};

const ADMIN: &str = "console-browser@example.com";
const PASSWORD: &str = "a long enough passphrase here";
const WAIT: Duration = Duration::from_secs(20);

/// Run the command copied from the page on "the new server": its state directory is
/// `state` (the page names the package's), holding a pooled RSA-4096 key already so
/// no key is generated, and the node is called `name`.
fn run_pasted(command: &str, state: &Path, name: &str) -> Result<String> {
    let agent = zonemesh_tests::bin("zonemesh-agent");
    let bin_dir = agent.parent().context("bin dir")?;
    if !command.contains(" --state-dir /var/lib/zonemesh-agent") {
        bail!("the command names no state directory: {command}");
    }
    let dir = zonemesh_agent::control::state::StateDir::new(state);
    dir.create()?;
    zonemesh_agent::control::state::write_file(
        &dir.node_key(),
        zonemesh_ca::to_pem("PRIVATE KEY", &zonemesh_tests::rsa4096(0).serialize_der()).as_bytes(),
        0o600,
    )?;
    let command = command.replace(
        " --state-dir /var/lib/zonemesh-agent",
        &format!(" --state-dir {}", state.display()),
    );
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    zonemesh_tests::run_ok(
        Command::new("sh")
            .arg("-c")
            .arg(format!("{command} --name {name}"))
            .env("PATH", path)
            .env_remove("ZONEMESH_TOKEN"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_adds_a_zone_creates_a_token_enrolls_with_the_pasted_command_and_revokes()
-> Result<()> {
    if let Some(why) = browser::sign_in_skip_reason() {
        println!("skipped: {why}");
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let ctl = Controller::start_new(tmp.path())?;
    ctl.admin_with_stdin(
        &["user", "add", "--email", ADMIN, "--role", "admin"],
        &format!("{PASSWORD}\n"),
    );
    let base = format!("https://localhost:{}", ctl.https.port());
    let br = Browser::start()?;
    br.sign_in_new_admin(&base, ADMIN, PASSWORD)?;

    // The Admin entry, then the zone.
    br.click("#admin-link")?;
    br.wait_url("/admin", WAIT)?;
    br.click("#admin-zones")?;
    br.wait_url("/admin/zones", WAIT)?;
    br.type_into("#name", "lab")?;
    br.type_into("#cidr", "100.64.30.0/24")?;
    br.click("#add")?;
    br.wait_for("tr[data-zone=\"lab\"]", WAIT)?;
    assert!(
        br.text("tr[data-zone=\"lab\"]")?.contains("100.64.30.0/24"),
        "{}",
        br.source()?
    );
    assert!(ctl.admin_ok(&["zone", "list"])?.contains("lab"));

    // A token, and the command to paste.
    br.click("#admin-tokens")?;
    br.wait_url("/admin/tokens", WAIT)?;
    br.type_into("#uses", "1")?;
    br.type_into("#ttl", "30m")?;
    br.click("#create")?;
    br.wait_for("#enroll-command", WAIT)?;
    let command = br.text("#enroll-command")?;
    assert!(
        command.starts_with("ZONEMESH_TOKEN='zmt_")
            && command.contains(&format!("--ca-fingerprint {}", ctl.fingerprint))
            && command.contains(&format!("--controller {}", ctl.grpc_addr()))
            && command.contains("--zone lab"),
        "{command}"
    );
    // Shown once: the token list no longer holds it.
    let token = br.text("#token")?;
    br.click("#admin-tokens")?;
    br.wait_url("/admin/tokens", WAIT)?;
    assert!(!br.source()?.contains(&token), "the token is shown again");

    // The new server runs the pasted command.
    let state = tmp.path().join("web-1");
    let out = run_pasted(&command, &state, "web-1")?;
    assert!(out.contains("enrolled as"), "{out}");
    let creds = NodeCreds::from_state_dir(&state)?;
    assert!(watch_served(&ctl.grpc_addr(), &creds, WAIT).await?);

    // The node is listed in its zone, active.
    br.click("#admin-nodes")?;
    br.wait_url("/admin/nodes", WAIT)?;
    let row = "tr[data-node=\"lab/web-1\"]";
    br.wait_for(row, WAIT)?;
    assert!(br.text(row)?.contains("active"), "{}", br.text(row)?);

    // Revoke asks first, listing what goes; nothing is revoked until confirmed.
    br.click("button.revoke[data-node=\"lab/web-1\"]")?;
    br.wait_for("#revoke-confirmation", WAIT)?;
    assert_eq!(br.text("#revoke-node")?, "lab/web-1");
    let serial = ctl.nodes()?[0]["serial"]
        .as_str()
        .context("serial")?
        .to_string();
    assert!(br.text("#revoke-serials")?.contains(&serial));
    assert_eq!(ctl.nodes()?[0]["revoked"], false, "asking revoked it");
    br.click("#confirm-revoke")?;
    br.wait_for(&format!("{row}[data-state=\"revoked\"]"), WAIT)?;
    assert!(br.text("#message")?.contains("lab/web-1 revoked"));
    assert!(
        !br.source()?
            .contains("class=\"revoke\" data-node=\"lab/web-1\""),
        "a revoked node still has a Revoke button"
    );
    assert_eq!(ctl.nodes()?[0]["revoked"], true);

    // Its certificate is refused over mTLS.
    assert!(
        !watch_served(&ctl.grpc_addr(), &creds, WAIT).await?,
        "the revoked node's certificate is still served"
    );
    let audit = ctl.admin_ok(&["audit", "--json"])?;
    for kind in ["zone.added", "token.created", "node.revoked"] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(&format!("\"kind\":\"{kind}\"")) && l.contains(ADMIN)),
            "{kind} not audited with the admin: {audit}"
        );
    }
    Ok(())
}
