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
        .map_err(AuthError::Totp)
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
    Ok(Zeroizing::new(t.to_url().map_err(AuthError::Totp)?))
}

/// The URI as an inline SVG QR code (no XML prolog, so it can sit inside HTML).
pub fn qr_svg(uri: &str) -> Result<String, AuthError> {
    let code = QrCode::new(uri.as_bytes()).map_err(AuthError::QrCode)?;
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
    let code = QrCode::new(uri.as_bytes()).map_err(AuthError::QrCode)?;
    Ok(code
        .render::<unicode::Dense1x2>()
        .dark_color(unicode::Dense1x2::Light)
        .light_color(unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// The recovery-code alphabet: Crockford's base32 (no i, l, o, u), 32 symbols, so each
/// character is exactly 5 random bits.
pub const RECOVERY_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
/// Characters per recovery code (50 bits), shown as two groups of five.
pub const RECOVERY_CODE_CHARS: usize = 10;

/// A recovery code from 64 random bits: each character takes the next 5 bits, so every
/// symbol is equally likely (no modulo bias).
pub fn recovery_code_from(bits: u64) -> Zeroizing<String> {
    let mut s = Zeroizing::new(String::with_capacity(RECOVERY_CODE_CHARS + 1));
    for i in 0..RECOVERY_CODE_CHARS {
        if i == 5 {
            s.push('-');
        }
        let idx = ((bits >> (5 * i)) & 31) as usize;
        s.push(RECOVERY_ALPHABET[idx] as char);
    }
    s
}

/// Fresh recovery codes (`xxxxx-xxxxx`, 50 bits each).
pub fn generate_recovery_codes() -> Vec<Zeroizing<String>> {
    (0..RECOVERY_CODES)
        .map(|_| {
            let mut raw = Zeroizing::new([0u8; 8]);
            rand::fill(&mut raw[..]);
            recovery_code_from(u64::from_le_bytes(*raw))
        })
        .collect()
}

/// A typed code as it is hashed: letters and digits only, lower case, with the letters
/// Crockford's base32 reads as digits mapped to them.
fn normalize_recovery_code(code: &str) -> Zeroizing<String> {
    Zeroizing::new(
        code.chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .map(|c| match c.to_ascii_lowercase() {
                'o' => '0',
                'i' | 'l' => '1',
                c => c,
            })
            .collect(),
    )
}

const RECOVERY_V2: &str = "v2$";

fn recovery_digest(version: &[u8], salt: &[u8], email: &str, norm: &str) -> String {
    let mut h = Sha256::new();
    h.update(version);
    h.update(salt);
    h.update(super::password::normalize_email(email).as_bytes());
    h.update(b"\0");
    h.update(norm.as_bytes());
    hex::encode(h.finalize())
}

/// How a recovery code is stored: `v2$<salt>$<hash>`, SHA-256 over a random 16-byte salt of
/// its own, the account and the normalised code. The codes carry 50 random bits and are
/// rate-limited like passwords, so a fast hash is enough; the salt makes every stored code
/// a separate target, even where two users hold the same code.
pub fn hash_recovery_code(email: &str, code: &str) -> String {
    let mut salt = [0u8; 16];
    rand::fill(&mut salt);
    let norm = normalize_recovery_code(code);
    format!(
        "{RECOVERY_V2}{}${}",
        hex::encode(salt),
        recovery_digest(b"zonemesh/recovery-code/v2\0", &salt, email, &norm)
    )
}

/// Whether `code` matches a stored recovery code: the salted form, or the unsalted hex
/// SHA-256 of records made before salts.
pub fn recovery_code_matches(email: &str, code: &str, stored: &str) -> bool {
    let norm = normalize_recovery_code(code);
    let expected = match stored.strip_prefix(RECOVERY_V2) {
        Some(rest) => {
            let Some((salt, _)) = rest.split_once('$') else {
                return false;
            };
            let Ok(salt) = hex::decode(salt) else {
                return false;
            };
            format!(
                "{RECOVERY_V2}{}${}",
                hex::encode(&salt),
                recovery_digest(b"zonemesh/recovery-code/v2\0", &salt, email, &norm)
            )
        }
        None => recovery_digest(b"zonemesh/recovery-code/v1\0", b"", email, &norm),
    };
    aws_lc_rs::constant_time::verify_slices_are_equal(expected.as_bytes(), stored.as_bytes())
        .is_ok()
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
        assert!(recovery_code_matches(
            "A@B.example",
            &codes[0].to_uppercase(),
            &h
        ));
        assert!(!recovery_code_matches("a@b.example", &codes[1], &h));
        assert!(!recovery_code_matches("c@b.example", &codes[0], &h));
        // Crockford's reading of look-alikes.
        let h = hash_recovery_code("a@b.example", "01abc-defgh");
        assert!(recovery_code_matches("a@b.example", "OLABC DEFGH", &h));
    }

    #[test]
    fn recovery_alphabet_is_32_symbols_drawn_without_bias() {
        let set: std::collections::HashSet<u8> = RECOVERY_ALPHABET.iter().copied().collect();
        assert_eq!(set.len(), 32, "32 distinct symbols: 5 bits each");
        // Structural: every 5-bit value maps to its own symbol at every position, so a
        // uniform 64-bit draw gives uniform characters.
        for pos in 0..RECOVERY_CODE_CHARS {
            let seen: std::collections::HashSet<char> = (0..32u64)
                .map(|v| {
                    let code = recovery_code_from(v << (5 * pos));
                    code.replace('-', "").chars().nth(pos).unwrap()
                })
                .collect();
            assert_eq!(seen.len(), 32, "position {pos}");
        }
        // Statistical: chi-square of 200,000 drawn characters over 32 symbols (31 degrees of
        // freedom; 75 is beyond p = 1e-5). A 31-symbol alphabet with `byte % 31` gives
        // several hundred here.
        let mut counts = std::collections::HashMap::<char, u64>::new();
        let mut n = 0u64;
        for _ in 0..2000 {
            for code in generate_recovery_codes() {
                for c in code.chars().filter(|c| *c != '-') {
                    *counts.entry(c).or_default() += 1;
                    n += 1;
                }
            }
        }
        assert_eq!(counts.len(), 32, "{counts:?}");
        let expected = n as f64 / 32.0;
        let chi2: f64 = counts
            .values()
            .map(|&c| (c as f64 - expected).powi(2) / expected)
            .sum();
        assert!(
            chi2 < 75.0,
            "chi-square {chi2:.1} over {n} characters: {counts:?}"
        );
    }

    #[test]
    fn recovery_hashes_are_salted_per_code() {
        let code = "abcde-fghjk";
        let a = hash_recovery_code("alice@example.com", code);
        let b = hash_recovery_code("bob@example.com", code);
        let a2 = hash_recovery_code("alice@example.com", code);
        assert_ne!(
            a, a2,
            "the same code for the same user is stored differently"
        );
        assert_ne!(a.rsplit('$').next(), b.rsplit('$').next());
        assert!(a.starts_with("v2$") && a.split('$').nth(1).unwrap().len() == 32);
        assert!(recovery_code_matches("alice@example.com", code, &a2));
        assert!(recovery_code_matches("bob@example.com", code, &b));
        // Records from before salts still verify.
        let mut h = Sha256::new();
        h.update(b"zonemesh/recovery-code/v1\0");
        h.update(b"alice@example.com\0abcdefghjk");
        let v1 = hex::encode(h.finalize());
        assert!(recovery_code_matches("alice@example.com", code, &v1));
        assert!(!recovery_code_matches(
            "alice@example.com",
            "abcde-fghjm",
            &v1
        ));
    }
}
