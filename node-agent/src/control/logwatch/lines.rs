//! Bytes to lines with a cap: a line longer than the cap is dropped whole (never matched,
//! never buffered past the cap), and bytes that are not UTF-8 are replaced.

/// Longest log line looked at.
pub const MAX_LINE: usize = 4096;

/// Splits a byte stream into lines of at most `cap` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    cap: usize,
    buf: Vec<u8>,
    /// Inside a line already longer than the cap: skip to its end.
    skipping: bool,
    /// Lines dropped for their length.
    pub overlong: u64,
}

impl LineSplitter {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            buf: Vec::new(),
            skipping: false,
            overlong: 0,
        }
    }

    /// Feed `bytes`; `line` is called with each complete line (without its newline).
    pub fn push(&mut self, mut bytes: &[u8], mut line: impl FnMut(&str)) {
        while !bytes.is_empty() {
            let nl = bytes.iter().position(|b| *b == b'\n');
            let (part, rest, done) = match nl {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if !self.skipping {
                if self.buf.len() + part.len() > self.cap {
                    self.buf.clear();
                    self.skipping = true;
                    self.overlong += 1;
                } else {
                    self.buf.extend_from_slice(part);
                }
            }
            if done {
                if !self.skipping {
                    line(&String::from_utf8_lossy(&self.buf));
                }
                self.buf.clear();
                self.skipping = false;
            }
        }
    }

    /// Forget a partial line (the file was replaced or truncated).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }

    /// Bytes held for an unfinished line (at most the cap).
    pub fn held(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &mut LineSplitter, b: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        s.push(b, |l| out.push(l.to_string()));
        out
    }

    #[test]
    fn lines_split_across_reads_and_long_ones_are_dropped_whole() {
        let mut s = LineSplitter::new(8);
        assert_eq!(lines(&mut s, b"abc"), Vec::<String>::new());
        assert_eq!(lines(&mut s, b"de\nfg\nhi"), vec!["abcde", "fg"]);
        assert_eq!(lines(&mut s, b"\n"), vec!["hi"]);
        // 20 bytes in pieces: dropped, and the line after it is whole.
        assert!(lines(&mut s, b"0123456").is_empty());
        assert!(lines(&mut s, b"789012345").is_empty());
        assert!(s.held() <= 8);
        assert_eq!(lines(&mut s, b"6789\nok\n"), vec!["ok"]);
        assert_eq!(s.overlong, 1);
        // Not UTF-8: replaced, still one line.
        assert_eq!(lines(&mut s, b"a\xff\xfeb\n"), vec!["a\u{fffd}\u{fffd}b"]);
    }
}
