//! Strings that came from outside (typed at sign-in, reported by a node, named in an
//! event) on their way to a terminal or a log line: control characters are shown escaped,
//! never interpreted, and stored copies are capped in length.

use std::fmt::{self, Write as _};

/// Longest e-mail address kept from a sign-in form (RFC 5321 path limit).
pub const MAX_EMAIL: usize = 254;

/// Shows a string with every control character escaped: C0 and DEL as `\x1b`, C1 and the
/// bidirectional overrides as `\u{9b}`; everything else as is. Use it for any field a
/// client chose, in tables and in `tracing` fields alike.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

/// Whether a character could change how a terminal or a log viewer shows what follows.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(needs_escape) {
            // Keeps width and alignment (`{:<20}`) working for the common case.
            return f.pad(self.0);
        }
        let mut out = String::with_capacity(self.0.len() + 8);
        for c in self.0.chars() {
            match c {
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    let _ = write!(out, "\\x{:02x}", c as u32);
                }
                c if needs_escape(c) => {
                    let _ = write!(out, "\\u{{{:x}}}", c as u32);
                }
                c => out.push(c),
            }
        }
        f.pad(&out)
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `s` escaped as an owned string.
pub fn escape(s: &str) -> String {
    Escaped(s).to_string()
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub fn cap(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// An owned copy of at most `max` bytes of `s`.
pub fn capped(s: &str, max: usize) -> String {
    cap(s, max).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_shown_not_interpreted() {
        assert_eq!(escape("a@b.test"), "a@b.test");
        assert_eq!(escape("\x1b[2Jx@y"), "\\x1b[2Jx@y");
        assert_eq!(escape("a\nb\r\tc\x7f"), "a\\x0ab\\x0d\\x09c\\x7f");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(escape("ab\u{202e}cd"), "ab\\u{202e}cd");
        assert_eq!(escape("zürich/ノード"), "zürich/ノード");
        for s in ["\x1b]0;owned\x07", "line\nforged line", "\u{85}next"] {
            let e = escape(s);
            assert!(!e.chars().any(needs_escape), "{e:?}");
        }
        // Alignment still works, escaped or not.
        assert_eq!(format!("{:<6}|", Escaped("ab")), "ab    |");
        assert_eq!(format!("{:<6}|", Escaped("\x1b")), "\\x1b  |");
    }

    #[test]
    fn caps_cut_at_character_boundaries() {
        assert_eq!(cap("abc", 5), "abc");
        assert_eq!(cap("abcdef", 3), "abc");
        // "é" is two bytes: never split it.
        assert_eq!(cap("aé", 2), "a");
        assert_eq!(capped(&"x".repeat(15_000), MAX_EMAIL).len(), MAX_EMAIL);
    }
}
