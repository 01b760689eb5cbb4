//! The built-in patterns (sshd, Kamailio, Asterisk) and operator regular expressions that
//! turn one log line into an authentication failure of one source address.
//!
//! The address is only ever taken from the position a pattern fixes, and every pattern is
//! anchored at the end of the line: the parts an attacker controls (a user name, a SIP
//! display name) come before that fixed tail, so a user name such as
//! `x from 1.2.3.4 port 1 ssh2` can never stand in for the real source.

use regex::Regex;
use std::net::IpAddr;
use std::sync::LazyLock;

/// Event kind of a failed SSH authentication.
pub const SSH_KIND: &str = "ssh.auth_failure";
/// Event kind of a failed SIP registration or authentication (digest challenge answered
/// wrongly, or refused outright).
pub const SIP_KIND: &str = "sip.auth_failure";
/// Event kind of an operator pattern's match.
pub const LOG_KIND: &str = "log.auth_failure";

/// One authentication failure found in a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub kind: &'static str,
    pub source: IpAddr,
    /// Which pattern matched (never the attacker's text).
    pub rule: &'static str,
}

/// An IPv4 or IPv6 literal followed by a space; parsed afterwards, so a lookalike never
/// passes.
const IP: &str = r"[0-9A-Fa-f:.]{2,45}";
/// `IPv4[:port]` or `[IPv6][:port]` (two groups: the first that matched is the address).
const HOST_PORT: &str = r"(?:\[([0-9A-Fa-f:.]{2,45})\]|(\d{1,3}(?:\.\d{1,3}){3}))(?::\d{1,5})?";

fn re(s: &str) -> Regex {
    Regex::new(s).expect("built-in pattern compiles")
}

/// sshd's messages, after the `sshd[PID]: ` tag (or the journal's MESSAGE field).
static SSHD: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    let tail = r" port \d{1,5}(?: ssh2)?(?: \[preauth\])?$";
    vec![
        (
            "failed-auth",
            re(&format!(r"^Failed \S+ for .* from ({IP}){tail}")),
        ),
        (
            "invalid-user",
            re(&format!(r"^Invalid user .* from ({IP}){tail}")),
        ),
        (
            "max-attempts",
            re(&format!(
                r"^error: maximum authentication attempts exceeded for .* from ({IP}){tail}"
            )),
        ),
        (
            "closed-preauth",
            re(&format!(
                r"^(?:Connection closed by|Disconnected from) (?:authenticating|invalid) user .* ({IP}) port \d{{1,5}} \[preauth\]$"
            )),
        ),
        (
            "pam-auth-failure",
            re(&format!(
                r"^pam_unix\(sshd:auth\): authentication failure; logname=\S* uid=\d+ euid=\d+ tty=\S* ruser=\S* rhost=({IP})(?:\s+user=.*)?$"
            )),
        ),
    ]
});

/// The syslog tag of sshd in an auth log file (`sshd[123]: `, `sshd-session[123]: `).
static SSHD_TAG: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?:^|\s)sshd(?:-session)?(?:\[\d+\])?: (.*)$"));

/// Kamailio: the usual `xlog` lines of auth modules and of replies to REGISTER.
static KAMAILIO: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    vec![
        (
            "auth-error",
            re(&format!(r"Auth error for .* from ({IP}) cause -?\d+$")),
        ),
        (
            "register-refused",
            re(&format!(
                r"(?:401 Unauthorized|403 Forbidden) to REGISTER from {HOST_PORT}$"
            )),
        ),
    ]
});

/// Asterisk: chan_sip's failed registrations and res_pjsip's refused requests.
static ASTERISK: LazyLock<Vec<(&'static str, Regex)>> = LazyLock::new(|| {
    vec![
        (
            "registration-failed",
            re(&format!(
                r"Registration from '.*' failed for '{HOST_PORT}' - (?:Wrong password|No matching peer found|Username/auth name mismatch|Device does not match ACL|Not a local domain|Peer is not supposed to register)$"
            )),
        ),
        (
            "request-failed",
            // A Call-ID has no spaces (RFC 3261 `word`), so `\S*` fixes where it ends.
            re(&format!(
                r"Request '[A-Z]+' from '.*' failed for '{HOST_PORT}' \(callid: \S*\) - (?:No matching endpoint found|Failed to authenticate|Not matched to an endpoint)$"
            )),
        ),
    ]
});

fn first_match(rules: &[(&'static str, Regex)], text: &str, kind: &'static str) -> Option<Hit> {
    rules.iter().find_map(|(rule, r)| {
        let caps = r.captures(text)?;
        let ip = caps
            .iter()
            .skip(1)
            .flatten()
            .next()?
            .as_str()
            .parse::<IpAddr>()
            .ok()?;
        Some(Hit {
            kind,
            source: ip.to_canonical(),
            rule,
        })
    })
}

/// What a line is read as.
#[derive(Clone, Debug)]
pub enum Parser {
    /// An auth log file: only lines tagged `sshd[PID]:` count.
    SshdFile,
    /// The journal's MESSAGE of the ssh/sshd units.
    SshdMessage,
    Kamailio,
    Asterisk,
    /// An operator's pattern: the capture group named `source` (or the first group)
    /// holds the address.
    Regex(Box<Regex>),
}

/// Why an operator pattern cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PatternError {
    #[error("pattern {0:?}: {1}")]
    Invalid(String, regex::Error),
    #[error("pattern {0:?} has no capture group for the source address (use (?P<source>...))")]
    NoGroup(String),
}

impl Parser {
    /// An operator pattern, checked for a group that names the address.
    pub fn regex(pattern: &str) -> Result<Self, PatternError> {
        let r = regex::RegexBuilder::new(pattern)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| PatternError::Invalid(pattern.to_string(), e))?;
        if r.captures_len() < 2 {
            return Err(PatternError::NoGroup(pattern.to_string()));
        }
        Ok(Self::Regex(Box::new(r)))
    }

    /// The failure in `line`, if it reports one.
    pub fn parse(&self, line: &str) -> Option<Hit> {
        let line = line.trim_end_matches(['\r', '\n']);
        match self {
            Self::SshdFile => {
                let msg = SSHD_TAG.captures(line)?.get(1)?.as_str();
                first_match(&SSHD, msg, SSH_KIND)
            }
            Self::SshdMessage => first_match(&SSHD, line, SSH_KIND),
            Self::Kamailio => first_match(&KAMAILIO, line, SIP_KIND),
            Self::Asterisk => first_match(&ASTERISK, line, SIP_KIND),
            Self::Regex(r) => {
                let caps = r.captures(line)?;
                let m = caps.name("source").or_else(|| caps.get(1))?;
                let s = m.as_str();
                let ip = s
                    .parse::<std::net::SocketAddr>()
                    .map(|a| a.ip())
                    .or_else(|_| s.trim_start_matches('[').trim_end_matches(']').parse())
                    .ok()?;
                Some(Hit {
                    kind: LOG_KIND,
                    source: ip.to_canonical(),
                    rule: "operator-pattern",
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn src(p: &Parser, line: &str) -> Option<IpAddr> {
        p.parse(line).map(|h| h.source)
    }

    #[test]
    fn real_sshd_lines_name_their_source() {
        let p = Parser::SshdFile;
        for (line, want) in [
            (
                "Dec  1 20:00:01 a1 sshd[4242]: Failed password for root from 198.18.7.7 port 50522 ssh2",
                "198.18.7.7",
            ),
            (
                "2026-12-01T20:00:01.123456+00:00 a1 sshd[4242]: Failed password for invalid user admin from 198.18.7.8 port 50522 ssh2",
                "198.18.7.8",
            ),
            (
                "Dec  1 20:00:01 a1 sshd[4242]: Invalid user oracle from 2001:db8::7 port 4711",
                "2001:db8::7",
            ),
            (
                "Dec  1 20:00:01 a1 sshd[4242]: error: maximum authentication attempts exceeded for root from 198.18.7.9 port 22 ssh2 [preauth]",
                "198.18.7.9",
            ),
            (
                "Dec  1 20:00:01 a1 sshd-session[17]: Connection closed by authenticating user root 198.18.7.10 port 38000 [preauth]",
                "198.18.7.10",
            ),
            (
                "Dec  1 20:00:01 a1 sshd[17]: Disconnected from invalid user test 198.18.7.11 port 38000 [preauth]",
                "198.18.7.11",
            ),
            (
                "Dec  1 20:00:01 a1 sshd[17]: pam_unix(sshd:auth): authentication failure; logname= uid=0 euid=0 tty=ssh ruser= rhost=198.18.7.12  user=root",
                "198.18.7.12",
            ),
            (
                "Dec  1 20:00:01 a1 sshd[17]: Failed publickey for git from ::ffff:198.18.7.13 port 1 ssh2",
                "198.18.7.13",
            ),
        ] {
            assert_eq!(src(&p, line), Some(ip(want)), "{line}");
        }
        for line in [
            "Dec  1 20:00:01 a1 sshd[17]: Accepted password for root from 198.18.7.7 port 1 ssh2",
            "Dec  1 20:00:01 a1 sudo[17]: Failed password for root from 198.18.7.7 port 1 ssh2",
            "Dec  1 20:00:01 a1 sshd[17]: Failed password for root from 999.1.1.1 port 1 ssh2",
            "Dec  1 20:00:01 a1 sshd[17]: Failed password for root from example.org port 1 ssh2",
            "",
        ] {
            assert_eq!(src(&p, line), None, "{line}");
        }
        // The journal's MESSAGE has no tag.
        assert_eq!(
            src(
                &Parser::SshdMessage,
                "Failed password for root from 198.18.7.7 port 50522 ssh2"
            ),
            Some(ip("198.18.7.7"))
        );
    }

    #[test]
    fn a_spoofed_address_in_the_user_name_is_never_the_source() {
        let p = Parser::SshdFile;
        for line in [
            "Dec  1 20:00:01 a1 sshd[1]: Failed password for invalid user x from 1.2.3.4 port 22 ssh2 from 198.18.7.20 port 50000 ssh2",
            "Dec  1 20:00:01 a1 sshd[1]: Invalid user from 1.2.3.4 port 22 from 198.18.7.20 port 50000",
            "Dec  1 20:00:01 a1 sshd[1]: Connection closed by invalid user 1.2.3.4 port 9 [preauth] 198.18.7.20 port 50000 [preauth]",
            "Dec  1 20:00:01 a1 sshd[1]: error: maximum authentication attempts exceeded for x from 1.2.3.4 port 1 ssh2 from 198.18.7.20 port 2 ssh2 [preauth]",
        ] {
            assert_eq!(src(&p, line), Some(ip("198.18.7.20")), "{line}");
        }
        // A user name that ends the line with a fake tail after the real one: no match at
        // all rather than the fake address (the real line always ends with sshd's tail).
        let fake_tail = "Dec  1 20:00:01 a1 sshd[1]: Invalid user a from 198.18.7.20 port 5 x from 1.2.3.4 port";
        assert_eq!(src(&p, fake_tail), None);
        let asterisk = Parser::Asterisk;
        assert_eq!(
            src(
                &asterisk,
                "[Dec  1 20:00:01] NOTICE[99] chan_sip.c: Registration from '\"x' failed for '1.2.3.4:5060' - Wrong password\" <sip:100@pbx>' failed for '198.18.7.21:5060' - Wrong password"
            ),
            Some(ip("198.18.7.21"))
        );
        assert_eq!(
            src(
                &asterisk,
                "[Dec  1 20:00:01] NOTICE[99] res_pjsip/pjsip_distributor.c: Request 'REGISTER' from '<sip:x' failed for '1.2.3.4:5060' (callid: a) - No matching endpoint found@pbx>' failed for '198.18.7.22:5060' (callid: abc@x) - No matching endpoint found"
            ),
            Some(ip("198.18.7.22"))
        );
        let kam = Parser::Kamailio;
        assert_eq!(
            src(
                &kam,
                "Dec  1 20:00:01 pbx /usr/sbin/kamailio[7]: NOTICE: <script>: Auth error for x from 1.2.3.4 cause -1@pbx from 198.18.7.23 cause -2"
            ),
            Some(ip("198.18.7.23"))
        );
    }

    #[test]
    fn sip_registrar_lines_name_their_source() {
        let kam = Parser::Kamailio;
        assert_eq!(
            src(
                &kam,
                "Dec  1 20:00:01 pbx /usr/sbin/kamailio[7]: NOTICE: <script>: Auth error for 100@pbx.test from 198.18.8.1 cause -2"
            ),
            Some(ip("198.18.8.1"))
        );
        assert_eq!(
            src(
                &kam,
                "Dec  1 20:00:01 pbx /usr/sbin/kamailio[7]: NOTICE: <script>: 403 Forbidden to REGISTER from 198.18.8.2:5060"
            ),
            Some(ip("198.18.8.2"))
        );
        assert_eq!(
            src(
                &kam,
                "Dec  1 20:00:01 pbx kamailio[7]: NOTICE: <script>: 401 Unauthorized to REGISTER from [2001:db8::8]:5060"
            ),
            Some(ip("2001:db8::8"))
        );
        assert_eq!(
            src(&kam, "kamailio[7]: 200 OK to REGISTER from 198.18.8.2:5060"),
            None
        );
        let ast = Parser::Asterisk;
        assert_eq!(
            src(
                &ast,
                "[Dec  1 20:00:01] NOTICE[1234] chan_sip.c: Registration from '\"100\" <sip:100@198.18.0.1>' failed for '198.18.8.3:5060' - Wrong password"
            ),
            Some(ip("198.18.8.3"))
        );
        assert_eq!(
            src(
                &ast,
                "[2026-12-01 20:00:01] NOTICE[1234] res_pjsip/pjsip_distributor.c: Request 'REGISTER' from '<sip:100@pbx>' failed for '198.18.8.4:5061' (callid: 8f3a-1@x) - Failed to authenticate"
            ),
            Some(ip("198.18.8.4"))
        );
        assert_eq!(
            src(
                &ast,
                "[2026-12-01 20:00:01] NOTICE[1234] res_pjsip/pjsip_distributor.c: Request 'REGISTER' from '<sip:100@pbx>' failed for '[2001:db8::9]:5061' (callid: x) - No matching endpoint found"
            ),
            Some(ip("2001:db8::9"))
        );
    }

    #[test]
    fn operator_patterns_need_a_source_group() {
        assert!(matches!(
            Parser::regex("login failed"),
            Err(PatternError::NoGroup(_))
        ));
        assert!(matches!(
            Parser::regex("(unclosed"),
            Err(PatternError::Invalid(..))
        ));
        let p = Parser::regex(r"^app: bad login user=\S+ ip=(?P<source>\S+)$").unwrap();
        let hit = p.parse("app: bad login user=bob ip=198.18.9.1").unwrap();
        assert_eq!((hit.kind, hit.source), (LOG_KIND, ip("198.18.9.1")));
        assert_eq!(
            p.parse("app: bad login user=bob ip=[2001:db8::1]:443")
                .map(|h| h.source),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(p.parse("app: bad login user=bob ip=nothing"), None);
        let first = Parser::regex(r"denied (\S+)$").unwrap();
        assert_eq!(
            first.parse("x denied 198.18.9.2").map(|h| h.source),
            Some(ip("198.18.9.2"))
        );
    }
}
