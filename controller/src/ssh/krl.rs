//! OpenSSH key revocation lists (PROTOCOL.krl), built from the revoked serials of the SSH
//! CAs. sshd reads the file named by `RevokedKeys`, ssh the one named by
//! `RevokedHostKeys`; `ssh-keygen -Q -f FILE` checks a key against it. Only the parts
//! zonemesh needs are written: one certificates section per CA (user, host) holding a
//! serial list. Nothing here reads a clock or a file.

/// `"SSHKRL\n\0"`.
const KRL_MAGIC: u64 = 0x5353_484b_524c_0a00;
const KRL_FORMAT_VERSION: u32 = 1;
const KRL_SECTION_CERTIFICATES: u8 = 1;
const KRL_SECTION_CERT_SERIAL_LIST: u8 = 0x20;

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// A KRL revoking `serials` of certificates signed by the CA whose public key blob (SSH
/// wire encoding) is `ca_key_blob`. Serial 0 cannot be revoked by a KRL and is skipped;
/// the list is written sorted and without duplicates. An empty list gives a valid KRL
/// that revokes nothing.
pub fn build(
    ca_key_blob: &[u8],
    serials: &[u64],
    krl_version: u64,
    generated_unix: u64,
) -> Vec<u8> {
    build_sections(&[(ca_key_blob, serials)], krl_version, generated_unix)
}

/// A KRL with one certificates section per `(CA public key blob, revoked serials)`, as
/// [`build`] writes one (a CA without serials gets no section).
pub fn build_sections(
    sections: &[(&[u8], &[u64])],
    krl_version: u64,
    generated_unix: u64,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        64 + sections
            .iter()
            .map(|(ca, s)| 16 + ca.len() + s.len() * 8)
            .sum::<usize>(),
    );
    out.extend_from_slice(&KRL_MAGIC.to_be_bytes());
    out.extend_from_slice(&KRL_FORMAT_VERSION.to_be_bytes());
    out.extend_from_slice(&krl_version.to_be_bytes());
    out.extend_from_slice(&generated_unix.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes()); // flags
    put_string(&mut out, b""); // reserved
    put_string(&mut out, b"zonemesh SSH certificates");
    for (ca_key_blob, serials) in sections {
        let mut list: Vec<u64> = serials.iter().copied().filter(|s| *s != 0).collect();
        list.sort_unstable();
        list.dedup();
        if list.is_empty() {
            continue;
        }
        let mut serial_list = Vec::with_capacity(list.len() * 8);
        for s in &list {
            serial_list.extend_from_slice(&s.to_be_bytes());
        }
        let mut section = Vec::new();
        put_string(&mut section, ca_key_blob);
        put_string(&mut section, b""); // reserved
        section.push(KRL_SECTION_CERT_SERIAL_LIST);
        put_string(&mut section, &serial_list);
        out.push(KRL_SECTION_CERTIFICATES);
        put_string(&mut out, &section);
    }
    out
}

/// The serials a KRL from [`build`] revokes, of every CA's section (for checks and the
/// agent's log line).
pub fn serials(krl: &[u8]) -> Option<Vec<u64>> {
    let mut r = Reader(krl);
    if r.u64()? != KRL_MAGIC || r.u32()? != KRL_FORMAT_VERSION {
        return None;
    }
    r.u64()?;
    r.u64()?;
    r.u64()?;
    r.string()?;
    r.string()?;
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let kind = r.byte()?;
        let data = r.string()?;
        if kind != KRL_SECTION_CERTIFICATES {
            continue;
        }
        let mut s = Reader(data);
        s.string()?;
        s.string()?;
        while !s.0.is_empty() {
            let sub = s.byte()?;
            let body = s.string()?;
            if sub == KRL_SECTION_CERT_SERIAL_LIST {
                let mut b = Reader(body);
                while !b.0.is_empty() {
                    out.push(b.u64()?);
                }
            }
        }
    }
    Some(out)
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn byte(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap_or([0; 4])))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_round_trip_sorted_without_zero_or_duplicates() {
        let krl = build(b"blob", &[9, 3, 0, 3, 7], 5, 1_700_000_000);
        assert_eq!(&krl[..8], b"SSHKRL\n\0");
        assert_eq!(serials(&krl), Some(vec![3, 7, 9]));
    }

    #[test]
    fn an_empty_list_is_a_krl_without_sections() {
        let krl = build(b"blob", &[], 1, 0);
        assert_eq!(serials(&krl), Some(vec![]));
        assert_eq!(krl.len(), 8 + 4 + 8 + 8 + 8 + 4 + 4 + 25);
    }

    #[test]
    fn each_ca_gets_its_own_section() {
        let krl = build_sections(
            &[(b"user", &[4, 2]), (b"host", &[]), (b"host2", &[8])],
            1,
            0,
        );
        assert_eq!(serials(&krl), Some(vec![2, 4, 8]));
        let one = build(b"user", &[4, 2], 1, 0);
        assert_eq!(krl.len(), one.len() + 1 + 4 + (4 + 5) + 4 + 1 + 4 + 8);
    }

    #[test]
    fn garbage_is_not_a_krl() {
        assert_eq!(serials(b"not a krl"), None);
        let mut krl = build(b"blob", &[1], 1, 0);
        krl.truncate(krl.len() - 3);
        assert_eq!(serials(&krl), None);
    }
}
