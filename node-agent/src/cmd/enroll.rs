//! `enroll`, `identity` and `renew`: the node's identity from the command line.

use anyhow::Result;
use clap::Args as ClapArgs;
use std::path::PathBuf;
use std::process::ExitCode;
use zonemesh_agent::control::enroll::{self, EnrollParams};
use zonemesh_agent::control::state::{StateDir, cert_info};

#[derive(ClapArgs, Debug)]
pub struct EnrollArgs {
    /// Controller gRPC address, HOST:PORT; several controllers of one cluster as
    /// A,B,C (tried in order, all saved for failover).
    #[arg(long, value_name = "HOST:PORT[,HOST:PORT...]")]
    pub controller: String,
    /// SHA-256 fingerprint of the controller's CA root (printed by `zonemesh-controller init`).
    #[arg(long)]
    pub ca_fingerprint: String,
    /// One-time enrollment token (`zonemesh-controller token create`).
    #[arg(long, env = "ZONEMESH_TOKEN", hide_env_values = true)]
    pub token: String,
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Node name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Expected zone; refused if the token is for another one.
    #[arg(long)]
    pub zone: Option<String>,
    /// Underlay endpoint(s) peers should use to reach this node, IP:PORT.
    #[arg(long = "endpoint")]
    pub endpoints: Vec<String>,
}

#[derive(ClapArgs, Debug)]
pub struct StateArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
    #[arg(long)]
    pub json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

pub fn run_enroll(a: EnrollArgs) -> Result<ExitCode> {
    for e in &a.endpoints {
        e.parse::<std::net::SocketAddr>()
            .map_err(|_| anyhow::anyhow!("--endpoint {e:?} is not IP:PORT"))?;
    }
    let state = StateDir::new(&a.state_dir);
    let params = EnrollParams {
        controller: a.controller,
        ca_fingerprint: a.ca_fingerprint,
        token: a.token,
        node: a.name.unwrap_or_else(enroll::default_node_name),
        zone: a.zone,
        endpoints: a.endpoints,
    };
    let id = runtime()?.block_on(enroll::enroll(&state, &params))?;
    println!("enrolled as {} (overlay {})", id.spiffe_id, id.overlay_ip);
    Ok(ExitCode::SUCCESS)
}

pub fn run_identity(a: StateArgs) -> Result<ExitCode> {
    let state = StateDir::new(&a.state_dir);
    let id = state.identity()?;
    let info = cert_info(&state.read_cert()?)?;
    let expiry = humantime::format_rfc3339_seconds(info.not_after).to_string();
    if a.json {
        let mut v = serde_json::to_value(&id)?;
        v["serial"] = info.serial_hex.clone().into();
        v["not_after"] = expiry.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("node:        {}", id.node);
        println!("zone:        {}", id.zone);
        println!("spiffe id:   {}", id.spiffe_id);
        println!("overlay ip:  {}", id.overlay_ip);
        println!("serial:      {}", info.serial_hex);
        println!("expires:     {expiry}");
        println!("controller:  {}", id.controller_addrs().join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(ClapArgs, Debug)]
pub struct RenewArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
    /// Replace the node's RSA-4096 key too (a new key, generated here, never sent).
    #[arg(long)]
    pub rotate_key: bool,
}

pub fn run_renew(a: RenewArgs) -> Result<ExitCode> {
    let state = StateDir::new(&a.state_dir);
    let r = runtime()?.block_on(enroll::renew(&state, a.rotate_key))?;
    println!(
        "renewed{}: serial {} valid until {}",
        if r.rotated_key.is_some() {
            " with a new key"
        } else {
            ""
        },
        r.info.serial_hex,
        humantime::format_rfc3339_seconds(r.info.not_after)
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(ClapArgs, Debug)]
pub struct RunArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
    /// TUN interface to create.
    #[arg(long, default_value = "zm0")]
    pub interface: String,
    /// UDP port for WireGuard (must match the port in the enrolled --endpoint).
    #[arg(long, default_value_t = 51820)]
    pub listen_port: u16,
    #[arg(long, default_value_t = 1420)]
    pub mtu: u16,
    /// Serve this node's portal domains over HTTPS on ADDR (needs --edge-upstream).
    #[arg(long, value_name = "ADDR")]
    pub edge_https: Option<std::net::SocketAddr>,
    /// Answer ACME HTTP-01 challenges and redirect to HTTPS on ADDR.
    #[arg(long, value_name = "ADDR")]
    pub edge_http: Option<std::net::SocketAddr>,
    /// Where the HTTPS listener proxies requests: http://host:port[/prefix].
    #[arg(long, value_name = "URL")]
    pub edge_upstream: Option<String>,
    /// Write DIR/<domain>/{fullchain.pem,privkey.pem,ocsp.der} for a local nginx or HAProxy.
    #[arg(long, value_name = "DIR")]
    pub edge_files: Option<PathBuf>,
    /// Run with `sh -c` after the files changed (needs --edge-files).
    #[arg(long, value_name = "CMD")]
    pub edge_reload: Option<String>,
    /// Serve Prometheus' `GET /metrics` on ADDR (plain HTTP; off by default).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Replace the node's RSA-4096 key on every N-th renewal (0: never). With the default
    /// 30-day certificates renewed at 2/3, 4 means a new key about every 80 days.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub rotate_key_every: u32,
    /// Follow a log for authentication failures and report their sources: sshd:PATH,
    /// sshd:journal, kamailio:PATH, asterisk:PATH or regex:PATH:PATTERN (repeatable;
    /// sources.toml in the state directory adds more).
    #[arg(long = "watch-log", value_name = "KIND:WHERE", value_parser = parse_watch_log)]
    pub watch_log: Vec<zonemesh_agent::control::logwatch::LogSource>,
    /// Give this node's sshd a host certificate and let it accept zonemesh user
    /// certificates (drop-in in --sshd-config-dir). Without it, a drop-in an earlier run
    /// wrote is removed.
    #[arg(long)]
    pub manage_sshd: bool,
    /// The sshd host key to certify (its public half is <PATH>.pub).
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/etc/ssh/ssh_host_ed25519_key"
    )]
    pub ssh_host_key: PathBuf,
    /// sshd's drop-in directory, Included by sshd_config.
    #[arg(long, value_name = "DIR", default_value = "/etc/ssh/sshd_config.d")]
    pub sshd_config_dir: PathBuf,
    /// Where the user CA key, principals and KRL the drop-in names are written.
    #[arg(long, value_name = "DIR", default_value = "/etc/ssh/zonemesh")]
    pub sshd_files_dir: PathBuf,
    /// Run with `sh -c` after the drop-in or the host certificate changed.
    #[arg(long, value_name = "CMD", default_value = "systemctl reload ssh")]
    pub sshd_reload: String,
}

fn parse_watch_log(s: &str) -> Result<zonemesh_agent::control::logwatch::LogSource, String> {
    zonemesh_agent::control::logwatch::LogSource::parse(s).map_err(|e| e.to_string())
}

impl RunArgs {
    /// The sshd the `--manage-sshd` flags describe; `None` without it.
    fn sshd(&self) -> Option<zonemesh_agent::control::run::SshdConfig> {
        self.manage_sshd
            .then(|| zonemesh_agent::control::run::SshdConfig {
                host_key: self.ssh_host_key.clone(),
                config_dir: self.sshd_config_dir.clone(),
                files_dir: self.sshd_files_dir.clone(),
                reload: self.sshd_reload.clone(),
            })
    }

    /// The edge configuration the `--edge-*` flags ask for, checked; `None` without them.
    fn edge(&self) -> Result<Option<zonemesh_deploy::edge::EdgeConfig>> {
        if self.edge_reload.is_some() && self.edge_files.is_none() {
            anyhow::bail!("--edge-reload needs --edge-files");
        }
        if self.edge_http.is_some() && self.edge_https.is_none() && self.edge_files.is_none() {
            anyhow::bail!("--edge-http needs --edge-https or --edge-files (it redirects to HTTPS)");
        }
        if self.edge_https.is_none() && self.edge_upstream.is_some() {
            anyhow::bail!("--edge-upstream needs --edge-https");
        }
        if self.edge_https.is_some() && self.edge_upstream.is_none() {
            anyhow::bail!("--edge-https needs --edge-upstream (where requests are proxied)");
        }
        if self.edge_https.is_none() && self.edge_http.is_none() && self.edge_files.is_none() {
            return Ok(None);
        }
        let cfg = zonemesh_deploy::edge::EdgeConfig {
            https: self.edge_https,
            http: self.edge_http,
            upstream: self.edge_upstream.clone(),
            files: self
                .edge_files
                .clone()
                .map(|dir| zonemesh_deploy::files::FilesConfig {
                    dir,
                    reload: self.edge_reload.clone(),
                }),
            ..Default::default()
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }
}

/// Run the agent until it stops; `reload` runs beside it (the SIGHUP handler).
pub fn run_agent(a: RunArgs, reload: impl std::future::Future<Output = ()>) -> Result<ExitCode> {
    let edge = a.edge()?;
    let sshd = a.sshd();
    let opts = zonemesh_agent::control::run::RunOptions {
        state: StateDir::new(&a.state_dir),
        interface: a.interface,
        listen_port: a.listen_port,
        mtu: a.mtu,
        sshd,
        edge,
        metrics_listen: a.metrics_listen,
        rotate_key_every: a.rotate_key_every,
        watch_log: a.watch_log,
    };
    opts.state.identity()?;
    runtime()?.block_on(async {
        tokio::select! {
            r = zonemesh_agent::control::run::run(opts, tokio_util::sync::CancellationToken::new()) => r,
            () = reload => Ok(()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn ago(unix: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format!("{}s ago", now.saturating_sub(unix))
}

pub fn run_status(a: StateArgs) -> Result<ExitCode> {
    let st = runtime()?.block_on(zonemesh_agent::control::run::query_status(&StateDir::new(
        &a.state_dir,
    )))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
        return Ok(ExitCode::SUCCESS);
    }
    let expiry = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(st.cert_not_after_unix),
    );
    println!(
        "node {} ({}), overlay {}, cert {} expires {}",
        st.spiffe_id, st.zone, st.overlay_ip, st.serial, expiry
    );
    let of = if st.controllers.len() > 1 {
        format!(" (of {})", st.controllers.join(", "))
    } else {
        String::new()
    };
    println!(
        "controller {}{of} {}, mesh version {}",
        st.controller,
        if st.controller_connected {
            "connected"
        } else {
            "UNREACHABLE (forwarding on last known mesh)"
        },
        st.mesh_version
    );
    println!(
        "{:<24} {:<10} {:<22} {:<12} {:>12} {:>12} {:>6} {:>9}",
        "PEER", "ZONE", "ENDPOINT", "HANDSHAKE", "RX BYTES", "TX BYTES", "LOSS", "RTT"
    );
    for p in &st.peers {
        println!(
            "{:<24} {:<10} {:<22} {:<12} {:>12} {:>12} {:>6} {:>9}",
            p.name,
            p.zone,
            p.endpoint
                .map(|e| e.to_string())
                .unwrap_or_else(|| "-".into()),
            p.last_handshake_unix
                .map(ago)
                .unwrap_or_else(|| "never".into()),
            p.rx_bytes,
            p.tx_bytes,
            p.loss
                .map(|l| format!("{:.0}%", l * 100.0))
                .unwrap_or_else(|| "-".into()),
            p.rtt_micros
                .map(|r| format!("{:.2}ms", f64::from(r) / 1000.0))
                .unwrap_or_else(|| "-".into()),
        );
    }
    for r in &st.rejected_peers {
        println!("refused: {r}");
    }
    if !st.edge.is_empty() {
        println!(
            "{:<32} {:<34} {:<22} STAPLE",
            "EDGE DOMAIN", "SERIAL", "EXPIRES"
        );
    }
    for d in &st.edge {
        let expiry = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(d.not_after_unix),
        );
        println!(
            "{:<32} {:<34} {:<22} {}{}",
            d.domain,
            d.serial,
            expiry.to_string(),
            d.staple,
            d.files_error
                .as_ref()
                .map(|e| format!("; files: {e}"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(flags: &[&str]) -> RunArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut argv = vec!["run", "--state-dir", "/nonexistent"];
        argv.extend_from_slice(flags);
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().run
    }

    #[test]
    fn edge_flags_that_do_not_fit_together_are_refused_with_the_reason() {
        assert!(run_args(&[]).edge().unwrap().is_none());
        for (flags, reason) in [
            (
                &["--edge-reload", "true"][..],
                "--edge-reload needs --edge-files",
            ),
            (
                &["--edge-https", "127.0.0.1:443"][..],
                "needs --edge-upstream",
            ),
            (
                &["--edge-upstream", "http://127.0.0.1:8080"][..],
                "needs --edge-https",
            ),
            (&["--edge-http", "127.0.0.1:80"][..], "--edge-http needs"),
            (
                &[
                    "--edge-https",
                    "127.0.0.1:443",
                    "--edge-upstream",
                    "https://x",
                ][..],
                "only http://",
            ),
        ] {
            let e = run_args(flags).edge().unwrap_err().to_string();
            assert!(e.contains(reason), "{flags:?}: {e}");
        }
        let both = run_args(&[
            "--edge-https",
            "127.0.0.1:443",
            "--edge-http",
            "127.0.0.1:80",
            "--edge-upstream",
            "http://127.0.0.1:8080",
            "--edge-files",
            "/srv/certs",
            "--edge-reload",
            "nginx -s reload",
        ])
        .edge()
        .unwrap()
        .unwrap();
        assert_eq!(
            both.files.unwrap().reload.as_deref(),
            Some("nginx -s reload")
        );
        let files_only = run_args(&["--edge-files", "/srv/certs"])
            .edge()
            .unwrap()
            .unwrap();
        assert!(files_only.https.is_none() && files_only.upstream.is_none());
    }
}
