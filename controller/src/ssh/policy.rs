//! What an SSH certificate may be issued for: which subject keys are accepted, which
//! names a principal may have, which extensions exist, and how long a certificate lives.
//! Pure functions; the service in `super` applies them.

use super::SshError;
use ssh_key::{Algorithm, PublicKey, public::KeyData};
use std::time::Duration;

/// Largest public key accepted (an RSA-16384 key is about 3 KiB in OpenSSH form).
pub const MAX_PUBLIC_KEY_BYTES: usize = 16 * 1024;
/// Smallest RSA subject key.
pub const MIN_RSA_BITS: usize = 3072;
/// A grant's maximum certificate lifetime unless it says otherwise.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(8 * 3600);
/// No user certificate lives longer than this, whatever a grant says.
pub const HARD_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shortest certificate issued (a short one is how a test sees expiry refused).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Host certificates live this long and are renewed at 2/3 of it.
pub const HOST_CERT_TTL: Duration = Duration::from_secs(7 * 86_400);
/// Validity starts this much before issue, for clocks slightly behind ours.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Every user certificate has this extension; the others only when a grant allows them.
pub const PERMIT_PTY: &str = "permit-pty";
/// Extensions a grant may add, by their OpenSSH names (grants may also give the short
/// form without `permit-`).
pub const OPTIONAL_EXTENSIONS: [&str; 4] = [
    "permit-agent-forwarding",
    "permit-port-forwarding",
    "permit-X11-forwarding",
    "permit-user-rc",
];

/// The OpenSSH name of an extension a grant asks for, or why it is refused.
pub fn extension_name(asked: &str) -> Result<&'static str, SshError> {
    let a = asked.trim();
    let long = if a.starts_with("permit-") {
        a.to_string()
    } else {
        format!("permit-{a}")
    };
    OPTIONAL_EXTENSIONS
        .iter()
        .find(|e| e.eq_ignore_ascii_case(&long))
        .copied()
        .ok_or_else(|| {
            SshError::BadRequest(format!(
                "unknown extension {}; allowed: {}",
                crate::text::Escaped(asked),
                OPTIONAL_EXTENSIONS.join(", ")
            ))
        })
}

/// A login name: what sshd looks up in the AuthorizedPrincipalsFile directory, so it
/// must be a plain POSIX user name.
pub fn check_principal(name: &str) -> Result<(), SshError> {
    let ok_first = |c: char| c.is_ascii_lowercase() || c == '_';
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.');
    let mut chars = name.chars();
    let good = name.len() <= 32
        && chars.next().is_some_and(ok_first)
        && chars.all(ok)
        && name != "."
        && name != "..";
    if good {
        Ok(())
    } else {
        Err(SshError::BadRequest(format!(
            "principal {} is not a login name (a-z, 0-9, _ . -, starting with a letter or _, at most 32)",
            crate::text::Escaped(name)
        )))
    }
}

/// The certificate principal that allows logging in as `principal` on the servers of
/// `zone`: each server lists only its own zone's, so a certificate is refused elsewhere.
pub fn certificate_principal(zone: &str, principal: &str) -> String {
    format!("{principal}@{zone}")
}

/// Bits of an RSA modulus.
fn rsa_bits(n: &[u8]) -> usize {
    let n = match n.iter().position(|b| *b != 0) {
        Some(i) => &n[i..],
        None => return 0,
    };
    n.len() * 8 - n[0].leading_zeros() as usize
}

/// Parse a subject's public key (one OpenSSH line) and apply the key policy: Ed25519,
/// ECDSA (and their security-key forms) or RSA of at least [`MIN_RSA_BITS`]; never DSA.
pub fn parse_subject_key(text: &str) -> Result<PublicKey, SshError> {
    if text.len() > MAX_PUBLIC_KEY_BYTES {
        return Err(SshError::BadRequest(format!(
            "the public key is {} bytes; at most {MAX_PUBLIC_KEY_BYTES} are accepted",
            text.len()
        )));
    }
    if text.contains("PRIVATE KEY-----") {
        return Err(SshError::BadRequest(
            "that is a private key: keep it to yourself and give the public key (the .pub file)"
                .into(),
        ));
    }
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(|| SshError::BadRequest("no public key given".into()))?;
    if line.starts_with("ssh-dss") {
        return Err(SshError::BadRequest(
            "DSA keys are not accepted; use an Ed25519, ECDSA or RSA (3072 bits or more) key"
                .into(),
        ));
    }
    if line.contains("-cert-v01@openssh.com") {
        return Err(SshError::BadRequest(
            "that is a certificate, not a public key; give the .pub file of the key".into(),
        ));
    }
    let key = PublicKey::from_openssh(line).map_err(|e| {
        SshError::BadRequest(format!(
            "not an OpenSSH public key (expected e.g. `ssh-ed25519 AAAA... comment`): {e}"
        ))
    })?;
    match key.key_data() {
        KeyData::Ed25519(_) | KeyData::SkEd25519(_) => {}
        KeyData::Ecdsa(_) | KeyData::SkEcdsaSha2NistP256(_) => {}
        KeyData::Rsa(rsa) => {
            let bits = rsa_bits(rsa.n.as_bytes());
            if bits < MIN_RSA_BITS {
                return Err(SshError::BadRequest(format!(
                    "RSA keys need at least {MIN_RSA_BITS} bits; this one has {bits}"
                )));
            }
        }
        KeyData::Dsa(_) => {
            return Err(SshError::BadRequest("DSA keys are not accepted".into()));
        }
        other => {
            return Err(SshError::BadRequest(format!(
                "{} keys are not accepted",
                algorithm_name(&other.algorithm())
            )));
        }
    }
    Ok(key)
}

fn algorithm_name(a: &Algorithm) -> String {
    a.as_str().to_string()
}

/// The lifetime of a user certificate: `asked` (or the maximum when none is asked), which
/// must be within [`MIN_TTL`] and `max`.
pub fn user_ttl(asked: Option<Duration>, max: Duration) -> Result<Duration, SshError> {
    let max = max.min(HARD_MAX_TTL);
    let ttl = asked.unwrap_or(max);
    if ttl > max {
        return Err(SshError::BadRequest(format!(
            "TTL {} is above the maximum of {} for these grants",
            humantime::format_duration(ttl),
            humantime::format_duration(max)
        )));
    }
    if ttl < MIN_TTL {
        return Err(SshError::BadRequest(format!(
            "TTL {} is below the minimum of {}",
            humantime::format_duration(ttl),
            humantime::format_duration(MIN_TTL)
        )));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILM+rvN+ot98qgEN796jTiQfZfG1KaT0PtFDJ/XFSqti foo@bar.com";

    fn refused(text: &str) -> String {
        parse_subject_key(text).unwrap_err().to_string()
    }

    #[test]
    fn an_ed25519_key_is_accepted_with_comments_and_blank_lines_around() {
        let k = parse_subject_key(&format!("# my key\n\n{ED}\n")).unwrap();
        assert_eq!(k.algorithm(), Algorithm::Ed25519);
    }

    #[test]
    fn bad_keys_are_refused_with_their_reason() {
        assert!(refused("ssh-dss AAAAB3NzaC1kc3MAAACBAP").contains("DSA"));
        assert!(refused("hello world").contains("not an OpenSSH public key"));
        assert!(refused("").contains("no public key"));
        assert!(refused(&"A".repeat(MAX_PUBLIC_KEY_BYTES + 1)).contains("at most"));
        assert!(refused("ssh-ed25519-cert-v01@openssh.com AAAA").contains("certificate"));
        let private = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
        let why = refused(private);
        assert!(
            why.contains("private key") && !why.contains("b3Bl"),
            "{why}"
        );
    }

    #[test]
    fn principals_are_login_names() {
        for ok in ["deploy", "_svc", "a.b-c_1"] {
            check_principal(ok).unwrap();
        }
        for bad in [
            "",
            "Root",
            "1abc",
            "a/b",
            "a b",
            "..",
            &"a".repeat(33),
            "x@y",
            "a:b",
        ] {
            assert!(check_principal(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn extensions_take_long_or_short_names_and_nothing_else() {
        assert_eq!(
            extension_name("agent-forwarding").unwrap(),
            "permit-agent-forwarding"
        );
        assert_eq!(
            extension_name("permit-port-forwarding").unwrap(),
            "permit-port-forwarding"
        );
        assert_eq!(
            extension_name("x11-forwarding").unwrap(),
            "permit-X11-forwarding"
        );
        assert!(extension_name("pty").is_err());
        assert!(extension_name("source-address").is_err());
    }

    #[test]
    fn ttl_is_within_the_grant_and_never_above_a_day() {
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(user_ttl(None, h(8)).unwrap(), h(8));
        assert_eq!(user_ttl(Some(h(1)), h(8)).unwrap(), h(1));
        assert!(
            user_ttl(Some(h(9)), h(8))
                .unwrap_err()
                .to_string()
                .contains("above")
        );
        assert_eq!(user_ttl(None, h(48)).unwrap(), h(24));
        assert!(user_ttl(Some(h(25)), h(48)).is_err());
        assert!(user_ttl(Some(Duration::ZERO), h(8)).is_err());
    }

    #[test]
    fn rsa_bits_count_the_modulus() {
        assert_eq!(rsa_bits(&[0x00, 0x80, 0, 0]), 24);
        assert_eq!(rsa_bits(&[0x01, 0xff]), 9);
        assert_eq!(rsa_bits(&[]), 0);
    }
}
