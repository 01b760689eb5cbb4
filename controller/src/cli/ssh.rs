//! `ssh ...`: the SSH CA, grants, user certificates and revocation.

use super::render;
use crate::admin::local::request;
use crate::admin::{AdminReply, AdminRequest};
use crate::secrets::{KekSource, write_atomic};
use crate::text::Escaped;
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum SshCommand {
    /// Create the SSH CA (user and host keys) on an installation that has none.
    Init {
        /// ed25519 (default) or rsa4096.
        #[arg(long = "ssh-ca-key", default_value = "ed25519")]
        key_type: String,
    },
    /// The user-CA and host-CA public keys (OpenSSH format).
    Ca {
        #[arg(long)]
        json: bool,
    },
    /// The `@cert-authority` line for clients' known_hosts, and an `@revoked` line for
    /// the host key of every revoked node.
    KnownHosts,
    /// Host certificates of revoked nodes (on the KRL, which clients can also use as
    /// `RevokedHostKeys`; see `ssh krl`).
    RevokedHosts {
        #[arg(long)]
        json: bool,
    },
    /// Let a user log in as PRINCIPAL on the servers of ZONE.
    Grant {
        #[arg(long)]
        email: String,
        #[arg(long)]
        zone: String,
        #[arg(long)]
        principal: String,
        /// Longest certificate for this grant (default 8h, at most 24h).
        #[arg(long)]
        max_ttl: Option<humantime::Duration>,
        /// Also allow agent-forwarding, port-forwarding, x11-forwarding or user-rc
        /// (repeat; default: permit-pty only).
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
    /// Take a grant away.
    RevokeGrant {
        #[arg(long)]
        email: String,
        #[arg(long)]
        zone: String,
        #[arg(long)]
        principal: String,
    },
    /// Every grant.
    Grants {
        #[arg(long)]
        json: bool,
    },
    /// Sign a user certificate for a public key with the user's granted principals.
    SignUser {
        #[arg(long)]
        email: String,
        /// The user's public key (`id_ed25519.pub`).
        #[arg(long)]
        pubkey: PathBuf,
        /// Lifetime (default: the grants' maximum, 8h unless a grant says less).
        #[arg(long)]
        ttl: Option<humantime::Duration>,
        /// Where to write the certificate (`id_ed25519-cert.pub`).
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Put a user certificate (by serial) or all of a user's certificates on the KRL.
    Revoke {
        #[arg(long, conflicts_with = "email", required_unless_present = "email")]
        serial: Option<u64>,
        #[arg(long)]
        email: Option<String>,
    },
    /// Issued certificates (user and host), optionally of one user.
    Certs {
        #[arg(long)]
        email: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write the current KRL (what every managed sshd has as RevokedKeys; clients can use
    /// it as RevokedHostKeys to refuse the hosts of revoked nodes).
    Krl {
        #[arg(long)]
        out: PathBuf,
    },
}

macro_rules! expect {
    ($reply:expr, $variant:ident) => {
        match $reply {
            AdminReply::$variant(v) => v,
            other => bail!("unexpected {} reply from the controller", other.kind()),
        }
    };
}

/// Largest public key file read (the controller refuses more anyway, with its reason).
const MAX_PUBKEY_FILE: u64 = 1024 * 1024 + 1;

/// Run one ssh command.
pub async fn run(dir: &Path, kek: &KekSource, cmd: SshCommand) -> Result<()> {
    let ask = |req| request(dir, kek, req);
    match cmd {
        SshCommand::Init { key_type } => {
            let ca = expect!(ask(AdminRequest::SshInit { key_type }).await?, SshCa);
            print!("{}", render::ssh_ca(&ca, false));
        }
        SshCommand::Ca { json } => {
            let ca = expect!(ask(AdminRequest::SshCa).await?, SshCa);
            print!("{}", render::ssh_ca(&ca, json));
        }
        SshCommand::KnownHosts => {
            let l = expect!(ask(AdminRequest::SshKnownHosts).await?, SshKnownHosts);
            println!("{}", l.line);
            for r in &l.revoked {
                println!("{r}");
            }
        }
        SshCommand::RevokedHosts { json } => {
            let rows = expect!(ask(AdminRequest::SshRevokedHosts).await?, SshRevokedHosts);
            print!("{}", render::ssh_revoked_hosts(&rows, json));
        }
        SshCommand::Grant {
            email,
            zone,
            principal,
            max_ttl,
            allow,
        } => {
            let req = AdminRequest::SshGrant {
                email,
                zone,
                principal,
                max_ttl_secs: max_ttl.map(|d| d.as_secs()),
                extensions: allow,
            };
            let g = expect!(ask(req).await?, SshGrantAdded);
            println!(
                "{} may log in as {} on the servers of zone {} (certificate principal {}, max TTL {})",
                Escaped(&g.email),
                Escaped(&g.principal),
                Escaped(&g.zone),
                Escaped(&g.certificate_principal),
                humantime::format_duration(std::time::Duration::from_secs(g.max_ttl_secs))
            );
        }
        SshCommand::RevokeGrant {
            email,
            zone,
            principal,
        } => {
            let req = AdminRequest::SshRevokeGrant {
                email,
                zone,
                principal,
            };
            let g = expect!(ask(req).await?, SshGrantRevoked);
            println!(
                "grant of {} in zone {} to {} revoked",
                Escaped(&g.principal),
                Escaped(&g.zone),
                Escaped(&g.email)
            );
        }
        SshCommand::Grants { json } => {
            let rows = expect!(ask(AdminRequest::SshGrants).await?, SshGrants);
            print!("{}", render::ssh_grants(&rows, json));
        }
        SshCommand::SignUser {
            email,
            pubkey,
            ttl,
            out,
            json,
        } => {
            let meta = std::fs::metadata(&pubkey)
                .with_context(|| format!("reading {}", pubkey.display()))?;
            if meta.len() > MAX_PUBKEY_FILE {
                bail!(
                    "{} is {} bytes; a public key is at most {} bytes",
                    pubkey.display(),
                    meta.len(),
                    crate::ssh::policy::MAX_PUBLIC_KEY_BYTES
                );
            }
            let bytes =
                std::fs::read(&pubkey).with_context(|| format!("reading {}", pubkey.display()))?;
            let public_key = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("{} is not text", pubkey.display()))?;
            let req = AdminRequest::SshSignUser {
                email,
                public_key,
                ttl_secs: ttl.map(|d| d.as_secs()),
            };
            let c = expect!(ask(req).await?, SshUserCert);
            write_atomic(&out, format!("{}\n", c.certificate).as_bytes(), 0o644)?;
            if json {
                print!("{}", render::pretty(&c));
            } else {
                println!(
                    "certificate serial {} for {} ({}) written to {}",
                    c.serial,
                    Escaped(&c.key_id),
                    Escaped(&c.principals.join(", ")),
                    out.display()
                );
                println!("valid until {}", render::fmt_unix(c.valid_before_unix));
            }
        }
        SshCommand::Revoke { serial, email } => {
            let r = expect!(
                ask(AdminRequest::SshRevoke { serial, email }).await?,
                SshRevoked
            );
            if r.serials.is_empty() {
                println!("no unexpired certificate to revoke");
            } else {
                println!(
                    "revoked serial(s) {}; every managed sshd refuses them with the next update",
                    r.serials
                        .iter()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        SshCommand::Certs { email, json } => {
            let rows = expect!(ask(AdminRequest::SshCerts { email }).await?, SshCerts);
            print!("{}", render::ssh_certs(&rows, json));
        }
        SshCommand::Krl { out } => {
            let k = expect!(ask(AdminRequest::SshKrl).await?, SshKrl);
            write_atomic(&out, &k.krl, 0o644)?;
            println!("KRL written to {}", out.display());
        }
    }
    Ok(())
}
