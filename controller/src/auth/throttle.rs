//! Failed sign-in accounting: an exponentially growing delay per account and source, per
//! source, and per account for sources that never signed in to it, and automatic blocking of
//! a source that keeps failing across accounts.
//!
//! An attempt is reserved before any credential is checked ([`Throttle::begin`]): it counts
//! as a failure from the start and holds the only slot of its source (and of its account,
//! for a source not known to be good), so concurrent requests cannot all pass one check.
//! The reservation is settled when the check is done; an abandoned one stays a failure.
//!
//! A source that completed a sign-in to an account is remembered as known good for it (a
//! bounded number per account); failures from other sources do not delay it, so a stranger
//! who knows an e-mail address cannot keep its owner out.
//!
//! Pure state with the time passed in; the web layer holds it behind a mutex and turns its
//! answers into responses, audit records and `SecuritySink` calls.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::limits::{BoundedKeys, Full, WhenFull, Windowed};

/// Tuning of delays and blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThrottleConfig {
    /// Failures allowed without any delay (per account and source, per source, per account).
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
    /// Bound on tracked accounts, sources and account/source pairs (a third each), so a
    /// flood of made-up names or addresses cannot exhaust memory. Each is a
    /// [`BoundedKeys`] map: the entries with the fewest failures go first, and attempts in
    /// flight, blocks and known-good sources are never evicted.
    pub max_tracked: usize,
    /// Sources remembered per account as known good (the most recent sign-ins).
    pub known_good_per_account: usize,
    /// A known-good source is forgotten this long after its last sign-in.
    pub known_good_memory: Duration,
    /// Attempts reserved at once, over all sources.
    pub max_in_flight: usize,
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
            known_good_per_account: 8,
            known_good_memory: Duration::from_secs(90 * 86_400),
            max_in_flight: 1024,
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
        if self.known_good_per_account > 64 {
            return Err("throttle: known_good_per_account must be at most 64".into());
        }
        if self.max_in_flight == 0 {
            return Err("throttle: max_in_flight must be > 0".into());
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

/// How long a second attempt is told to wait while one of its source or account runs.
pub const IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
struct Counter {
    failures: u32,
    last_failure: SystemTime,
    next_allowed: SystemTime,
}

/// How long the throttle's state means something: the policy its maps judge entries by.
#[derive(Clone, Copy, Debug)]
struct Memory {
    failures: Duration,
    known_good: Duration,
    block_window: Duration,
}

fn within(t: SystemTime, now: SystemTime, d: Duration) -> bool {
    now.duration_since(t).unwrap_or_default() < d
}

fn failures_of(c: Option<&Counter>) -> u64 {
    c.map_or(0, |c| c.failures.into())
}

impl Windowed for Counter {
    type Policy = Memory;
    fn is_live(&self, m: &Memory, now: SystemTime) -> bool {
        within(self.last_failure, now, m.failures)
    }
    fn touched(&self) -> SystemTime {
        self.last_failure
    }
    fn weight(&self) -> u64 {
        self.failures.into()
    }
}

impl Windowed for SourceState {
    type Policy = Memory;
    fn is_live(&self, m: &Memory, now: SystemTime) -> bool {
        self.pinned(m, now)
            || self.counter.as_ref().is_some_and(|c| c.is_live(m, now))
            || self
                .recent
                .back()
                .is_some_and(|(t, _)| within(*t, now, m.block_window))
    }
    fn touched(&self) -> SystemTime {
        let last = self.recent.back().map(|(t, _)| *t);
        self.counter
            .as_ref()
            .map(|c| c.last_failure)
            .max(last)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
    fn weight(&self) -> u64 {
        failures_of(self.counter.as_ref())
    }
    fn pinned(&self, _: &Memory, now: SystemTime) -> bool {
        self.in_flight || self.blocked_until.is_some_and(|u| u > now)
    }
}

impl Windowed for AccountState {
    type Policy = Memory;
    fn is_live(&self, m: &Memory, now: SystemTime) -> bool {
        self.pinned(m, now) || self.counter.as_ref().is_some_and(|c| c.is_live(m, now))
    }
    fn touched(&self) -> SystemTime {
        let good = self.known_good.back().map(|(_, t)| *t);
        self.counter
            .as_ref()
            .map(|c| c.last_failure)
            .max(good)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
    fn weight(&self) -> u64 {
        failures_of(self.counter.as_ref())
    }
    fn pinned(&self, m: &Memory, now: SystemTime) -> bool {
        self.in_flight
            || self
                .known_good
                .iter()
                .any(|(_, t)| within(*t, now, m.known_good))
    }
}

#[derive(Clone, Debug, Default)]
struct SourceState {
    counter: Option<Counter>,
    /// Recent failures: time and account key, oldest first.
    recent: VecDeque<(SystemTime, String)>,
    blocked_until: Option<SystemTime>,
    in_flight: bool,
}

#[derive(Clone, Debug, Default)]
struct AccountState {
    /// Failures from sources not known to be good for the account.
    counter: Option<Counter>,
    /// Sources that completed a sign-in, with the time of the latest, oldest first.
    known_good: VecDeque<(IpAddr, SystemTime)>,
    /// An attempt from a source not known to be good is reserved.
    in_flight: bool,
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
    /// Consecutive failures of this source on the account.
    pub account_failures: u32,
    /// Failures of the source.
    pub source_failures: u32,
    /// The wait now imposed on this source for this account.
    pub delay: Duration,
    /// Set when this failure got the source blocked, until then.
    pub blocked_until: Option<SystemTime>,
}

/// A reserved attempt, to be settled with [`Throttle::settle`].
#[derive(Debug)]
pub struct Attempt {
    account: String,
    source: IpAddr,
    known_good: bool,
    epoch: u64,
    prev_account: Option<Counter>,
    prev_pair: Option<Counter>,
    prev_source: Option<Counter>,
}

/// How a reserved attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Wrong credentials: the failure stays, and counts toward a block.
    Failure,
    /// The sign-in is complete: this source becomes known good for the account and its
    /// failures on the account are forgotten.
    Success,
    /// Not a failure, but not a completed sign-in either (password right, second factor
    /// still to come; or no check ran): the reservation is undone.
    Neutral,
    /// The request went away before settling: the failure stays, without a block check.
    Abandoned,
}

/// What `throttle clear` removes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClearTarget {
    /// Every counter of an account (its known-good sources stay).
    Account(String),
    /// Every counter and the block of a source address.
    Source(IpAddr),
}

/// One row of `throttle list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleRow {
    /// The account, or `None` for a source's own counter.
    pub account: Option<String>,
    /// The source, or `None` for an account's counter of sources not known to be good.
    pub source: Option<IpAddr>,
    pub failures: u32,
    pub last_failure_unix: u64,
    /// Seconds until the next attempt is allowed (0: allowed now).
    pub wait_secs: u64,
    /// End of a block of the source, when blocked.
    pub blocked_until_unix: Option<u64>,
}

/// What `throttle list` shows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleList {
    /// Live counters and blocks, most failures first.
    pub rows: Vec<ThrottleRow>,
    /// Rows left off beyond the limit.
    pub left_off: usize,
    /// Attempts reserved right now.
    pub in_flight: usize,
}

/// Failure counters per account, per source and per account/source pair.
#[derive(Debug)]
pub struct Throttle {
    cfg: ThrottleConfig,
    accounts: BoundedKeys<String, AccountState>,
    pairs: BoundedKeys<(String, IpAddr), Counter>,
    sources: BoundedKeys<IpAddr, SourceState>,
    in_flight: usize,
    /// Bumped by every clear, so an attempt reserved before it does not restore old counters.
    epoch: u64,
}

/// Longest account key kept: anything longer is no valid e-mail address, and a key's length
/// is chosen by whoever types it.
pub const MAX_ACCOUNT_KEY: usize = 256;

fn account_key(account: &str) -> &str {
    crate::text::cap(account, MAX_ACCOUNT_KEY)
}

fn unix(t: SystemTime) -> u64 {
    zonemesh_ca::unix_secs(t)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl Throttle {
    /// Empty state with `cfg`.
    pub fn new(cfg: ThrottleConfig) -> Self {
        let memory = Memory {
            failures: cfg.failure_memory,
            known_good: cfg.known_good_memory,
            block_window: cfg.block_window,
        };
        let each = cfg.max_tracked / 3;
        Self {
            accounts: BoundedKeys::new(memory, each, WhenFull::EvictOldest),
            pairs: BoundedKeys::new(memory, each, WhenFull::EvictOldest),
            sources: BoundedKeys::new(memory, each, WhenFull::EvictOldest),
            cfg,
            in_flight: 0,
            epoch: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ThrottleConfig {
        &self.cfg
    }

    fn fresh(&self, c: &Counter, now: SystemTime) -> bool {
        now.duration_since(c.last_failure).unwrap_or_default() < self.cfg.failure_memory
    }

    fn wait_of(&self, c: Option<&Counter>, now: SystemTime) -> Duration {
        c.filter(|c| self.fresh(c, now))
            .map(|c| c.next_allowed.duration_since(now).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Whether `source` completed a sign-in to `account` within the known-good memory.
    pub fn is_known_good(&self, account: &str, source: IpAddr, now: SystemTime) -> bool {
        let account = account_key(account);
        self.accounts.get(account).is_some_and(|a| {
            a.known_good.iter().any(|(ip, t)| {
                *ip == source
                    && now.duration_since(*t).unwrap_or_default() < self.cfg.known_good_memory
            })
        })
    }

    /// May `source` try `account` now? (Without reserving anything.)
    pub fn check(&self, account: &str, source: IpAddr, now: SystemTime) -> Gate {
        let account = account_key(account);
        if let Some(until) = self.blocked_until(source, now) {
            return Gate::Blocked(until);
        }
        let known_good = self.is_known_good(account, source, now);
        let src = self.sources.get(&source);
        let acct = self.accounts.get(account);
        let busy = src.is_some_and(|s| s.in_flight)
            || (!known_good && acct.is_some_and(|a| a.in_flight))
            || self.in_flight >= self.cfg.max_in_flight;
        if busy {
            return Gate::Wait(IN_FLIGHT_RETRY);
        }
        let mut wait = self
            .wait_of(self.pairs.get(&(account.to_string(), source)), now)
            .max(self.wait_of(src.and_then(|s| s.counter.as_ref()), now));
        if !known_good {
            wait = wait.max(self.wait_of(acct.and_then(|a| a.counter.as_ref()), now));
        }
        if wait.is_zero() {
            Gate::Allowed
        } else {
            Gate::Wait(wait)
        }
    }

    fn bump(&self, c: Option<Counter>, now: SystemTime) -> Counter {
        let failures = match c {
            Some(c) if self.fresh(&c, now) => c.failures.saturating_add(1),
            _ => 1,
        };
        Counter {
            failures,
            last_failure: now,
            next_allowed: now + self.cfg.delay_after(failures),
        }
    }

    /// Make room for the entries `source` trying `account` needs; refused when a map holds
    /// only entries that must stay (attempts in flight, blocks, known-good sources).
    fn make_room(
        &mut self,
        account: &str,
        source: IpAddr,
        known_good: bool,
        now: SystemTime,
    ) -> Result<(), Full> {
        self.pairs.make_room(&(account.to_string(), source), now)?;
        self.sources.make_room(&source, now)?;
        if !known_good {
            self.accounts.make_room(&account.to_string(), now)?;
        }
        Ok(())
    }

    /// Count one failure on the counters that apply to `source` trying `account`; returns
    /// what they were before. Nothing changes when the maps have no room.
    #[allow(clippy::type_complexity)]
    fn bump_all(
        &mut self,
        account: &str,
        source: IpAddr,
        known_good: bool,
        now: SystemTime,
    ) -> Result<(Option<Counter>, Option<Counter>, Option<Counter>), Full> {
        self.make_room(account, source, known_good, now)?;
        let key = (account.to_string(), source);
        let prev_pair = self.pairs.get(&key).cloned();
        let pair = self.bump(prev_pair.clone(), now);
        self.pairs.insert(key, pair, now)?;
        let prev_source = self.sources.get(&source).and_then(|s| s.counter.clone());
        let c = self.bump(prev_source.clone(), now);
        self.sources
            .entry(source, now, SourceState::default)?
            .counter = Some(c);
        let mut prev_account = None;
        if !known_good {
            prev_account = self.accounts.get(account).and_then(|a| a.counter.clone());
            let c = self.bump(prev_account.clone(), now);
            self.accounts
                .entry(account.to_string(), now, AccountState::default)?
                .counter = Some(c);
        }
        Ok((prev_account, prev_pair, prev_source))
    }

    /// Note a failure in the source's window; block the source when it keeps failing
    /// across accounts.
    fn note_failure(
        &mut self,
        account: &str,
        source: IpAddr,
        now: SystemTime,
    ) -> Option<SystemTime> {
        let cfg = &self.cfg;
        let Ok(src) = self.sources.entry(source, now, SourceState::default) else {
            return None;
        };
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
        let already = src.blocked_until.is_some_and(|u| u > now);
        if !already && src.recent.len() >= cfg.block_after_failures as usize {
            let distinct: HashSet<&str> = src.recent.iter().map(|(_, a)| a.as_str()).collect();
            if distinct.len() >= cfg.block_min_accounts as usize {
                let until = now + cfg.block_duration;
                src.blocked_until = Some(until);
                src.recent.clear();
                return Some(until);
            }
        }
        None
    }

    fn outcome(
        &self,
        account: &str,
        source: IpAddr,
        blocked_until: Option<SystemTime>,
        now: SystemTime,
    ) -> FailureOutcome {
        let pair = self.pairs.get(&(account.to_string(), source));
        let src = self.sources.get(&source).and_then(|s| s.counter.as_ref());
        FailureOutcome {
            account_failures: pair.map_or(0, |c| c.failures),
            source_failures: src.map_or(0, |c| c.failures),
            delay: self.wait_of(pair, now).max(self.wait_of(src, now)),
            blocked_until,
        }
    }

    /// Reserve an attempt of `source` on `account`: refused while a delay, a block or another
    /// attempt of the same source (or, for a source not known to be good, of the same
    /// account) is pending. The attempt counts as a failure until settled otherwise.
    pub fn start(
        &mut self,
        account: &str,
        source: IpAddr,
        now: SystemTime,
    ) -> Result<Attempt, Gate> {
        let account = account_key(account);
        match self.check(account, source, now) {
            Gate::Allowed => {}
            refused => return Err(refused),
        }
        let known_good = self.is_known_good(account, source, now);
        // Full of entries that must stay: as busy as a source with an attempt in flight.
        let busy = |_: Full| Gate::Wait(IN_FLIGHT_RETRY);
        let (prev_account, prev_pair, prev_source) = self
            .bump_all(account, source, known_good, now)
            .map_err(busy)?;
        // bump_all made both entries: marking them cannot fail.
        if let Some(s) = self.sources.get_mut(&source) {
            s.in_flight = true;
        }
        if !known_good && let Some(a) = self.accounts.get_mut(account) {
            a.in_flight = true;
        }
        self.in_flight += 1;
        Ok(Attempt {
            account: account.to_string(),
            source,
            known_good,
            epoch: self.epoch,
            prev_account,
            prev_pair,
            prev_source,
        })
    }

    /// Settle a reserved attempt; a failure reports what it led to.
    pub fn settle(
        &mut self,
        a: Attempt,
        how: Settlement,
        now: SystemTime,
    ) -> Option<FailureOutcome> {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(s) = self.sources.get_mut(&a.source) {
            s.in_flight = false;
        }
        if !a.known_good
            && let Some(acct) = self.accounts.get_mut(&a.account)
        {
            acct.in_flight = false;
        }
        let unchanged = a.epoch == self.epoch;
        match how {
            Settlement::Failure => {
                // The delay runs from when the answer is known, not from the reservation.
                let cfg = &self.cfg;
                let refresh = |c: &mut Counter| {
                    c.last_failure = c.last_failure.max(now);
                    c.next_allowed = c.next_allowed.max(now + cfg.delay_after(c.failures));
                };
                if let Some(c) = self.pairs.get_mut(&(a.account.clone(), a.source)) {
                    refresh(c);
                }
                if let Some(c) = self
                    .sources
                    .get_mut(&a.source)
                    .and_then(|s| s.counter.as_mut())
                {
                    refresh(c);
                }
                if !a.known_good
                    && let Some(c) = self
                        .accounts
                        .get_mut(&a.account)
                        .and_then(|s| s.counter.as_mut())
                {
                    refresh(c);
                }
                let blocked = self.note_failure(&a.account, a.source, now);
                Some(self.outcome(&a.account, a.source, blocked, now))
            }
            Settlement::Abandoned => None,
            Settlement::Neutral | Settlement::Success => {
                // No other attempt of this source, or of this account from a source not
                // known good, ran meanwhile, so the counters hold exactly our bump.
                if unchanged {
                    if let Some(s) = self.sources.get_mut(&a.source) {
                        s.counter = a.prev_source;
                    }
                    if !a.known_good
                        && let Some(acct) = self.accounts.get_mut(&a.account)
                    {
                        acct.counter = a.prev_account;
                    }
                    let key = (a.account.clone(), a.source);
                    match a.prev_pair {
                        Some(c) if how == Settlement::Neutral => {
                            // The pair holds our bump, so this replaces it in place.
                            let _ = self.pairs.insert(key, c, now);
                        }
                        _ => {
                            self.pairs.remove(&key);
                        }
                    }
                } else if how == Settlement::Success {
                    self.pairs.remove(&(a.account.clone(), a.source));
                }
                if how == Settlement::Success {
                    self.remember_good(&a.account, a.source, now);
                }
                self.forget_if_empty(&a.account, a.source);
                None
            }
        }
    }

    fn remember_good(&mut self, account: &str, source: IpAddr, now: SystemTime) {
        let cap = self.cfg.known_good_per_account;
        if cap == 0 {
            return;
        }
        let mem = self.cfg.known_good_memory;
        // No room (every account entry must stay): the source is simply not remembered.
        let Ok(acct) = self
            .accounts
            .entry(account.to_string(), now, AccountState::default)
        else {
            return;
        };
        acct.known_good
            .retain(|(ip, t)| *ip != source && now.duration_since(*t).unwrap_or_default() < mem);
        acct.known_good.push_back((source, now));
        while acct.known_good.len() > cap {
            acct.known_good.pop_front();
        }
    }

    fn forget_if_empty(&mut self, account: &str, source: IpAddr) {
        if self
            .accounts
            .get(account)
            .is_some_and(|a| a.counter.is_none() && a.known_good.is_empty() && !a.in_flight)
        {
            self.accounts.remove(account);
        }
        if self.sources.get(&source).is_some_and(|s| {
            s.counter.is_none() && s.recent.is_empty() && s.blocked_until.is_none() && !s.in_flight
        }) {
            self.sources.remove(&source);
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

    /// Record a failed attempt of `source` on `account` outside a reservation.
    pub fn record_failure(
        &mut self,
        account: &str,
        source: IpAddr,
        now: SystemTime,
    ) -> FailureOutcome {
        let account = account_key(account);
        let known_good = self.is_known_good(account, source, now);
        // No room: the maps are full of entries that must stay, and this failure is not
        // counted (the global in-flight bound still holds).
        let blocked = match self.bump_all(account, source, known_good, now) {
            Ok(_) => self.note_failure(account, source, now),
            Err(Full) => None,
        };
        self.outcome(account, source, blocked, now)
    }

    /// Lift a block early (an operator decision).
    pub fn unblock(&mut self, source: IpAddr) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.blocked_until = None;
            s.recent.clear();
        }
    }

    /// Remove counters (an operator decision); returns how many counters and blocks went.
    pub fn clear(&mut self, target: &ClearTarget) -> usize {
        self.epoch += 1;
        let mut n = 0;
        match target {
            ClearTarget::Account(account) => {
                let account = &account_key(account).to_string();
                let before = self.pairs.len();
                self.pairs.retain(|(a, _), _| a != account);
                n += before - self.pairs.len();
                if let Some(a) = self.accounts.get_mut(account) {
                    n += usize::from(a.counter.take().is_some());
                }
                for (_, s) in self.sources.iter_mut() {
                    s.recent.retain(|(_, a)| a != account);
                }
                let ips: Vec<IpAddr> = self.sources.iter().map(|(ip, _)| *ip).collect();
                for ip in ips {
                    self.forget_if_empty(account, ip);
                }
            }
            ClearTarget::Source(ip) => {
                let before = self.pairs.len();
                self.pairs.retain(|(_, s), _| s != ip);
                n += before - self.pairs.len();
                if let Some(s) = self.sources.get_mut(ip) {
                    n += usize::from(s.counter.take().is_some());
                    n += usize::from(s.blocked_until.take().is_some());
                    s.recent.clear();
                }
                if let Some(s) = self.sources.get(ip)
                    && !s.in_flight
                {
                    self.sources.remove(ip);
                }
            }
        }
        n
    }

    /// Live counters and blocks, most failures first, at most `limit` rows.
    pub fn list(&self, now: SystemTime, limit: usize) -> ThrottleList {
        let mut rows = Vec::new();
        let row = |account: Option<String>,
                   source: Option<IpAddr>,
                   c: Option<&Counter>,
                   blocked: Option<SystemTime>| {
            ThrottleRow {
                account,
                source,
                failures: c.map_or(0, |c| c.failures),
                last_failure_unix: c.map_or(0, |c| unix(c.last_failure)),
                wait_secs: ceil_secs(self.wait_of(c, now)),
                blocked_until_unix: blocked.map(unix),
            }
        };
        for ((account, ip), c) in self.pairs.iter() {
            if self.fresh(c, now) {
                rows.push(row(Some(account.clone()), Some(*ip), Some(c), None));
            }
        }
        for (account, a) in self.accounts.iter() {
            if let Some(c) = a.counter.as_ref().filter(|c| self.fresh(c, now)) {
                rows.push(row(Some(account.clone()), None, Some(c), None));
            }
        }
        for (ip, s) in self.sources.iter() {
            let c = s.counter.as_ref().filter(|c| self.fresh(c, now));
            let blocked = s.blocked_until.filter(|u| *u > now);
            if c.is_some() || blocked.is_some() {
                rows.push(row(None, Some(*ip), c, blocked));
            }
        }
        rows.sort_by(|a, b| {
            (
                b.blocked_until_unix.is_some(),
                b.failures,
                &a.account,
                a.source,
            )
                .cmp(&(
                    a.blocked_until_unix.is_some(),
                    a.failures,
                    &b.account,
                    b.source,
                ))
        });
        let left_off = rows.len().saturating_sub(limit);
        rows.truncate(limit);
        ThrottleList {
            rows,
            left_off,
            in_flight: self.in_flight,
        }
    }

    /// Number of tracked accounts, sources and account/source pairs (for tests and metrics).
    pub fn tracked(&self) -> (usize, usize, usize) {
        (self.accounts.len(), self.sources.len(), self.pairs.len())
    }

    /// Reserve an attempt on the shared state; the guard settles it, or on drop abandons it
    /// (the failure stays, the slot is released).
    pub fn begin(
        this: &SharedThrottle,
        account: &str,
        source: IpAddr,
        now: SystemTime,
    ) -> Result<AttemptGuard, Gate> {
        let attempt = lock(this).start(account, source, now)?;
        Ok(AttemptGuard {
            throttle: this.clone(),
            attempt: Some(attempt),
        })
    }
}

/// The throttle as the web layer shares it.
pub type SharedThrottle = Arc<Mutex<Throttle>>;

fn lock(t: &SharedThrottle) -> MutexGuard<'_, Throttle> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// A reserved attempt on a [`SharedThrottle`].
#[derive(Debug)]
pub struct AttemptGuard {
    throttle: SharedThrottle,
    attempt: Option<Attempt>,
}

impl AttemptGuard {
    fn settle(&mut self, how: Settlement, now: SystemTime) -> Option<FailureOutcome> {
        let a = self.attempt.take()?;
        lock(&self.throttle).settle(a, how, now)
    }

    /// Wrong credentials.
    pub fn failure(mut self, now: SystemTime) -> FailureOutcome {
        self.settle(Settlement::Failure, now)
            .expect("a failure settlement reports its outcome")
    }

    /// A completed sign-in from this source.
    pub fn success(mut self, now: SystemTime) {
        self.settle(Settlement::Success, now);
    }

    /// Neither failure nor completed sign-in.
    pub fn neutral(mut self, now: SystemTime) {
        self.settle(Settlement::Neutral, now);
    }
}

impl Drop for AttemptGuard {
    fn drop(&mut self) {
        if self.attempt.is_some() {
            self.settle(Settlement::Abandoned, SystemTime::now());
        }
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
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
        let ip = ip("127.0.0.2");
        let mut now = at(0);
        let mut delays = vec![];
        for _ in 0..6 {
            let a = t.start("a", ip, now).expect("allowed");
            let o = t.settle(a, Settlement::Failure, now).unwrap();
            delays.push(o.delay.as_secs());
            // Too early is refused with the remaining wait.
            if !o.delay.is_zero() {
                assert_eq!(t.check("a", ip, now), Gate::Wait(o.delay));
                assert_eq!(t.start("a", ip, now).unwrap_err(), Gate::Wait(o.delay));
            }
            now += o.delay;
        }
        assert_eq!(delays, vec![0, 0, 1, 2, 4, 8]);
        // One account from one source never gets the source blocked.
        assert_eq!(t.blocked_until(ip, now), None);
        // Never permanent: failures are forgotten after failure_memory.
        let later = now + cfg().failure_memory;
        let a = t.start("a", ip, later).expect("allowed after the memory");
        t.settle(a, Settlement::Success, later);
        assert!(t.is_known_good("a", ip, later));
        assert_eq!(t.tracked().2, 0, "the pair's failures are forgotten");
    }

    #[test]
    fn one_attempt_in_flight_per_source_and_account() {
        let mut t = Throttle::new(cfg());
        let (a1, a2) = (ip("127.0.0.2"), ip("127.0.0.3"));
        let first = t.start("victim", a1, at(0)).unwrap();
        // Same source, other account: refused while the first runs.
        assert_eq!(
            t.start("other", a1, at(0)).unwrap_err(),
            Gate::Wait(IN_FLIGHT_RETRY)
        );
        // Same account, other source (not known good): refused too.
        assert_eq!(
            t.start("victim", a2, at(0)).unwrap_err(),
            Gate::Wait(IN_FLIGHT_RETRY)
        );
        // Other account from other source: fine.
        let other = t.start("other", a2, at(0)).unwrap();
        // The reservation already counts as a failure.
        assert_eq!(t.list(at(0), 100).in_flight, 2);
        assert!(
            t.list(at(0), 100)
                .rows
                .iter()
                .any(|r| r.source == Some(a1) && r.failures == 1)
        );
        t.settle(first, Settlement::Failure, at(0));
        t.settle(other, Settlement::Neutral, at(0));
        assert_eq!(t.list(at(0), 100).in_flight, 0);
        assert!(t.start("victim", a1, at(0)).is_ok());
    }

    #[test]
    fn abandoned_attempt_releases_the_slot_and_stays_a_failure() {
        let shared: SharedThrottle = Arc::new(Mutex::new(Throttle::new(cfg())));
        let src = ip("127.0.0.2");
        for _ in 0..2 {
            let g = Throttle::begin(&shared, "a", src, at(0)).unwrap();
            drop(g);
        }
        let t = lock(&shared);
        // Two free failures used: the third attempt is allowed, the fourth would wait.
        assert_eq!(t.check("a", src, at(0)), Gate::Allowed);
        let rows = t.list(at(0), 100).rows;
        assert!(
            rows.iter()
                .any(|r| r.source == Some(src) && r.account.is_none() && r.failures == 2),
            "{rows:?}"
        );
        assert_eq!(t.list(at(0), 100).in_flight, 0);
    }

    #[test]
    fn neutral_settlement_undoes_the_reservation() {
        let mut t = Throttle::new(cfg());
        let src = ip("127.0.0.2");
        for _ in 0..5 {
            let a = t.start("a", src, at(0)).unwrap();
            t.settle(a, Settlement::Neutral, at(0));
        }
        assert_eq!(t.tracked(), (0, 0, 0));
    }

    #[test]
    fn stranger_cannot_delay_a_known_good_source() {
        let mut t = Throttle::new(cfg());
        let (owner, attacker, traveller) = (ip("127.0.0.3"), ip("127.0.0.2"), ip("127.0.0.4"));
        let a = t.start("owner", owner, at(0)).unwrap();
        t.settle(a, Settlement::Success, at(0));
        let (mut now, mut delay) = (at(1), Duration::ZERO);
        for _ in 0..20 {
            now += delay;
            delay = t.record_failure("owner", attacker, now).delay;
        }
        // The attacker waits, and so does a source never seen for the account ...
        assert!(matches!(t.check("owner", attacker, now), Gate::Wait(_)));
        assert!(matches!(t.check("owner", traveller, now), Gate::Wait(_)));
        // ... but not the owner's usual source.
        assert_eq!(t.check("owner", owner, now), Gate::Allowed);
        // Nor is the attacker blocked for a single account.
        assert_eq!(t.blocked_until(attacker, now), None);
        // The owner's own mistakes still slow the owner's source down.
        for _ in 0..3 {
            let a = t.start("owner", owner, now).unwrap();
            t.settle(a, Settlement::Failure, now);
        }
        assert!(matches!(t.check("owner", owner, now), Gate::Wait(_)));
    }

    #[test]
    fn known_good_memory_is_bounded() {
        let mut t = Throttle::new(ThrottleConfig {
            known_good_per_account: 3,
            ..cfg()
        });
        for i in 1..=5u8 {
            let a = t
                .start("a", IpAddr::from([127, 0, 0, i]), at(i.into()))
                .unwrap();
            t.settle(a, Settlement::Success, at(i.into()));
        }
        let good: Vec<bool> = (1..=5u8)
            .map(|i| t.is_known_good("a", IpAddr::from([127, 0, 0, i]), at(10)))
            .collect();
        assert_eq!(good, vec![false, false, true, true, true]);
        assert!(!t.is_known_good(
            "a",
            IpAddr::from([127, 0, 0, 5]),
            at(10) + cfg().known_good_memory
        ));
    }

    #[test]
    fn spraying_source_gets_blocked_others_unaffected() {
        let mut t = Throttle::new(cfg());
        let bad = ip("127.0.0.2");
        let good = ip("127.0.0.3");
        let mut now = at(0);
        let mut blocked = None;
        for i in 0..6 {
            let a = t.start(&format!("user{i}"), bad, now).expect("allowed");
            let o = t.settle(a, Settlement::Failure, now).unwrap();
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
    fn list_and_clear() {
        let mut t = Throttle::new(cfg());
        let (bad, other) = (ip("127.0.0.2"), ip("127.0.0.5"));
        let mut now = at(0);
        for i in 0..6 {
            now += t.record_failure(&format!("user{i}"), bad, now).delay;
        }
        t.record_failure("user0", other, now);
        let l = t.list(now, 1000);
        let src = l
            .rows
            .iter()
            .find(|r| r.source == Some(bad) && r.account.is_none())
            .unwrap();
        assert_eq!(src.failures, 6);
        assert!(src.blocked_until_unix.is_some());
        assert_eq!(l.rows[0], *src, "blocks first");
        assert_eq!(t.list(now, 2).rows.len(), 2);
        assert_eq!(t.list(now, 2).left_off, l.rows.len() - 2);

        assert!(t.clear(&ClearTarget::Source(bad)) > 0);
        assert_eq!(t.check("user3", bad, now), Gate::Allowed);
        assert!(t.list(now, 1000).rows.iter().all(|r| r.source != Some(bad)));
        // The account's counter of unknown sources still holds the attacker's failures.
        assert!(
            t.list(now, 1000)
                .rows
                .iter()
                .any(|r| r.account.as_deref() == Some("user0"))
        );
        t.clear(&ClearTarget::Account("user0".into()));
        assert!(
            t.list(now, 1000)
                .rows
                .iter()
                .all(|r| r.account.as_deref() != Some("user0"))
        );
        assert!(
            t.list(now, 1000)
                .rows
                .iter()
                .any(|r| r.source == Some(other))
        );
    }

    #[test]
    fn clear_during_an_attempt_is_not_undone() {
        let mut t = Throttle::new(cfg());
        let src = ip("127.0.0.2");
        t.record_failure("a", src, at(0));
        let a = t.start("a", src, at(0)).unwrap();
        t.clear(&ClearTarget::Source(src));
        t.settle(a, Settlement::Neutral, at(0));
        assert!(
            t.list(at(0), 100)
                .rows
                .iter()
                .all(|r| r.source != Some(src))
        );
        assert_eq!(t.list(at(0), 100).in_flight, 0);
    }

    #[test]
    fn a_flood_of_fresh_keys_cannot_reset_a_delayed_counter() {
        let mut t = Throttle::new(ThrottleConfig {
            max_tracked: 300,
            block_after_failures: 1000,
            ..cfg()
        });
        let guesser = ip("127.0.0.9");
        for _ in 0..8 {
            t.record_failure("victim", guesser, at(0));
        }
        let Gate::Wait(before) = t.check("victim", guesser, at(1)) else {
            panic!("eight failures impose a delay");
        };
        // The guesser sprays one failure each from a thousand other addresses and names.
        for i in 0..1000u32 {
            let src = IpAddr::from(
                (0xfd00_0000_0000_0000_0000_0000_0003_0000u128 + i as u128).to_be_bytes(),
            );
            t.record_failure(&format!("made-up-{i}"), src, at(1));
            let (a, s, p) = t.tracked();
            assert!(a + s + p <= 300, "{a} + {s} + {p}");
        }
        assert_eq!(t.check("victim", guesser, at(1)), Gate::Wait(before));
    }

    #[test]
    fn bounded_memory() {
        let mut t = Throttle::new(ThrottleConfig {
            max_tracked: 100,
            block_after_failures: 1000,
            ..Default::default()
        });
        for i in 0..1000u32 {
            let src = IpAddr::from(
                (0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + i as u128).to_be_bytes(),
            );
            t.record_failure(&format!("made-up-{i}"), src, at(i.into()));
        }
        let (a, s, p) = t.tracked();
        assert!(a + s + p <= 100, "{a} + {s} + {p}");
        // Attempts in flight are never evicted: once they fill a map, a new source waits
        // instead of pushing one out, and the bound still holds.
        let mut held = vec![];
        for i in 0..200u32 {
            let src = IpAddr::from(
                (0xfd00_0000_0000_0000_0000_0000_0002_0000u128 + i as u128).to_be_bytes(),
            );
            match t.start(&format!("y{i}"), src, at(4000)) {
                Ok(a) => held.push(a),
                Err(g) => assert_eq!(g, Gate::Wait(IN_FLIGHT_RETRY)),
            }
            let (a, s, p) = t.tracked();
            assert!(a + s + p <= 100, "{a} + {s} + {p}");
        }
        assert_eq!(
            held.len(),
            100 / 3,
            "one source entry per attempt in flight"
        );
        for a in held {
            t.settle(a, Settlement::Failure, at(4001));
        }
        // With room enough, the global bound on attempts in flight is what refuses.
        let mut t = Throttle::new(ThrottleConfig {
            block_after_failures: 1000,
            ..Default::default()
        });
        let mut many = vec![];
        for i in 0..2000u32 {
            let src = IpAddr::from(
                (0xfd00_0000_0000_0000_0000_0000_0001_0000u128 + i as u128).to_be_bytes(),
            );
            match t.start(&format!("x{i}"), src, at(5000)) {
                Ok(a) => many.push(a),
                Err(g) => assert_eq!(g, Gate::Wait(IN_FLIGHT_RETRY)),
            }
        }
        assert_eq!(many.len(), ThrottleConfig::default().max_in_flight);
    }
}
