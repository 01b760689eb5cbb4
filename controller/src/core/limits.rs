//! Per-key limits for the control plane, all built on one bounded map of windowed state
//! ([`BoundedKeys`]): token buckets for calls from enrolled nodes and for security reports,
//! failure windows for enrollment, and the blocklist's evidence. Every map has a bound and
//! an explicit policy when it is full ([`WhenFull`]); before the policy applies, entries
//! that no longer restrict anything are dropped.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, SystemTime};
/// How many calls a key may make: `burst` at once, refilled evenly over `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub burst: u32,
    pub per: Duration,
}

impl Rate {
    /// `burst` calls, refilled at `burst` per `per`.
    pub const fn new(burst: u32, per: Duration) -> Self {
        Self { burst, per }
    }

    fn refill_per_sec(&self) -> f64 {
        f64::from(self.burst) / self.per.as_secs_f64().max(1e-9)
    }
}

fn elapsed(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or(Duration::ZERO)
}

/// What a full [`BoundedKeys`] does with a key it does not hold yet, once the entries that
/// restrict nothing are gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenFull {
    /// Drop the lightest entry, the least recently touched among equals
    /// ([`Windowed::weight`]): a new key gets in unless every entry is pinned
    /// ([`Windowed::pinned`]). An attacker's fresh keys push out its own older ones and,
    /// past the bound, everyone's lightest.
    EvictOldest,
    /// Refuse the new key: keys already tracked keep their state (an enrolled node's
    /// budget cannot be reset by flooding the map with others).
    RefuseNew,
}

/// Per-key state kept by [`BoundedKeys`].
pub trait Windowed {
    /// What the entries are judged by (a window length, a rate), held once by the map.
    type Policy;
    /// Whether the entry still restricts anything at `now`; one that does not carries no
    /// state worth keeping and is dropped first when the map is full.
    fn is_live(&self, policy: &Self::Policy, now: SystemTime) -> bool;
    /// When the entry last changed; [`WhenFull::EvictOldest`] drops the oldest.
    fn touched(&self) -> SystemTime;
    /// How much evidence the entry holds: [`WhenFull::EvictOldest`] drops the lightest
    /// first, and the oldest among equals (so a flood of fresh one-failure keys cannot push
    /// out a counter that has seen many).
    fn weight(&self) -> u64 {
        0
    }
    /// Whether the entry must never be evicted while live (an attempt in flight, a block,
    /// a remembered sign-in): such entries are bounded by other means, and a map holding
    /// only them refuses new keys.
    fn pinned(&self, _policy: &Self::Policy, _now: SystemTime) -> bool {
        false
    }
}

/// The map is full of live entries and its policy refuses new keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many keys tracked")]
pub struct Full;

/// A map from client-chosen keys to windowed state, never larger than its bound.
#[derive(Debug)]
pub struct BoundedKeys<K, V: Windowed> {
    policy: V::Policy,
    max_keys: usize,
    when_full: WhenFull,
    map: HashMap<K, V>,
}

impl<K: Eq + Hash + Clone, V: Windowed> BoundedKeys<K, V> {
    /// At most `max_keys` entries (at least one), judged by `policy`.
    pub fn new(policy: V::Policy, max_keys: usize, when_full: WhenFull) -> Self {
        Self {
            policy,
            max_keys: max_keys.max(1),
            when_full,
            map: HashMap::new(),
        }
    }

    /// What the entries are judged by.
    pub fn policy(&self) -> &V::Policy {
        &self.policy
    }

    pub fn get<Q: Eq + Hash + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.map.get(key)
    }

    pub fn get_mut<Q: Eq + Hash + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.map.get_mut(key)
    }

    pub fn remove<Q: Eq + Hash + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.map.remove(key)
    }

    pub fn contains_key<Q: Eq + Hash + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.map.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&K, &mut V)> {
        self.map.iter_mut()
    }

    /// Keep only the entries `keep` says yes to.
    pub fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep);
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Make room for `key` if it is new and the map is full: entries that restrict nothing
    /// go first, then the policy decides. Returns the entries dropped (callers holding
    /// other state about those keys clean it up).
    pub fn make_room(&mut self, key: &K, now: SystemTime) -> Result<Vec<(K, V)>, Full> {
        if self.map.contains_key(key) || self.map.len() < self.max_keys {
            return Ok(Vec::new());
        }
        let dead: Vec<K> = self
            .map
            .iter()
            .filter(|(_, v)| !v.is_live(&self.policy, now))
            .map(|(k, _)| k.clone())
            .collect();
        let mut dropped: Vec<(K, V)> = dead
            .into_iter()
            .filter_map(|k| self.map.remove_entry(&k))
            .collect();
        if self.map.len() >= self.max_keys {
            match self.when_full {
                WhenFull::RefuseNew => return Err(Full),
                WhenFull::EvictOldest => {
                    let lightest = self
                        .map
                        .iter()
                        .filter(|(_, v)| !v.pinned(&self.policy, now))
                        .min_by_key(|(_, v)| (v.weight(), v.touched()))
                        .map(|(k, _)| k.clone())
                        .ok_or(Full)?;
                    if let Some(e) = self.map.remove_entry(&lightest) {
                        dropped.push(e);
                    }
                }
            }
        }
        Ok(dropped)
    }

    /// Set the entry of `key` (after [`Self::make_room`]); returns the value it replaced.
    pub fn insert(&mut self, key: K, value: V, now: SystemTime) -> Result<Option<V>, Full> {
        self.make_room(&key, now)?;
        Ok(self.map.insert(key, value))
    }

    /// The entry of `key`, created by `new` if absent (after [`Self::make_room`]).
    pub fn entry(
        &mut self,
        key: K,
        now: SystemTime,
        new: impl FnOnce() -> V,
    ) -> Result<&mut V, Full> {
        self.make_room(&key, now)?;
        Ok(self.map.entry(key).or_insert_with(new))
    }
}

/// A token bucket: refilled evenly at its [`Rate`].
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: SystemTime,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(rate: &Rate, now: SystemTime) -> Self {
        Self {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    fn level(&self, rate: &Rate, now: SystemTime) -> f64 {
        (self.tokens + elapsed(self.at, now).as_secs_f64() * rate.refill_per_sec())
            .min(f64::from(rate.burst))
    }

    /// Take one token; false when the bucket is empty.
    pub fn take(&mut self, rate: &Rate, now: SystemTime) -> bool {
        let level = self.level(rate, now);
        let ok = level >= 1.0;
        *self = Self {
            tokens: if ok { level - 1.0 } else { level },
            at: now,
        };
        ok
    }
}

impl Windowed for Bucket {
    type Policy = Rate;
    /// A full bucket restricts nothing.
    fn is_live(&self, rate: &Rate, now: SystemTime) -> bool {
        self.level(rate, now) < f64::from(rate.burst)
    }
    fn touched(&self) -> SystemTime {
        self.at
    }
}

/// Events counted in a fixed window that opens with the first one and, once it has passed,
/// with the next.
#[derive(Clone, Copy, Debug)]
pub struct WindowCount {
    count: u32,
    since: SystemTime,
    last: SystemTime,
}

impl WindowCount {
    /// No events yet; the window opens at `now`.
    pub fn new(now: SystemTime) -> Self {
        Self {
            count: 0,
            since: now,
            last: now,
        }
    }

    /// Count one event at `now`, opening a new window if the current one has passed;
    /// returns the count in the window.
    pub fn note(&mut self, window: Duration, now: SystemTime) -> u32 {
        if elapsed(self.since, now) >= window {
            *self = Self::new(now);
        }
        self.count = self.count.saturating_add(1);
        self.last = now;
        self.count
    }

    /// Events in the window that is open at `now` (0 once it has passed).
    pub fn count(&self, window: Duration, now: SystemTime) -> u32 {
        if self.is_open(window, now) {
            self.count
        } else {
            0
        }
    }

    /// Whether the window that opened with the first event is still open at `now`.
    pub fn is_open(&self, window: Duration, now: SystemTime) -> bool {
        elapsed(self.since, now) < window
    }

    /// When the last event was counted.
    pub fn last(&self) -> SystemTime {
        self.last
    }
}

impl Windowed for WindowCount {
    type Policy = Duration;
    fn is_live(&self, window: &Duration, now: SystemTime) -> bool {
        self.is_open(*window, now)
    }
    /// When the window opened: the oldest window is the first to go.
    fn touched(&self) -> SystemTime {
        self.since
    }
}

/// Why [`KeyedBuckets::take`] refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The key's bucket is empty.
    Empty,
    /// The key is new and the map is full ([`WhenFull::RefuseNew`]).
    Full,
}

/// Token buckets keyed by `K`, at most `max_keys` of them.
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    map: parking_lot::Mutex<BoundedKeys<K, Bucket>>,
}

impl<K: Eq + Hash + Clone> KeyedBuckets<K> {
    /// Buckets at `rate`; a full map evicts the oldest bucket for a new key.
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self::with_policy(rate, max_keys, WhenFull::EvictOldest)
    }

    /// Buckets at `rate`, doing `when_full` for a new key when the map is full.
    pub fn with_policy(rate: Rate, max_keys: usize, when_full: WhenFull) -> Self {
        Self {
            map: parking_lot::Mutex::new(BoundedKeys::new(rate, max_keys, when_full)),
        }
    }

    /// Take one token for `key`.
    pub fn take(&self, key: &K, now: SystemTime) -> Result<(), Refused> {
        let mut map = self.map.lock();
        let rate = *map.policy();
        let bucket = map
            .entry(key.clone(), now, || Bucket::full(&rate, now))
            .map_err(|Full| Refused::Full)?;
        if bucket.take(&rate, now) {
            Ok(())
        } else {
            Err(Refused::Empty)
        }
    }

    /// Take one token for `key`; false when refused.
    pub fn allow(&self, key: &K, now: SystemTime) -> bool {
        self.take(key, now).is_ok()
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Failures per key within a window, at most `max_keys` keys; a full map evicts the key
/// whose window opened first.
#[derive(Debug)]
pub struct FailureWindow<K> {
    allowed: u32,
    map: parking_lot::Mutex<BoundedKeys<K, WindowCount>>,
}

impl<K: Eq + Hash + Clone> FailureWindow<K> {
    /// `allowed` failures per key per `window`.
    pub fn new(allowed: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            allowed,
            map: parking_lot::Mutex::new(BoundedKeys::new(window, max_keys, WhenFull::EvictOldest)),
        }
    }

    /// True when `key` has used up its failures in the current window.
    pub fn is_limited(&self, key: &K, now: SystemTime) -> bool {
        let mut map = self.map.lock();
        let window = *map.policy();
        match map.get(key) {
            Some(f) if !f.is_open(window, now) => {
                map.remove(key);
                false
            }
            Some(f) => f.count(window, now) >= self.allowed,
            None => false,
        }
    }

    /// Count one failure for `key`.
    pub fn note_failure(&self, key: &K, now: SystemTime) {
        let mut map = self.map.lock();
        let window = *map.policy();
        // An evicting map always admits the key.
        if let Ok(f) = map.entry(key.clone(), now, || WindowCount::new(now)) {
            f.note(window, now);
        }
    }

    /// Number of keys tracked.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn bucket_allows_burst_then_refills() {
        let b = KeyedBuckets::new(Rate::new(3, Duration::from_secs(60)), 10);
        assert!((0..3).all(|_| b.allow(&"a", t(0))));
        assert!(!b.allow(&"a", t(0)));
        assert!(b.allow(&"b", t(0)), "keys are independent");
        assert!(!b.allow(&"a", t(19)));
        assert!(
            b.allow(&"a", t(21)),
            "one token back after a third of the period"
        );
        assert!(!b.allow(&"a", t(21)));
    }

    #[test]
    fn buckets_stay_bounded_under_a_flood_of_keys() {
        let b = KeyedBuckets::new(Rate::new(2, Duration::from_secs(60)), 100);
        for i in 0..10_000u32 {
            b.allow(&i, t(0));
            assert!(b.len() <= 100);
        }
    }

    #[test]
    fn failure_window_limits_and_forgets() {
        let w = FailureWindow::new(3, Duration::from_secs(60), 10);
        for _ in 0..3 {
            assert!(!w.is_limited(&"x", t(0)));
            w.note_failure(&"x", t(0));
        }
        assert!(w.is_limited(&"x", t(1)));
        assert!(!w.is_limited(&"y", t(1)));
        assert!(!w.is_limited(&"x", t(61)), "the window passed");
    }

    #[test]
    fn failure_window_stays_bounded_under_a_flood_of_keys() {
        let w = FailureWindow::new(3, Duration::from_secs(60), 1000);
        for i in 0..20_000u32 {
            w.note_failure(&i, t(u64::from(i / 200)));
            assert!(w.len() <= 1000);
        }
    }

    #[test]
    fn refusing_buckets_keep_every_tracked_budget_when_full() {
        let r: KeyedBuckets<String> =
            KeyedBuckets::with_policy(Rate::new(3, Duration::from_secs(3)), 2, WhenFull::RefuseNew);
        for _ in 0..3 {
            r.take(&"a/a1".to_string(), t(0)).unwrap();
        }
        assert_eq!(r.take(&"a/a1".to_string(), t(0)), Err(Refused::Empty));
        r.take(&"b/b1".to_string(), t(0)).unwrap();
        // Full with two nodes that both hold state: a third is refused, a1 keeps its debt.
        assert_eq!(r.take(&"c/c1".to_string(), t(0)), Err(Refused::Full));
        assert_eq!(r.take(&"a/a1".to_string(), t(0)), Err(Refused::Empty));
        r.take(&"a/a1".to_string(), t(1)).unwrap();
        // Once both buckets are full again they are dropped and c1 gets in.
        r.take(&"c/c1".to_string(), t(10)).unwrap();
        // A flood of new keys never grows the map.
        for i in 0..10_000u32 {
            let _ = r.take(&format!("n{i}"), t(10));
            assert!(r.len() <= 2);
        }
    }

    #[test]
    fn evicting_map_drops_dead_entries_first_then_the_oldest() {
        let mut m: BoundedKeys<u32, WindowCount> =
            BoundedKeys::new(Duration::from_secs(60), 3, WhenFull::EvictOldest);
        m.entry(1, t(0), || WindowCount::new(t(0))).unwrap();
        m.entry(2, t(10), || WindowCount::new(t(10))).unwrap();
        m.entry(3, t(20), || WindowCount::new(t(20))).unwrap();
        // Nothing has expired at t(30): the oldest window (key 1) goes.
        let dropped = m.make_room(&4, t(30)).unwrap();
        assert_eq!(dropped.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [1]);
        m.entry(4, t(30), || WindowCount::new(t(30))).unwrap();
        // At t(85) the windows of 2 and 3 have passed: both go, 4 stays.
        let mut dropped: Vec<u32> = m
            .make_room(&5, t(85))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        dropped.sort_unstable();
        assert_eq!(dropped, [2, 3]);
        assert!(m.contains_key(&4));
        // A key already held never makes room.
        assert!(m.make_room(&4, t(85)).unwrap().is_empty());
    }

    /// A counter of `n` failures, live while `window` runs, pinned when `n` is 0.
    #[derive(Debug)]
    struct Weighed(u64, SystemTime);
    impl Windowed for Weighed {
        type Policy = ();
        fn is_live(&self, _: &(), _: SystemTime) -> bool {
            true
        }
        fn touched(&self) -> SystemTime {
            self.1
        }
        fn weight(&self) -> u64 {
            self.0
        }
        fn pinned(&self, _: &(), _: SystemTime) -> bool {
            self.0 == 0
        }
    }

    #[test]
    fn evicting_map_drops_the_lightest_and_never_a_pinned_entry() {
        let mut m: BoundedKeys<u32, Weighed> = BoundedKeys::new((), 3, WhenFull::EvictOldest);
        m.entry(1, t(0), || Weighed(0, t(0))).unwrap();
        m.entry(2, t(1), || Weighed(9, t(1))).unwrap();
        m.entry(3, t(2), || Weighed(1, t(2))).unwrap();
        // The newest but lightest goes; the pinned oldest stays.
        let dropped = m.make_room(&4, t(3)).unwrap();
        assert_eq!(dropped.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [3]);
        m.entry(4, t(3), || Weighed(0, t(3))).unwrap();
        m.make_room(&5, t(4)).unwrap();
        m.entry(5, t(4), || Weighed(0, t(4))).unwrap();
        // Only pinned entries left: a new key is refused, nothing is dropped.
        assert!(matches!(m.make_room(&6, t(5)), Err(Full)));
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn window_count_restarts_after_the_window() {
        let w = Duration::from_secs(60);
        let mut c = WindowCount::new(t(0));
        assert_eq!(c.note(w, t(0)), 1);
        assert_eq!(c.note(w, t(59)), 2);
        assert_eq!(c.count(w, t(59)), 2);
        assert_eq!(c.count(w, t(60)), 0);
        assert_eq!(
            c.note(w, t(61)),
            1,
            "a new window opens with the next event"
        );
    }
}
