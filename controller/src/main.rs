//! `zonemesh-controller`: the CA, the control plane and its admin commands.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;
use zonemesh_controller::admin::{self, AdminHandler, AdminRequest};
use zonemesh_controller::authority::Authority;
use zonemesh_controller::secrets::{KekSource, write_atomic};
use zonemesh_controller::serve::{ServeConfig, run};
use zonemesh_controller::store::{Store, StoreError};
use zonemesh_controller::text::Escaped;

#[derive(Parser, Debug)]
#[command(
    name = "zonemesh-controller",
    version,
    about = "zonemesh controller: internal CA and mesh control plane"
)]
struct Cli {
    /// Data directory (sled store, admin socket, secrets).
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/zonemesh",
        env = "ZONEMESH_DATA_DIR"
    )]
    data_dir: PathBuf,
    /// Key-encryption key file (default <data-dir>/secrets/kek; or set ZONEMESH_KEK).
    #[arg(long, global = true)]
    kek_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the CA (RSA-4096 root and intermediate) in a new data directory.
    Init {
        #[arg(long)]
        trust_domain: String,
    },
    /// Run the controller.
    Serve {
        #[arg(long, default_value = "127.0.0.1:7443")]
        grpc_listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:8443")]
        https_listen: SocketAddr,
        /// Plain-HTTP listener for /crl and /ocsp (signed data; relying parties need no TLS).
        #[arg(long)]
        pki_listen: Option<SocketAddr>,
        /// DNS names / IPs for the controller's TLS certificate (default: localhost and the listen IPs).
        #[arg(long = "tls-name")]
        tls_names: Vec<String>,
    },
    /// CA operations.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Zones.
    Zone {
        #[command(subcommand)]
        command: ZoneCommand,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrolled nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Users of the admin and portal pages.
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// End-to-end loss and latency between nodes, as the agents measure it.
    Health {
        #[arg(long)]
        json: bool,
    },
    /// Block a source address on every agent (corroborated reports and sign-in brute force
    /// do this by themselves); list and remove blocks.
    Block {
        #[command(subcommand)]
        command: BlockCommand,
    },
    /// Failed sign-in counters and blocks of the running controller.
    Throttle {
        #[command(subcommand)]
        command: ThrottleCommand,
    },
    /// The append-only audit log of security decisions.
    Audit {
        #[arg(long)]
        json: bool,
        /// Only the newest N entries.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
enum BlockCommand {
    /// Put an address on the blocklist pushed to every agent.
    Add {
        address: String,
        #[arg(long = "for", default_value = "1h")]
        duration: humantime::Duration,
        #[arg(long, default_value = "blocked by an administrator")]
        reason: String,
    },
    /// Addresses blocked now, with until when and why.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Take an address off the blocklist; every agent drops it at once.
    Remove { address: String },
}

#[derive(Subcommand, Debug)]
enum ThrottleCommand {
    /// Accounts and sources with failed sign-ins, their delays and blocks.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Forget the failures of an account or of a source address (and lift its block).
    Clear {
        #[arg(long, conflicts_with = "source", required_unless_present = "source")]
        email: Option<String>,
        #[arg(long)]
        source: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a user; the password is read from a prompt, or from stdin when it is not a terminal.
    Add {
        #[arg(long)]
        email: String,
        /// admin or portal-owner.
        #[arg(long)]
        role: String,
        #[arg(long)]
        json: bool,
    },
    /// List users.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Disable a user and end their sessions.
    Disable {
        #[arg(long)]
        email: String,
    },
    /// Set a user's password (read like `user add`) and end their sessions.
    Passwd {
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Subjects, fingerprints and expiry of the CA certificates.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Print the root or intermediate certificate as PEM.
    Export {
        #[arg(
            long,
            conflicts_with = "intermediate",
            required_unless_present = "intermediate"
        )]
        root: bool,
        #[arg(long)]
        intermediate: bool,
    },
    /// Sign a node CSR (RSA-4096) and write certificate + intermediate as PEM.
    SignCsr {
        #[arg(long)]
        csr: PathBuf,
        #[arg(long)]
        zone: String,
        #[arg(long)]
        node: String,
        /// The node's WireGuard public key (base64).
        #[arg(long)]
        wg_key: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a short-lived TLS server certificate with a fresh RSA-2048 key.
    IssueTls {
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long)]
        ip: Vec<String>,
        /// e.g. 24h, 3d (at most the configured maximum, 7d by default).
        #[arg(long)]
        lifetime: Option<humantime::Duration>,
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Revoke a certificate by serial.
    Revoke {
        #[arg(long)]
        serial: String,
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Print the current CRL as PEM.
    Crl,
}

#[derive(Subcommand, Debug)]
enum ZoneCommand {
    /// Add a zone with its overlay range.
    Add {
        name: String,
        #[arg(long)]
        cidr: String,
        /// Tunnel between nodes of this zone too (default: only to other zones).
        #[arg(long)]
        intra_zone_tunnels: bool,
    },
    /// List zones.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create an enrollment token (printed once, alone on the last line).
    Create {
        #[arg(long)]
        zone: String,
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// List nodes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a node (zone/node): cut off at its next handshake, removed from every peer.
    Revoke {
        node: String,
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZONEMESH_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn one_line(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
        .replace('\n', " ")
}

async fn dispatch(cli: Cli) -> Result<()> {
    let kek = KekSource::new(&cli.data_dir, cli.kek_file.clone());
    match cli.command {
        Command::Init { trust_domain } => {
            zonemesh_controller::secrets::private_umask();
            init(&cli.data_dir, &kek, &trust_domain)
        }
        Command::Serve {
            grpc_listen,
            https_listen,
            pki_listen,
            tls_names,
        } => {
            zonemesh_controller::secrets::private_umask();
            let cfg = ServeConfig {
                data_dir: cli.data_dir.clone(),
                kek_file: cli.kek_file.clone(),
                grpc_listen,
                https_listen,
                pki_listen,
                tls_names,
            };
            run(cfg, tokio_util::sync::CancellationToken::new()).await
        }
        Command::Ca { command } => ca_command(&cli.data_dir, &kek, command).await,
        Command::Zone {
            command:
                ZoneCommand::Add {
                    name,
                    cidr,
                    intra_zone_tunnels,
                },
        } => {
            let v = request(
                &cli.data_dir,
                &kek,
                AdminRequest::ZoneAdd {
                    name,
                    cidr,
                    intra_zone_tunnels,
                },
            )
            .await?;
            println!(
                "zone {} added ({})",
                v["name"].as_str().unwrap_or(""),
                v["cidr"].as_str().unwrap_or("")
            );
            Ok(())
        }
        Command::Zone {
            command: ZoneCommand::List { json },
        } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::ZoneList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<20} {:<20} {:>6}  INTRA-ZONE", "ZONE", "CIDR", "NODES");
                for z in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<20} {:>6}  {}",
                        e(&z["name"]),
                        e(&z["cidr"]),
                        z["nodes"].to_string(),
                        z["intra_zone_tunnels"]
                    );
                }
            }
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create { zone, ttl, uses },
        } => {
            let v = request(
                &cli.data_dir,
                &kek,
                AdminRequest::TokenCreate {
                    zone,
                    ttl_secs: ttl.as_secs(),
                    uses,
                },
            )
            .await?;
            println!(
                "enrollment token for zone {} ({} use(s), expires {}):",
                s(&v["zone"]),
                v["uses"],
                fmt_unix(v["expires_unix"].as_u64().unwrap_or(0))
            );
            println!("{}", s(&v["token"]));
            Ok(())
        }
        Command::Node {
            command: NodeCommand::List { json },
        } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::NodeList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "{:<28} {:<16} {:<34} {:<22} STATUS",
                    "NODE", "OVERLAY", "SERIAL", "CERT EXPIRES"
                );
                for n in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<28} {:<16} {:<34} {:<22} {}",
                        format!("{}/{}", e(&n["zone"]), e(&n["node"])),
                        e(&n["overlay_ip"]),
                        e(&n["serial"]),
                        fmt_unix(n["not_after_unix"].as_u64().unwrap_or(0)),
                        if n["revoked"].as_bool().unwrap_or(false) {
                            "revoked"
                        } else {
                            "active"
                        }
                    );
                }
            }
            Ok(())
        }
        Command::User {
            command: UserCommand::Add { email, role, json },
        } => {
            let password = read_password()?;
            let v = request(
                &cli.data_dir,
                &kek,
                AdminRequest::UserAdd {
                    email,
                    role,
                    password: admin::Redacted(password.to_string()),
                },
            )
            .await?;
            print!("{}", s(&v[if json { "json" } else { "human" }]));
            Ok(())
        }
        Command::User {
            command: UserCommand::List { json },
        } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::UserList).await?;
            print!("{}", s(&v[if json { "json" } else { "human" }]));
            Ok(())
        }
        Command::User {
            command: UserCommand::Disable { email },
        } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::UserDisable { email }).await?;
            println!(
                "user {} disabled ({} session(s) ended)",
                s(&v["email"]),
                v["sessions_ended"]
            );
            Ok(())
        }
        Command::User {
            command: UserCommand::Passwd { email },
        } => {
            let password = read_password()?;
            let req = AdminRequest::UserPasswd {
                email,
                password: admin::Redacted(password.to_string()),
            };
            let v = request(&cli.data_dir, &kek, req).await?;
            println!(
                "password of {} changed ({} session(s) ended)",
                s(&v["email"]),
                v["sessions_ended"]
            );
            Ok(())
        }
        Command::Throttle { command } => throttle_command(&cli.data_dir, &kek, command).await,
        Command::Block {
            command:
                BlockCommand::Add {
                    address,
                    duration,
                    reason,
                },
        } => {
            let v = request(
                &cli.data_dir,
                &kek,
                AdminRequest::BlockAdd {
                    address,
                    secs: duration.as_secs(),
                    reason,
                },
            )
            .await?;
            println!(
                "{} blocked on every agent until {}",
                s(&v["address"]),
                fmt_unix(v["until_unix"].as_u64().unwrap_or(0))
            );
            Ok(())
        }
        Command::Block {
            command: BlockCommand::List { json },
        } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::BlockList).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<40} {:<22} REASON", "ADDRESS", "UNTIL");
                for b in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<40} {:<22} {}",
                        e(&b["address"]),
                        fmt_unix(b["until_unix"].as_u64().unwrap_or(0)),
                        e(&b["reason"])
                    );
                }
            }
            Ok(())
        }
        Command::Block {
            command: BlockCommand::Remove { address },
        } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::BlockRemove { address }).await?;
            println!("{} unblocked on every agent", e(&v["address"]));
            Ok(())
        }
        Command::Health { json } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::Health).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<24} {:>6} {:>10}", "FROM", "TO", "LOSS", "RTT");
                for r in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<24} {:>5.0}% {:>8.2}ms",
                        e(&r["node"]),
                        e(&r["peer"]),
                        r["loss"].as_f64().unwrap_or(0.0) * 100.0,
                        r["rtt_micros"].as_f64().unwrap_or(0.0) / 1000.0
                    );
                }
            }
            Ok(())
        }
        Command::Audit { json, limit } => {
            let v = request(&cli.data_dir, &kek, AdminRequest::Audit { limit }).await?;
            print!("{}", s(&v[if json { "json" } else { "human" }]));
            Ok(())
        }
        Command::Node {
            command: NodeCommand::Revoke { node, reason },
        } => {
            let v = request(
                &cli.data_dir,
                &kek,
                AdminRequest::NodeRevoke { node, reason },
            )
            .await?;
            println!(
                "node {} revoked (serial {})",
                s(&v["node"]),
                s(&v["serial"])
            );
            Ok(())
        }
    }
}

async fn throttle_command(data_dir: &Path, kek: &KekSource, cmd: ThrottleCommand) -> Result<()> {
    use zonemesh_controller::auth::{ThrottleList, cli::render_throttles};
    match cmd {
        ThrottleCommand::List { json } => {
            let v = request(data_dir, kek, AdminRequest::ThrottleList).await?;
            let list: ThrottleList = serde_json::from_value(v).context("bad throttle list")?;
            print!("{}", render_throttles(&list, json));
        }
        ThrottleCommand::Clear { email, source } => {
            let v = request(data_dir, kek, AdminRequest::ThrottleClear { email, source }).await?;
            println!("cleared {} counter(s) or block(s)", v["cleared"]);
        }
    }
    Ok(())
}

/// The password, never from argv: a no-echo prompt on a terminal, else the first stdin line.
fn read_password() -> Result<zeroize::Zeroizing<String>> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let first = zeroize::Zeroizing::new(rpassword_prompt("password: ")?);
        let again = zeroize::Zeroizing::new(rpassword_prompt("again:    ")?);
        if *first != *again {
            bail!("the two passwords differ");
        }
        Ok(first)
    } else {
        Ok(zonemesh_controller::auth::cli::read_password_line(
            std::io::stdin().lock(),
        )?)
    }
}

/// Prompt without echo using the terminal's own settings (stty), restoring them after.
fn rpassword_prompt(prompt: &str) -> Result<String> {
    use std::io::Write;
    eprint!("{prompt}");
    std::io::stderr().flush()?;
    let tty = std::fs::File::open("/dev/tty")?;
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(tty.try_clone().expect("tty"))
            .status()
    };
    stty("-echo")?;
    let mut line = String::new();
    let r = std::io::stdin().read_line(&mut line);
    let _ = stty("echo");
    eprintln!();
    r?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A string field for a terminal table: control characters shown, not interpreted.
fn e(v: &Value) -> Escaped<'_> {
    Escaped(s(v))
}

fn fmt_unix(secs: u64) -> String {
    humantime::format_rfc3339_seconds(zonemesh_controller::store::from_unix(secs)).to_string()
}

fn init(data_dir: &Path, kek: &KekSource, trust_domain: &str) -> Result<()> {
    // zonemesh-controller init must fail before doing anything when a CA exists.
    zonemesh_ca::validate_label("trust domain", trust_domain, true)?;
    zonemesh_controller::secrets::create_private_dir(data_dir)?;
    let store = open_store(data_dir)?;
    if Authority::exists(&store)? {
        bail!(
            "{} already holds a CA; refusing to overwrite it",
            data_dir.display()
        );
    }
    if kek.file.exists() && std::env::var_os(zonemesh_controller::secrets::KEK_ENV).is_none() {
        bail!(
            "{} already exists; refusing to overwrite a key-encryption key",
            kek.file.display()
        );
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let material = zonemesh_ca::CaMaterial::generate(trust_domain, SystemTime::now(), |step| {
        bar.set_message(step.to_string())
    })?;
    bar.finish_and_clear();
    let k = kek.create()?;
    Authority::install(&store, &k, &material)?;
    let pepper_file = zonemesh_controller::serve::pepper_path(data_dir);
    if std::env::var_os("ZONEMESH_PEPPER").is_none() && !pepper_file.exists() {
        zonemesh_controller::secrets::write_secret_file(
            &pepper_file,
            zonemesh_controller::auth::Pepper::generate(1)
                .encode()
                .as_bytes(),
        )?;
    }
    println!("zonemesh CA created for trust domain {trust_domain}");
    println!(
        "key-encryption key: {}",
        if std::env::var_os(zonemesh_controller::secrets::KEK_ENV).is_some() {
            "from ZONEMESH_KEK".to_string()
        } else {
            kek.file.display().to_string()
        }
    );
    println!("root SHA-256 fingerprint (agents pin this with --ca-fingerprint):");
    println!(
        "{}",
        zonemesh_ca::fingerprint_sha256(&material.root_cert_der)
    );
    Ok(())
}

fn open_store(data_dir: &Path) -> Result<Store> {
    match Store::open(&data_dir.join("db")) {
        Ok(s) => Ok(s),
        Err(StoreError::Locked) => bail!(
            "the data directory {} is in use by a running controller whose admin socket does not answer",
            data_dir.display()
        ),
        Err(e) => Err(e.into()),
    }
}

/// Send a command to the running controller, or run CA commands locally when none runs.
async fn request(data_dir: &Path, kek: &KekSource, req: AdminRequest) -> Result<Value> {
    if !data_dir.exists() {
        bail!(
            "data directory {} does not exist (run `zonemesh-controller init` first)",
            data_dir.display()
        );
    }
    let resp = match admin::call(data_dir, &req).await? {
        Some(r) => r,
        None => {
            if req.needs_server() {
                bail!(
                    "no controller is running on {} (start it with `zonemesh-controller serve --data-dir {}`)",
                    data_dir.display(),
                    data_dir.display()
                );
            }
            if !data_dir.join("db").exists() {
                bail!(
                    "{} holds no zonemesh data (run `zonemesh-controller init` first)",
                    data_dir.display()
                );
            }
            let store = open_store(data_dir)?;
            let auth = Authority::load(store, &kek.load()?, SystemTime::now())?;
            let store = auth.store().clone();
            let audit =
                std::sync::Arc::new(zonemesh_controller::audit::AuditLog::open(store.db())?);
            let web = match zonemesh_controller::auth::Pepper::from_env_or_file(Some(
                &zonemesh_controller::serve::pepper_path(data_dir),
            )) {
                Ok(pepper) => Some(zonemesh_controller::web::WebState::new(
                    &zonemesh_controller::auth::WebConfig::new(pepper),
                    store.db(),
                    audit.clone(),
                    std::sync::Arc::new(zonemesh_controller::auth::NoSecuritySink),
                    std::sync::Arc::new(zonemesh_controller::serve::StoreDashboard(store.clone())),
                )?),
                Err(_) => None,
            };
            let handler = AdminHandler {
                auth: std::sync::Arc::new(auth),
                mesh: None,
                audit: Some(audit),
                web,
            };
            let r = tokio::task::spawn_blocking(move || handler.handle(req)).await?;
            return r.map_err(Into::into);
        }
    };
    if resp.ok {
        Ok(resp.result)
    } else {
        bail!("{}", resp.error)
    }
}

async fn ca_command(data_dir: &Path, kek: &KekSource, cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Show { json } => {
            let v = request(data_dir, kek, AdminRequest::CaShow).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("trust domain: {}", s(&v["trust_domain"]));
                for c in v["certificates"].as_array().into_iter().flatten() {
                    println!(
                        "{}:\n  subject:   {}\n  sha256:    {}\n  key:       RSA-{}\n  not after: {}",
                        s(&c["role"]),
                        s(&c["subject"]),
                        s(&c["sha256"]),
                        c["key_bits"],
                        s(&c["not_after"])
                    );
                }
            }
        }
        CaCommand::Export {
            root: _,
            intermediate,
        } => {
            let v = request(data_dir, kek, AdminRequest::CaExport { intermediate }).await?;
            print!("{}", s(&v["pem"]));
        }
        CaCommand::SignCsr {
            csr,
            zone,
            node,
            wg_key,
            out,
        } => {
            let raw = std::fs::read(&csr).with_context(|| format!("reading {}", csr.display()))?;
            let csr_der = match std::str::from_utf8(&raw) {
                Ok(text) if text.contains("-----BEGIN") => {
                    zonemesh_ca::pem_blocks("CERTIFICATE REQUEST", text)?
                        .into_iter()
                        .next()
                        .with_context(|| {
                            format!("{} has no CERTIFICATE REQUEST block", csr.display())
                        })?
                }
                _ => raw,
            };
            let v = request(
                data_dir,
                kek,
                AdminRequest::CaSignCsr {
                    csr_der,
                    zone,
                    node,
                    wg_key,
                },
            )
            .await?;
            write_atomic(&out, s(&v["pem"]).as_bytes(), 0o644)?;
            println!("issued serial {} -> {}", s(&v["serial"]), out.display());
        }
        CaCommand::IssueTls {
            dns,
            ip,
            lifetime,
            out_dir,
        } => {
            let v = request(
                data_dir,
                kek,
                AdminRequest::CaIssueTls {
                    dns,
                    ips: ip,
                    lifetime_secs: lifetime.map(|d| d.as_secs()),
                },
            )
            .await?;
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            write_atomic(&out_dir.join("key.pem"), s(&v["key_pem"]).as_bytes(), 0o600)?;
            write_atomic(
                &out_dir.join("chain.pem"),
                s(&v["chain_pem"]).as_bytes(),
                0o644,
            )?;
            println!(
                "issued serial {} -> {}/chain.pem, key.pem",
                s(&v["serial"]),
                out_dir.display()
            );
        }
        CaCommand::Revoke { serial, reason } => {
            let v = request(data_dir, kek, AdminRequest::CaRevoke { serial, reason }).await?;
            println!("revoked serial {}", s(&v["revoked"]));
        }
        CaCommand::Crl => {
            let v = request(data_dir, kek, AdminRequest::CaCrl).await?;
            print!("{}", s(&v["pem"]));
        }
    }
    Ok(())
}
