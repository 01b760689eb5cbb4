//! Each command: its request, where it runs, and what it prints.

use super::render::{self, fmt_unix};
use super::{
    BlockCommand, CaCommand, Cli, Command, NodeCommand, ThrottleCommand, TokenCommand, UserCommand,
    ZoneCommand,
};
use crate::admin::local::request;
use crate::admin::{AdminReply, AdminRequest, Redacted};
use crate::secrets::{KekSource, write_atomic};
use crate::serve::{ServeConfig, run as serve};
use crate::text::Escaped;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The reply's payload when it is the expected variant, else an error naming what came.
macro_rules! expect {
    ($reply:expr, $variant:ident) => {
        match $reply {
            AdminReply::$variant(v) => v,
            other => bail!("unexpected {} reply from the controller", other.kind()),
        }
    };
}

/// Run one parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    let kek = KekSource::new(&cli.data_dir, cli.kek_file.clone());
    let dir = cli.data_dir.as_path();
    let ask = |req| request(dir, &kek, req);
    match cli.command {
        Command::Init {
            trust_domain,
            ssh_ca_key,
        } => {
            crate::secrets::private_umask();
            super::init::init(dir, &kek, &trust_domain, &ssh_ca_key, cli.store.as_deref())
        }
        Command::Serve {
            grpc_listen,
            https_listen,
            pki_listen,
            tls_names,
            acme_directory,
            acme_root,
            acme_email,
            pki_url,
            metrics_listen,
            block_policy,
        } => {
            crate::secrets::private_umask();
            let cfg = ServeConfig {
                data_dir: cli.data_dir.clone(),
                store: cli.store.clone(),
                kek_file: cli.kek_file.clone(),
                grpc_listen,
                https_listen,
                pki_listen,
                tls_names,
                acme_directory,
                acme_root,
                acme_email,
                pki_url,
                metrics_listen,
                block_policy: block_policy.policy()?,
            };
            serve(cfg, tokio_util::sync::CancellationToken::new()).await
        }
        Command::Ca { command } => ca(dir, &kek, command).await,
        Command::Zone { command } => {
            match command {
                ZoneCommand::Add {
                    name,
                    cidr,
                    intra_zone_tunnels,
                } => {
                    let req = AdminRequest::ZoneAdd {
                        name,
                        cidr,
                        intra_zone_tunnels,
                    };
                    let z = expect!(ask(req).await?, ZoneAdded);
                    println!("zone {} added ({})", Escaped(&z.name), Escaped(&z.cidr));
                }
                ZoneCommand::List { json } => {
                    let rows = expect!(ask(AdminRequest::ZoneList).await?, ZoneList);
                    print!("{}", render::zones(&rows, json));
                }
            }
            Ok(())
        }
        Command::Token {
            command: TokenCommand::Create { zone, ttl, uses },
        } => {
            let req = AdminRequest::TokenCreate {
                zone,
                ttl_secs: ttl.as_secs(),
                uses,
            };
            let t = expect!(ask(req).await?, TokenCreated);
            println!(
                "enrollment token for zone {} ({} use(s), expires {}):",
                Escaped(&t.zone),
                t.uses,
                fmt_unix(t.expires_unix)
            );
            println!("{}", t.token.0);
            Ok(())
        }
        Command::Node { command } => {
            match command {
                NodeCommand::List { json } => {
                    let rows = expect!(ask(AdminRequest::NodeList).await?, NodeList);
                    print!("{}", render::nodes(&rows, json));
                }
                NodeCommand::Revoke { node, reason } => {
                    let n = expect!(
                        ask(AdminRequest::NodeRevoke { node, reason }).await?,
                        NodeRevoked
                    );
                    println!(
                        "node {} revoked (serial {})",
                        Escaped(&n.node),
                        Escaped(&n.serial)
                    );
                }
            }
            Ok(())
        }
        Command::User { command } => user(dir, &kek, command).await,
        Command::Health { json } => {
            let rows = expect!(ask(AdminRequest::Health).await?, Health);
            print!("{}", render::health(&rows, json));
            Ok(())
        }
        Command::Block { command } => {
            match command {
                BlockCommand::Add {
                    address,
                    duration,
                    reason,
                } => {
                    let req = AdminRequest::BlockAdd {
                        address,
                        secs: duration.as_secs(),
                        reason,
                    };
                    let b = expect!(ask(req).await?, BlockAdded);
                    println!(
                        "{} blocked on every agent until {}",
                        Escaped(&b.address),
                        fmt_unix(b.until_unix)
                    );
                }
                BlockCommand::List { json } => {
                    let rows = expect!(ask(AdminRequest::BlockList).await?, BlockList);
                    print!("{}", render::blocks(&rows, json));
                }
                BlockCommand::Remove { address } => {
                    let req = AdminRequest::BlockRemove { address };
                    let b = expect!(ask(req).await?, BlockRemoved);
                    println!("{} unblocked on every agent", Escaped(&b.address));
                }
                BlockCommand::Allow {
                    cidr,
                    remove,
                    list,
                    json,
                    note,
                } => match (cidr, list, remove) {
                    (_, true, _) => {
                        let rows =
                            expect!(ask(AdminRequest::BlockAllowList).await?, BlockAllowList);
                        print!("{}", render::allow_list(&rows, json));
                    }
                    (Some(cidr), false, true) => {
                        let req = AdminRequest::BlockAllowRemove { cidr };
                        let a = expect!(ask(req).await?, BlockAllowRemoved);
                        println!("{} removed from the allow-list", Escaped(&a.cidr));
                    }
                    (Some(cidr), false, false) => {
                        let req = AdminRequest::BlockAllowAdd {
                            cidr,
                            note: note.unwrap_or_else(|| "allowed by an administrator".into()),
                        };
                        let a = expect!(ask(req).await?, BlockAllowAdded);
                        println!(
                            "{} is never blocked; blocks lifted: {}",
                            Escaped(&a.allow.cidr),
                            if a.lifted.is_empty() {
                                "none".to_string()
                            } else {
                                Escaped(&a.lifted.join(", ")).to_string()
                            }
                        );
                    }
                    (None, false, _) => anyhow::bail!("block allow needs a CIDR (or --list)"),
                },
            }
            Ok(())
        }
        Command::Throttle { command } => {
            match command {
                ThrottleCommand::List { json } => {
                    let list = expect!(ask(AdminRequest::ThrottleList).await?, ThrottleList);
                    print!("{}", render::throttles(&list, json));
                }
                ThrottleCommand::Clear { email, source } => {
                    let req = AdminRequest::ThrottleClear { email, source };
                    let c = expect!(ask(req).await?, ThrottleCleared);
                    println!("cleared {} counter(s) or block(s)", c.cleared);
                }
            }
            Ok(())
        }
        Command::Domain { command } => super::domain::run(dir, &kek, command).await,
        Command::Backup { out, json } => super::backup::backup(dir, &kek, &out, json).await,
        Command::Restore {
            from,
            overwrite,
            json,
        } => super::backup::restore(dir, &from, cli.store.as_deref(), overwrite, json).await,
        Command::GenerateDocs { out } => {
            use clap::CommandFactory as _;
            zonemesh_configfile::write_docs(Cli::command(), &out)
                .with_context(|| format!("writing docs into {}", out.display()))
        }
        Command::Ssh { command } => super::ssh::run(dir, &kek, command).await,
        Command::Store { command } => super::store::run(command).await,
        Command::Audit { json, limit } => {
            let records = expect!(ask(AdminRequest::Audit { limit }).await?, Audit);
            print!("{}", render::audit(&records, json));
            Ok(())
        }
    }
}

async fn user(dir: &Path, kek: &KekSource, cmd: UserCommand) -> Result<()> {
    use crate::auth::cli::read_password;
    match cmd {
        UserCommand::Add { email, role, json } => {
            let password = Redacted(read_password()?.to_string());
            let req = AdminRequest::UserAdd {
                email,
                role,
                password,
            };
            let added = expect!(request(dir, kek, req).await?, UserAdded);
            print!("{}", render::user_added(&added, json));
        }
        UserCommand::List { json } => {
            let rows = expect!(request(dir, kek, AdminRequest::UserList).await?, UserList);
            print!("{}", render::users(&rows, json));
        }
        UserCommand::Disable { email } => {
            let req = AdminRequest::UserDisable { email };
            let u = expect!(request(dir, kek, req).await?, UserSessionsEnded);
            println!(
                "user {} disabled ({} session(s) ended)",
                Escaped(&u.email),
                u.sessions_ended
            );
        }
        UserCommand::Passwd { email } => {
            let password = Redacted(read_password()?.to_string());
            let req = AdminRequest::UserPasswd { email, password };
            let u = expect!(request(dir, kek, req).await?, UserSessionsEnded);
            println!(
                "password of {} changed ({} session(s) ended)",
                Escaped(&u.email),
                u.sessions_ended
            );
        }
        UserCommand::ResetTotp { email } => {
            let req = AdminRequest::UserResetTotp { email };
            let u = expect!(request(dir, kek, req).await?, UserSessionsEnded);
            println!(
                "TOTP of {} reset: a new authenticator is set up at the next sign-in ({} session(s) ended)",
                Escaped(&u.email),
                u.sessions_ended
            );
        }
    }
    Ok(())
}

/// A CA rotation (intermediate or root): it signs and publishes, so it may take longer
/// than other requests.
async fn rotate(dir: &Path, kek: &KekSource, req: AdminRequest, json: bool) -> Result<()> {
    let within = std::time::Duration::from_secs(180);
    let reply = crate::admin::local::request_within(dir, kek, req, within).await?;
    let r = expect!(reply, CaRotated);
    print!("{}", render::ca_rotated(&r, json));
    Ok(())
}

async fn ca(dir: &Path, kek: &KekSource, cmd: CaCommand) -> Result<()> {
    match cmd {
        CaCommand::Show { json } => {
            let ca = expect!(request(dir, kek, AdminRequest::CaShow).await?, CaShow);
            print!("{}", render::ca_show(&ca, json));
        }
        CaCommand::RotateIntermediate { spread, json } => {
            let req = AdminRequest::CaRotateIntermediate {
                spread_secs: spread.map(|d| d.as_secs()),
            };
            rotate(dir, kek, req, json).await?;
        }
        CaCommand::RotateRoot {
            grace,
            spread,
            json,
        } => {
            let req = AdminRequest::CaRotateRoot {
                grace_secs: grace.map(|d| d.as_secs()),
                spread_secs: spread.map(|d| d.as_secs()),
            };
            rotate(dir, kek, req, json).await?;
        }
        CaCommand::Export {
            root: _,
            intermediate,
            id,
        } => {
            let req = AdminRequest::CaExport { intermediate, id };
            print!("{}", expect!(request(dir, kek, req).await?, Pem).pem);
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
            let req = AdminRequest::CaSignCsr {
                csr_der,
                zone,
                node,
                wg_key,
            };
            let signed = expect!(request(dir, kek, req).await?, CaSigned);
            write_atomic(&out, signed.pem.as_bytes(), 0o644)?;
            println!("issued serial {} -> {}", signed.serial, out.display());
        }
        CaCommand::IssueTls {
            dns,
            ip,
            lifetime,
            out_dir,
        } => {
            let req = AdminRequest::CaIssueTls {
                dns,
                ips: ip,
                lifetime_secs: lifetime.map(|d| d.as_secs()),
            };
            let issued = expect!(request(dir, kek, req).await?, CaTlsIssued);
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            write_atomic(&out_dir.join("key.pem"), issued.key_pem.0.as_bytes(), 0o600)?;
            write_atomic(
                &out_dir.join("chain.pem"),
                issued.chain_pem.as_bytes(),
                0o644,
            )?;
            println!(
                "issued serial {} -> {}/chain.pem, key.pem",
                issued.serial,
                out_dir.display()
            );
        }
        CaCommand::Revoke { serial, reason } => {
            let req = AdminRequest::CaRevoke { serial, reason };
            let r = expect!(request(dir, kek, req).await?, CaRevoked);
            println!("revoked serial {}", r.revoked);
        }
        CaCommand::Crl => {
            print!(
                "{}",
                expect!(request(dir, kek, AdminRequest::CaCrl).await?, Pem).pem
            );
        }
    }
    Ok(())
}
