//! Failed sign-in accounting: an exponentially growing delay per account and per source
//! address, and automatic blocking of a source that keeps failing across accounts.
//!
//! Pure state with the time passed in; the web layer holds it behind a mutex and turns its
//! answers into responses, audit records and `SecuritySink` calls.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

/// Tuning of delays and blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures allowed without any delay (per account and per source).
    pub free_failures: u32,
    /// Delay after the first failure beyond the free ones; doubles with each further one.
    pub base_delay: Duration,
    /// The delay never grows beyond this: there is no permanent lock.
    pub max_delay: Duration,
    /// A counter is forgotten after this long without a new failure.
    pub failure_memory: Duration,
    /// A source is blocked after this many failures within `block_window` ...
    pub block_after_failures: u32,
    /// ... spread over at least this many distinct accounts.
    pub block_min_accounts: u32,
    /// The window in which failures count toward a block.
    pub block_window: Duration,
    /// How long a block lasts.
    pub block_duration: Duration,
    /// Bound on tracked accounts and sources, so a flood of made-up names cannot exhaust memory.
    pub max_tracked: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            free_failures: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            failure_memory: Duration::from_secs(24 * 3600),
            block_after_failures: 10,
            block_min_accounts: 3,
            block_window: Duration::from_secs(15 * 60),
            block_duration: Duration::from_secs(3600),
            max_tracked: 100_000,
        }
    }
}

impl ThrottleConfig {
    /// Check the values are usable and meet the policy (no hard lock before 10 failures).
    pub fn validate(&self) -> Result<(), String> {
        if self.base_delay.is_zero() || self.max_delay < self.base_delay {
            return Err("throttle: base_delay must be > 0 and <= max_delay".into());
        }
        if self.max_delay > Duration::from_secs(24 * 3600) {
            return Err("throttle: max_delay above 24 h amounts to a lock".into());
        }
        if self.block_after_failures == 0
            || self.block_min_accounts == 0
            || self.block_duration.is_zero()
        {
            return Err("throttle: block thresholds and duration must be > 0".into());
        }
        if self.max_tracked < 100 {
            return Err("throttle: max_tracked must be at least 100".into());
        }
        Ok(())
    }

    /// The wait imposed after `failures` consecutive failures.
    pub fn delay_after(&self, failures: u32) -> Duration {
        if failures <= self.free_failures {
            return Duration::ZERO;
        }
        let exp = (failures - self.free_failures - 1).min(30);
        self.base_delay
            .saturating_mul(1u32 << exp)
            .min(self.max_delay)
    }
}

#[derive(Clone, Debug)]
struct Counter {
    failures: u32,
    last_failure: SystemTime,
    next_allowed: SystemTime,
}

#[derive(Clone, Debug, Default)]
struct SourceState {
    counter: Option<Counter>,
    /// Recent failures: time and account key, oldest first.
    recent: VecDeque<(SystemTime, String)>,
    blocked_until: Option<SystemTime>,
}

/// Whether an attempt may go ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Check the credentials.
    Allowed,
    /// Too early: answer without checking, after this long it may be tried again.
    Wait(Duration),
    /// The source is blocked until then.
    Blocked(SystemTime),
}

/// What a failure led to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureOutcome {
    /// Consecutive failures of the account.
    pub account_failures: u32,
    /// Failures of the source.
    pub source_failures: u32,
    /// The wait now imposed (the longer of account and source delay).
    pub delay: Duration,
    /// Set when this failure got the source blocked, until then.
    pub blocked_until: Option<SystemTime>,
}

/// Failure counters per account and per source.
#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleConfig,
    accounts: HashMap<String, Counter>,
    sources: HashMap<IpAddr, SourceState>,
}

impl Throttle {
    /// Empty state with `cfg`.
    pub fn new(cfg: ThrottleConfig) -> Self {
        Self {
            cfg,
            accounts: HashMap::new(),
            sources: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ThrottleConfig {
        &self.cfg
    }

    fn live<'a>(&self, c: Option<&'a Counter>, now: SystemTime) -> Option<&'a Counter> {
        c.filter(|c| {
            now.duration_since(c.last_failure).unwrap_or_default() < self.cfg.failure_memory
        })
    }

    /// May `source` try `account` now?
    pub fn check(&mut self, account: &str, source: IpAddr, now: SystemTime) -> Gate {
        if let Some(until) = self.blocked_until(source, now) {
            return Gate::Blocked(until);
        }
        let mut wait = Duration::ZERO;
        for c in [
            self.live(self.accounts.get(account), now),
            self.live(
                self.sources.get(&source).and_then(|s| s.counter.as_ref()),
                now,
            ),
        ]
        .into_iter()
        .flatten()
        {
            wait = wait.max(c.next_allowed.duration_since(now).unwrap_or_default());
        }
        if wait.is_zero() {
            Gate::Allowed
        } else {
            Gate::Wait(wait)
        }
    }

    /// When the block on `source` ends, if it is blocked at `now`.
    pub fn blocked_until(&self, source: IpAddr, now: SystemTime) -> Option<SystemTime> {
        self.sources
            .get(&source)
            .and_then(|s| s.blocked_until)
            .filter(|u| *u > now)
    }

    /// Sources blocked at `now`, with the end of their block.
    pub fn blocked_sources(&self, now: SystemTime) -> Vec<(IpAddr, SystemTime)> {
        self.sources
            .iter()
            .filter_map(|(ip, s)| s.blocked_until.filter(|u| *u > now).map(|u| (*ip, u)))
            .collect()
    }

    /// Record a failed attempt of `source` on `account`.
    pub fn record_failure(
        &mut self,
        account: &str,
        source: IpAddr,
        now: SystemTime,
    ) -> FailureOutcome {
        self.prune(now);
        let cfg = self.cfg.clone();
        let bump = |c: Option<Counter>| -> Counter {
            let failures = match c {
                Some(c)
                    if now.duration_since(c.last_failure).unwrap_or_default()
                        < cfg.failure_memory =>
                {
                    c.failures.saturating_add(1)
                }
                _ => 1,
            };
            Counter {
                failures,
                last_failure: now,
                next_allowed: now + cfg.delay_after(failures),
            }
        };
        let acct = bump(self.accounts.remove(account));
        let account_failures = acct.failures;
        let account_next = acct.next_allowed;
        self.accounts.insert(account.to_string(), acct);

        let src = self.sources.entry(source).or_default();
        let c = bump(src.counter.take());
        let source_failures = c.failures;
        let source_next = c.next_allowed;
        src.counter = Some(c);
        src.recent.push_back((now, account.to_string()));
        while src
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t).unwrap_or_default() >= cfg.block_window)
        {
            src.recent.pop_front();
        }
        // Keep the window bounded even under a flood.
        while src.recent.len() > (cfg.block_after_failures as usize).max(16) * 4 {
            src.recent.pop_front();
        }
        let mut blocked_until = None;
        let already = src.blocked_until.is_some_and(|u| u > now);
        if !already && src.recent.len() >= cfg.block_after_failures as usize {
            let distinct: HashSet<&str> = src.recent.iter().map(|(_, a)| a.as_str()).collect();
            if distinct.len() >= cfg.block_min_accounts as usize {
                let until = now + cfg.block_duration;
                src.blocked_until = Some(until);
                src.recent.clear();
                blocked_until = Some(until);
            }
        }
        let delay = account_next
            .max(source_next)
            .duration_since(now)
            .unwrap_or_default();
        FailureOutcome {
            account_failures,
            source_failures,
            delay,
            blocked_until,
        }
    }

    /// A successful sign-in clears the account's counter. The source's counter is left to
    /// decay, so one valid account cannot be used to reset a source that guesses others.
    pub fn record_success(&mut self, account: &str, _source: IpAddr, _now: SystemTime) {
        self.accounts.remove(account);
    }

    /// Lift a block early (an operator decision).
    pub fn unblock(&mut self, source: IpAddr) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.blocked_until = None;
            s.recent.clear();
        }
    }

    fn prune(&mut self, now: SystemTime) {
        if self.accounts.len() + self.sources.len() < self.cfg.max_tracked {
            return;
        }
        let mem = self.cfg.failure_memory;
        let fresh = |t: SystemTime| now.duration_since(t).unwrap_or_default() < mem;
        self.accounts.retain(|_, c| fresh(c.last_failure));
        self.sources.retain(|_, s| {
            s.blocked_until.is_some_and(|u| u > now)
                || s.counter.as_ref().is_some_and(|c| fresh(c.last_failure))
        });
        // Still full: forget the accounts with the fewest failures first. Sources (and their
        // blocks) are kept, since those are what stops a flood.
        if self.accounts.len() + self.sources.len() >= self.cfg.max_tracked {
            let mut by_failures: Vec<(u32, String)> = self
                .accounts
                .iter()
                .map(|(k, c)| (c.failures, k.clone()))
                .collect();
            by_failures.sort();
            let excess =
                (self.accounts.len() + self.sources.len()).saturating_sub(self.cfg.max_tracked / 2);
            for (_, k) in by_failures.into_iter().take(excess) {
                self.accounts.remove(&k);
            }
        }
    }

    /// Number of tracked accounts and sources (for tests and metrics).
    pub fn tracked(&self) -> (usize, usize) {
        (self.accounts.len(), self.sources.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ThrottleConfig {
        ThrottleConfig {
            free_failures: 2,
            base_delay: Duration::from_secs(1),
            block_after_failures: 6,
            block_min_accounts: 3,
            ..Default::default()
        }
    }

    const T0: SystemTime = SystemTime::UNIX_EPOCH;
    fn at(secs: u64) -> SystemTime {
        T0 + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn delays_grow_exponentially_and_cap() {
        let c = ThrottleConfig::default();
        let d: Vec<u64> = (1..=8).map(|n| c.delay_after(n).as_secs()).collect();
        assert_eq!(d, vec![0, 0, 0, 1, 2, 4, 8, 16]);
        assert_eq!(c.delay_after(40), c.max_delay);
        assert!(c.validate().is_ok());
    }

    #[test]
    fn account_delay_then_reset_on_success() {
        let mut t = Throttle::new(cfg());
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        let mut now = at(0);
        let mut delays = vec![];
        for _ in 0..6 {
            assert_eq!(t.check("a", ip, now), Gate::Allowed);
            let o = t.record_failure("a", ip, now);
            delays.push(o.delay.as_secs());
            // Too early is refused with the remaining wait.
            if !o.delay.is_zero() {
                assert_eq!(t.check("a", ip, now), Gate::Wait(o.delay));
            }
            now += o.delay;
        }
        assert_eq!(delays, vec![0, 0, 1, 2, 4, 8]);
        // One account from one source never gets the source blocked.
        assert_eq!(t.blocked_until(ip, now), None);
        // Never permanent: failures are forgotten after failure_memory.
        let later = now + cfg().failure_memory;
        assert_eq!(t.check("a", ip, later), Gate::Allowed);
        t.record_success("a", ip, later);
        assert_eq!(t.tracked().0, 0);
    }

    #[test]
    fn spraying_source_gets_blocked_others_unaffected() {
        let mut t = Throttle::new(cfg());
        let bad: IpAddr = "127.0.0.2".parse().unwrap();
        let good: IpAddr = "127.0.0.3".parse().unwrap();
        let mut now = at(0);
        let mut blocked = None;
        for i in 0..6 {
            let o = t.record_failure(&format!("user{i}"), bad, now);
            now += o.delay;
            blocked = blocked.or(o.blocked_until);
        }
        let until = blocked.expect("blocked after 6 failures over 6 accounts");
        assert_eq!(t.check("someone", bad, now), Gate::Blocked(until));
        assert_eq!(t.blocked_sources(now), vec![(bad, until)]);
        assert_eq!(t.check("user0", good, now), Gate::Allowed);
        // Blocks end.
        assert!(matches!(
            t.check("x", bad, until + Duration::from_secs(1)),
            Gate::Allowed | Gate::Wait(_)
        ));
    }

    #[test]
    fn bounded_memory() {
        let mut t = Throttle::new(ThrottleConfig {
            max_tracked: 100,
            block_after_failures: 1000,
            ..Default::default()
        });
        let ip: IpAddr = "127.0.0.2".parse().unwrap();
        for i in 0..1000 {
            t.record_failure(&format!("made-up-{i}"), ip, at(i));
        }
        let (a, s) = t.tracked();
        assert!(a + s <= 100, "{a} + {s}");
    }
}
