//! Configuration files: the controller started from a `controller.toml` alone serves like
//! the same options on the command line; the shipped examples parse; unknown keys are
//! refused; SIGHUP re-reads the log filter; the agent finds its state directory in
//! `agent.toml`.

use clap::CommandFactory;
use std::ffi::OsString;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use zonemesh_controller::cli::Cli;
use zonemesh_tests::cluster::{Controller, free_port, signal};
use zonemesh_tests::{bin, run, run_ok, tlsprobe};

const WAIT: Duration = Duration::from_secs(30);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A `serve` process this test started; killed on drop.
struct Serving {
    child: Child,
    log: PathBuf,
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Serving {
    fn start(args: &[OsString], log: PathBuf, ports: &[SocketAddr]) -> Self {
        let child = Command::new(bin("zonemesh-controller"))
            .args(args)
            .env_remove("ZONEMESH_DATA_DIR")
            .env_remove("ZONEMESH_CONFIG")
            .env_remove("ZONEMESH_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Self { child, log };
        let start = Instant::now();
        while !ports.iter().all(|p| TcpStream::connect(p).is_ok()) {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("serve exited ({status}): {}", s.log_text());
            }
            assert!(start.elapsed() < WAIT, "not listening: {}", s.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(mut self) {
        signal(self.child.id(), "TERM");
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < WAIT, "serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// DNS and IP SANs of the certificate the HTTPS listener presents.
fn https_names(addr: SocketAddr) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let served = tlsprobe::fetch(addr, "localhost").unwrap();
    let (_, c) = X509Certificate::from_der(&served.chain[0]).unwrap();
    let mut names: Vec<String> = c
        .subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|g| match g {
                    GeneralName::DNSName(d) => d.to_string(),
                    GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[test]
fn the_controller_from_controller_toml_alone_serves_like_the_same_command_line() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::init(tmp.path()).unwrap();
    let (grpc, https, pki) = (addr(), addr(), addr());
    let file = tmp.path().join("controller.toml");
    std::fs::write(
        &file,
        format!(
            r#"
data-dir = "{}"
log = "info"
[serve]
grpc-listen = "{grpc}"
https-listen = "{https}"
pki-listen = "{pki}"
pki-url = "http://pki.corp.test:8080"
tls-name = ["ctl.corp.test", "127.0.0.1"]
"#,
            ctl.data_dir.display()
        ),
    )
    .unwrap();

    // From the file alone (no option on the command line).
    let from_file = Serving::start(
        &["--config".into(), file.clone().into(), "serve".into()],
        tmp.path().join("file.log"),
        &[grpc, https, pki],
    );
    let names_from_file = https_names(https);
    // The admin commands find the data directory through the same file.
    let admin = |args: &[&str]| {
        run_ok(
            Command::new(bin("zonemesh-controller"))
                .arg("--config")
                .arg(&file)
                .args(args)
                .env_remove("ZONEMESH_DATA_DIR"),
        )
        .unwrap()
    };
    admin(&["zone", "add", "eu", "--cidr", "100.64.1.0/24"]);
    assert!(admin(&["zone", "list", "--json"]).contains("\"eu\""));
    assert!(from_file.log_text().contains(&grpc.to_string()));
    from_file.stop();

    // The same options on the command line.
    let args: Vec<OsString> = [
        "serve",
        "--data-dir",
        ctl.data_dir.to_str().unwrap(),
        "--grpc-listen",
        &grpc.to_string(),
        "--https-listen",
        &https.to_string(),
        "--pki-listen",
        &pki.to_string(),
        "--pki-url",
        "http://pki.corp.test:8080",
        "--tls-name",
        "ctl.corp.test",
        "--tls-name",
        "127.0.0.1",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let from_cli = Serving::start(&args, tmp.path().join("cli.log"), &[grpc, https, pki]);
    assert_eq!(https_names(https), names_from_file);
    assert!(
        names_from_file.contains(&"ctl.corp.test".to_string()),
        "{names_from_file:?}"
    );
    assert!(
        run_ok(
            Command::new(bin("zonemesh-controller"))
                .args(["zone", "list", "--json", "--data-dir"])
                .arg(&ctl.data_dir)
        )
        .unwrap()
        .contains("\"eu\"")
    );
    from_cli.stop();

    // The command line wins over the file: another gRPC port, the rest from the file.
    let other = addr();
    let mixed = Serving::start(
        &[
            "--config".into(),
            file.clone().into(),
            "serve".into(),
            "--grpc-listen".into(),
            other.to_string().into(),
        ],
        tmp.path().join("mixed.log"),
        &[other, https, pki],
    );
    assert!(
        TcpStream::connect(grpc).is_err(),
        "the file's port is not used"
    );
    mixed.stop();
}

/// Parse a controller command line as the binary does: the file's settings first.
fn parse(args: &[&str], file: &Path) -> Result<Cli, String> {
    let argv: Vec<OsString> = ["zonemesh-controller", "--config", file.to_str().unwrap()]
        .iter()
        .chain(args)
        .map(OsString::from)
        .collect();
    let argv = zonemesh_configfile::expand(&Cli::command(), argv).map_err(|e| e.to_string())?;
    <Cli as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())
}

#[test]
fn every_serve_option_in_the_file_parses_to_the_same_settings_as_on_the_command_line() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("c.toml");
    std::fs::write(
        &file,
        r#"
data-dir = "/srv/zm"
kek-file = "/etc/zm/kek"
log = "debug"
[serve]
grpc-listen = "0.0.0.0:7443"
https-listen = "0.0.0.0:8443"
pki-listen = "0.0.0.0:8080"
pki-url = "http://pki.corp.test:8080"
tls-name = ["ctl.corp.test", "10.0.0.5"]
acme-directory = "https://acme.test/dir"
acme-root = "/etc/zm/acme.pem"
acme-email = "pki@corp.test"
"#,
    )
    .unwrap();
    let from_file = parse(&["serve"], &file).unwrap();
    let argv = [
        "zonemesh-controller",
        "--config",
        file.to_str().unwrap(),
        "serve",
        "--data-dir=/srv/zm",
        "--kek-file=/etc/zm/kek",
        "--log=debug",
        "--grpc-listen=0.0.0.0:7443",
        "--https-listen=0.0.0.0:8443",
        "--pki-listen=0.0.0.0:8080",
        "--pki-url=http://pki.corp.test:8080",
        "--tls-name=ctl.corp.test",
        "--tls-name=10.0.0.5",
        "--acme-directory=https://acme.test/dir",
        "--acme-root=/etc/zm/acme.pem",
        "--acme-email=pki@corp.test",
    ];
    let from_cli = <Cli as clap::Parser>::try_parse_from(argv).unwrap();
    assert_eq!(format!("{from_file:?}"), format!("{from_cli:?}"));
    // The shipped example parses for every command it has a table for.
    let shipped = workspace().join("packaging/controller.toml");
    parse(&["serve"], &shipped).unwrap();
    parse(&["zone", "list"], &shipped).unwrap();
}

#[test]
fn a_bad_key_stops_the_binaries_with_the_key_named_and_status_64() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, "[serve]\ngrpc-lisen = \"127.0.0.1:1\"\n").unwrap();
    let out = run(Command::new(bin("zonemesh-controller"))
        .arg("--config")
        .arg(&file)
        .arg("serve"))
    .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown key `serve.grpc-lisen`"), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    std::fs::write(&file, "[run]\nlisten-port = \"many\"\n").unwrap();
    let out = run(Command::new(bin("zonemesh-agent"))
        .arg("--config")
        .arg(&file)
        .args(["run", "--state-dir", "/nonexistent"]))
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("many"));
    // The shipped agent example is accepted.
    let out = run(Command::new(bin("zonemesh-agent"))
        .arg("--config")
        .arg(workspace().join("packaging/agent.toml"))
        .args(["run", "--help"]))
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sighup_re_reads_the_log_filter_and_a_broken_file_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::init(tmp.path()).unwrap();
    let (grpc, https) = (addr(), addr());
    let file = tmp.path().join("controller.toml");
    let write = |log: &str, extra: &str| {
        std::fs::write(
            &file,
            format!(
                "data-dir = \"{}\"\nlog = \"{log}\"\n{extra}[serve]\ngrpc-listen = \"{grpc}\"\nhttps-listen = \"{https}\"\n",
                ctl.data_dir.display()
            ),
        )
        .unwrap()
    };
    write("warn", "");
    let s = Serving::start(
        &["--config".into(), file.clone().into(), "serve".into()],
        tmp.path().join("hup.log"),
        &[grpc, https],
    );
    assert!(
        !s.log_text().contains("controller serving"),
        "log=warn hides info lines"
    );
    write("info", "");
    signal(s.child.id(), "HUP");
    let until = |what: &str| {
        let start = Instant::now();
        while !s.log_text().contains(what) {
            assert!(start.elapsed() < WAIT, "no {what:?}: {}", s.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until("configuration reloaded");
    write("info", "no-such-option = 1\n");
    signal(s.child.id(), "HUP");
    until("reload refused");
    assert!(TcpStream::connect(grpc).is_ok(), "still serving");
    s.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reads_its_state_directory_from_agent_toml() {
    let tmp = TempDir::new().unwrap();
    let ctl = Controller::start_new(tmp.path()).unwrap();
    ctl.zone_add("eu", "100.64.1.0/24").unwrap();
    let dir = tmp.path().join("agent");
    let (_state, id) = ctl
        .enroll_agent(&dir, "eu", "web-1", 0, "198.18.0.1:51820")
        .await;
    let file = tmp.path().join("agent.toml");
    std::fs::write(&file, format!("state-dir = \"{}\"\n", dir.display())).unwrap();
    let out = run_ok(
        Command::new(bin("zonemesh-agent"))
            .arg("--config")
            .arg(&file)
            .args(["identity", "--json"]),
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["spiffe_id"], id.spiffe_id.as_str());
}
