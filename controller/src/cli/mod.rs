//! The command line: arguments (clap), where each command runs, and how its reply is shown.
//! The binary only parses arguments and calls [`run`].

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

mod backup;
mod commands;
mod domain;
pub mod init;
pub mod render;
mod ssh;
pub mod store;

pub use commands::run;
pub use domain::DomainCommand;
pub use ssh::SshCommand;

#[derive(Parser, Debug)]
#[command(
    name = "zonemesh-controller",
    version,
    about = "zonemesh controller: internal CA and mesh control plane"
)]
pub struct Cli {
    /// Data directory (sled store, admin socket, secrets).
    #[arg(
        long,
        global = true,
        default_value = "/var/lib/zonemesh",
        env = "ZONEMESH_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// Key-encryption key file (default <data-dir>/secrets/kek; or set ZONEMESH_KEK).
    #[arg(long, global = true)]
    pub kek_file: Option<PathBuf>,
    /// Where the controller's data lives: `sled` (embedded, in <data-dir>/db; the
    /// default), `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`, or
    /// `etcds://HOST:PORT[,...]?ca=FILE[&cert=FILE&key=FILE]` (TLS, mutual with cert/key).
    /// `init` saves it in <data-dir>/store.url; later commands use the saved one.
    #[arg(long, global = true, env = "ZONEMESH_STORE", value_name = "URL")]
    pub store: Option<String>,
    /// TOML file of options (e.g. /etc/zonemesh/controller.toml): top-level keys for every
    /// command, a [serve] table for `serve`; the command line wins.
    #[arg(long, global = true, env = "ZONEMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax); `serve` re-reads it from --config on SIGHUP.
    #[arg(long, global = true, env = "ZONEMESH_LOG", default_value = "info")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the CA (RSA-4096 root and intermediate) in a new data directory.
    Init {
        #[arg(long)]
        trust_domain: String,
        /// Key type of the SSH CA created with it: ed25519, rsa4096 or none.
        #[arg(long, default_value = "ed25519")]
        ssh_ca_key: String,
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
        /// ACME server directory URL for `acme` domains (e.g. https://acme.example/dir).
        #[arg(long)]
        acme_directory: Option<String>,
        /// PEM file of extra roots to trust for the ACME server's HTTPS.
        #[arg(long)]
        acme_root: Option<PathBuf>,
        /// Contact e-mail of the controller's ACME account.
        #[arg(long)]
        acme_email: Option<String>,
        /// URL at which relying parties reach the PKI listener (default http://<pki-listen>);
        /// internal portal certificates name <URL>/ocsp as their OCSP responder.
        #[arg(long)]
        pki_url: Option<String>,
        /// Plain-HTTP listener for Prometheus' `GET /metrics` (off by default).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        #[command(flatten)]
        block_policy: BlockPolicyArgs,
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
    /// Portal domains: their certificates (ACME or the internal CA) and the edges serving them.
    Domain {
        #[command(subcommand)]
        command: DomainCommand,
    },
    /// Copy the store (every tree; keys stay sealed, no KEK or pepper) to FILE, while
    /// the controller runs or not.
    Backup {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Bring a backup back into a new, empty data directory (--data-dir); start it with the
    /// same KEK and pepper. With `--store etcd://...` the backup goes into that (empty)
    /// store and the data directory remembers it.
    Restore {
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// With an etcd `--store`: write into a store that already holds data.
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        json: bool,
    },
    /// The store itself: `store migrate` copies an embedded installation into etcd.
    Store {
        #[command(subcommand)]
        command: store::StoreCommand,
    },
    /// Write man pages and shell completions into DIR (used by scripts/package.sh).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Server access with SSH certificates: the SSH CA, grants, user certificates, KRL.
    Ssh {
        #[command(subcommand)]
        command: SshCommand,
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

/// `serve --block-*`: when reported failures block a source, and for how long.
#[derive(clap::Args, Debug, Clone)]
pub struct BlockPolicyArgs {
    /// Sliding window in which failures of a source are counted.
    #[arg(long, default_value = "10m")]
    pub block_window: humantime::Duration,
    /// Failures one node (or the controller's sign-in) must see in the window to count.
    #[arg(long, default_value_t = 3)]
    pub block_threshold: u32,
    /// Distinct witnesses a block needs: nodes, and the controller with its own
    /// sign-in failures.
    #[arg(long, default_value_t = 2)]
    pub block_nodes: usize,
    /// Length of a first block; each repeat offence doubles it.
    #[arg(long, default_value = "1h")]
    pub block_first: humantime::Duration,
    /// Longest block.
    #[arg(long, default_value = "7days")]
    pub block_max: humantime::Duration,
}

impl BlockPolicyArgs {
    /// The policy, checked.
    pub fn policy(&self) -> anyhow::Result<crate::blocklist::PolicyConfig> {
        let mut p = crate::blocklist::PolicyConfig::default();
        p.evidence.window = *self.block_window;
        p.evidence.events_per_reporter = self.block_threshold;
        p.evidence.reporters_needed = self.block_nodes;
        p.timing.first = *self.block_first;
        p.timing.max = *self.block_max;
        p.validate().map_err(|e| anyhow::anyhow!(e))?;
        Ok(p)
    }
}

#[derive(Subcommand, Debug)]
pub enum BlockCommand {
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
    /// The operator allow-list: `block allow CIDR` (never blocked; lifts blocks inside it),
    /// `block allow --list [--json]`, `block allow --remove CIDR`.
    Allow {
        #[arg(required_unless_present = "list")]
        cidr: Option<String>,
        #[arg(long, conflicts_with_all = ["list", "note"])]
        remove: bool,
        #[arg(long, conflicts_with = "note")]
        list: bool,
        #[arg(long, requires = "list")]
        json: bool,
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ThrottleCommand {
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
pub enum UserCommand {
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
    /// Forget a user's authenticator and recovery codes, end their sessions: the next
    /// sign-in sets up a new TOTP before any session.
    ResetTotp {
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Every CA certificate (roots, intermediates, cross-signatures) with its state
    /// (active, retiring, retired), subject, fingerprint and validity.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// A new intermediate under the active root, issuing from now on; the old one stays
    /// trusted until its last certificate expires. Nodes renew onto the new one, each at
    /// its own point within the spread.
    RotateIntermediate {
        /// The window nodes move in, e.g. 15m (the default), 2h.
        #[arg(long)]
        spread: Option<humantime::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// A new root, cross-signed by the active one, and a new intermediate under it. Both
    /// roots are trusted for the grace period; nodes move their pin to the new root through
    /// the cross-signature and renew within the spread.
    RotateRoot {
        /// How long the old root stays trusted, e.g. 31d (the default); at least the spread.
        #[arg(long)]
        grace: Option<humantime::Duration>,
        /// The window nodes renew in, e.g. 15m (the default).
        #[arg(long)]
        spread: Option<humantime::Duration>,
        #[arg(long)]
        json: bool,
    },
    /// Print the issuing root or intermediate certificate (or any by `--id`) as PEM.
    Export {
        #[arg(
            long,
            conflicts_with_all = ["intermediate", "id"],
            required_unless_present_any = ["intermediate", "id"]
        )]
        root: bool,
        #[arg(long, conflicts_with = "id")]
        intermediate: bool,
        /// A CA certificate by its `ca show` id, e.g. root-2, int-3, cross-2.
        #[arg(long)]
        id: Option<String>,
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
pub enum ZoneCommand {
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
pub enum TokenCommand {
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
pub enum NodeCommand {
    /// List nodes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a node (zone/node, or its bare name when unique across zones): cut off at its
    /// next handshake, removed from every peer.
    Revoke {
        node: String,
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
}
