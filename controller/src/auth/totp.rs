//! TOTP second factor (RFC 6238: HMAC-SHA-1, 6 digits, 30 s steps, ±1 step of skew) and
//! recovery codes.
//!
//! The checks here are pure: the caller passes the time and the last step it accepted, and
//! stores the step returned, so each code is accepted at most once.

use qrcode::QrCode;
use qrcode::render::{svg, unicode};
use sha2::{Digest, Sha256};
use totp_rs::{Algorithm, Builder, Totp};
use zeroize::Zeroizing;

use super::AuthError;

/// Length of a TOTP step in seconds.
pub const STEP_SECS: u64 = 30;
/// Secret length in bytes (160 bits, as RFC 4226 recommends).
pub const SECRET_LEN: usize = 20;
/// Recovery codes issued at enrollment.
pub const RECOVERY_CODES: usize = 10;

/// A fresh random TOTP secret.
pub fn generate_secret() -> Zeroizing<Vec<u8>> {
    let mut s = Zeroizing::new(vec![0u8; SECRET_LEN]);
    rand::fill(&mut s[..]);
    s
}

fn totp(secret: &[u8], issuer: &str, account: &str) -> Result<Totp, AuthError> {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_skew(1)
        .with_step_duration(STEP_SECS)
        .with_secret(secret.to_vec())
        .with_issuer(Some(issuer))
        .with_account_name(account)
        .build()
        .map_err(|e| AuthError::Totp(e.to_string()))
}

/// Check `code` at `now_unix`; returns the matched step when it is within ±1 step and
/// later than `last_step` (a code, or an older one, already used is refused).
pub fn check_code(secret: &[u8], code: &str, now_unix: u64, last_step: Option<u64>) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The account name does not enter the computation.
    let t = totp(secret, "zonemesh", "check").ok()?;
    let step = t.check(code, now_unix)?;
    match last_step {
        Some(last) if step <= last => None,
        _ => Some(step),
    }
}

/// The 6-digit code for `unix` (used by tests and the benchmark).
pub fn code_at(secret: &[u8], unix: u64) -> String {
    totp(secret, "zonemesh", "code")
        .map(|t| t.generate(unix).to_string())
        .unwrap_or_default()
}

/// The base32 form of a secret, as authenticator apps and `oathtool -b` take it.
pub fn secret_base32(secret: &[u8]) -> Zeroizing<String> {
    Zeroizing::new(totp_rs::Secret::from(secret.to_vec()).to_base32())
}

/// `otpauth://totp/<issuer>:<account>?secret=...&issuer=...` for Google/Microsoft Authenticator.
pub fn otpauth_uri(
    secret: &[u8],
    issuer: &str,
    account: &str,
) -> Result<Zeroizing<String>, AuthError> {
    let t = totp(secret, issuer, account)?;
    Ok(Zeroizing::new(
        t.to_url().map_err(|e| AuthError::Totp(e.to_string()))?,
    ))
}

/// The URI as an inline SVG QR code (no XML prolog, so it can sit inside HTML).
pub fn qr_svg(uri: &str) -> Result<String, AuthError> {
    let code = QrCode::new(uri.as_bytes()).map_err(|e| AuthError::Totp(e.to_string()))?;
    let svg = code
        .render::<svg::Color<'_>>()
        .min_dimensions(240, 240)
        .dark_color(svg::Color("#000000"))
        .light_color(svg::Color("#ffffff"))
        .build();
    Ok(match svg.find("<svg") {
        Some(i) => svg[i..].to_string(),
        None => svg,
    })
}

/// The URI as a QR code drawn with Unicode half blocks, for a terminal.
pub fn qr_terminal(uri: &str) -> Result<String, AuthError> {
    let code = QrCode::new(uri.as_bytes()).map_err(|e| AuthError::Totp(e.to_string()))?;
    Ok(code
        .render::<unicode::Dense1x2>()
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Fresh recovery codes (`xxxxx-xxxxx`, 50 bits each from a 32-letter alphabet).
pub fn generate_recovery_codes() -> Vec<Zeroizing<String>> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut raw = [0u8; 10];
            rand::fill(&mut raw);
            let mut s = String::with_capacity(11);
            for (i, b) in raw.iter().enumerate() {
                if i == 5 {
                    s.push('-');
                }
                s.push(ALPHABET[(*b as usize) % ALPHABET.len()] as char);
            }
            Zeroizing::new(s)
        })
        .collect()
}

/// How a recovery code is stored: SHA-256 of the normalised code, hex. The codes carry
/// 50 random bits and are rate-limited like passwords, so a fast hash is enough.
pub fn hash_recovery_code(email: &str, code: &str) -> String {
    let norm: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_lowercase();
    let mut h = Sha256::new();
    h.update(b"zonemesh/recovery-code/v1\0");
    h.update(super::password::normalize_email(email).as_bytes());
    h.update(b"\0");
    h.update(norm.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6238 appendix B, SHA-1 secret "12345678901234567890".
    const RFC_SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_vectors() {
        // The RFC lists 8-digit codes; the 6-digit code is their last six digits.
        for (t, code8) in [
            (59u64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
        ] {
            assert_eq!(code_at(RFC_SECRET, t), code8[2..]);
        }
    }

    #[test]
    fn skew_and_replay() {
        let now = 1_700_000_015u64;
        let step = now / STEP_SECS;
        let code_now = code_at(RFC_SECRET, now);
        assert_eq!(check_code(RFC_SECRET, &code_now, now, None), Some(step));
        // Accepted once only: the stored step refuses it and anything older.
        assert_eq!(check_code(RFC_SECRET, &code_now, now, Some(step)), None);
        assert_eq!(
            check_code(RFC_SECRET, &code_at(RFC_SECRET, now - 30), now, Some(step)),
            None
        );
        for (delta, ok) in [(-60i64, false), (-30, true), (30, true), (60, false)] {
            let c = code_at(RFC_SECRET, (now as i64 + delta) as u64);
            assert_eq!(
                check_code(RFC_SECRET, &c, now, None).is_some(),
                ok,
                "delta {delta}"
            );
        }
        assert_eq!(check_code(RFC_SECRET, "12345", now, None), None);
        assert_eq!(check_code(RFC_SECRET, "abcdef", now, None), None);
    }

    #[test]
    fn uri_and_qr() {
        let uri = otpauth_uri(RFC_SECRET, "zonemesh", "alice@example.com").unwrap();
        assert!(
            uri.starts_with("otpauth://totp/zonemesh:alice%40example.com?"),
            "{}",
            &*uri
        );
        assert!(uri.contains(&format!("secret={}", &*secret_base32(RFC_SECRET))));
        assert!(uri.contains("issuer=zonemesh"));
        let svg = qr_svg(&uri).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(qr_terminal(&uri).unwrap().lines().count() > 10);
    }

    #[test]
    fn recovery_codes() {
        let codes = generate_recovery_codes();
        assert_eq!(codes.len(), RECOVERY_CODES);
        let h = hash_recovery_code("a@b.example", &codes[0]);
        assert_eq!(
            h,
            hash_recovery_code("A@B.example", &codes[0].to_uppercase())
        );
        assert_ne!(h, hash_recovery_code("a@b.example", &codes[1]));
    }
}
