//! Per-key rate limits for the control plane: token buckets for calls from enrolled nodes
//! and failure windows for enrollment. Every map is bounded; when full, entries that no
//! longer restrict anything go first, then the least recently touched.

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

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: SystemTime,
}

/// Token buckets keyed by `K`, at most `max_keys` of them.
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    rate: Rate,
    max_keys: usize,
    map: parking_lot::Mutex<HashMap<K, Bucket>>,
}

fn elapsed(since: SystemTime, now: SystemTime) -> Duration {
    now.duration_since(since).unwrap_or(Duration::ZERO)
}

impl<K: Eq + Hash + Clone> KeyedBuckets<K> {
    pub fn new(rate: Rate, max_keys: usize) -> Self {
        Self {
            rate,
            max_keys: max_keys.max(1),
            map: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn level(&self, b: &Bucket, now: SystemTime) -> f64 {
        (b.tokens + elapsed(b.at, now).as_secs_f64() * self.rate.refill_per_sec())
            .min(f64::from(self.rate.burst))
    }

    /// Take one token for `key`; false when its bucket is empty.
    pub fn allow(&self, key: &K, now: SystemTime) -> bool {
        let mut map = self.map.lock();
        if !map.contains_key(key) && map.len() >= self.max_keys {
            // Full buckets restrict nothing: forgetting them is free.
            let burst = f64::from(self.rate.burst);
            map.retain(|_, b| {
                (b.tokens + elapsed(b.at, now).as_secs_f64() * self.rate.refill_per_sec()) < burst
            });
            if map.len() >= self.max_keys
                && let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let full = Bucket {
            tokens: f64::from(self.rate.burst),
            at: now,
        };
        let b = map.entry(key.clone()).or_insert(full);
        let level = self.level(b, now);
        if level >= 1.0 {
            *b = Bucket {
                tokens: level - 1.0,
                at: now,
            };
            true
        } else {
            *b = Bucket {
                tokens: level,
                at: now,
            };
            false
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

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    since: SystemTime,
}

/// Failures per key within a window, at most `max_keys` keys.
#[derive(Debug)]
pub struct FailureWindow<K> {
    allowed: u32,
    window: Duration,
    max_keys: usize,
    map: parking_lot::Mutex<HashMap<K, Failures>>,
}

impl<K: Eq + Hash + Clone> FailureWindow<K> {
    /// `allowed` failures per key per `window`.
    pub fn new(allowed: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            allowed,
            window,
            max_keys: max_keys.max(1),
            map: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    /// True when `key` has used up its failures in the current window.
    pub fn is_limited(&self, key: &K, now: SystemTime) -> bool {
        let mut map = self.map.lock();
        match map.get(key) {
            Some(f) if elapsed(f.since, now) >= self.window => {
                map.remove(key);
                false
            }
            Some(f) => f.count >= self.allowed,
            None => false,
        }
    }

    /// Count one failure for `key`.
    pub fn note_failure(&self, key: &K, now: SystemTime) {
        let mut map = self.map.lock();
        if !map.contains_key(key) && map.len() >= self.max_keys {
            let window = self.window;
            map.retain(|_, f| elapsed(f.since, now) < window);
            if map.len() >= self.max_keys
                && let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, f)| f.since)
                    .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        let f = map.entry(key.clone()).or_insert(Failures {
            count: 0,
            since: now,
        });
        if elapsed(f.since, now) >= self.window {
            *f = Failures {
                count: 0,
                since: now,
            };
        }
        f.count = f.count.saturating_add(1);
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
}
