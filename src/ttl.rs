//! A map whose entries expire after a fixed time and whose size is bounded: verdicts and
//! failures remembered for a while, which a stream of distinct keys from clients cannot grow
//! without bound.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Entries older than `ttl` are gone; at most `max` are kept (beyond it, new entries are not
/// remembered until old ones expire).
pub struct TtlMap<K, V> {
    ttl: Duration,
    max: usize,
    entries: parking_lot::Mutex<HashMap<K, (Instant, V)>>,
}

impl<K: Hash + Eq, V: Clone> TtlMap<K, V> {
    /// An empty map.
    pub fn new(ttl: Duration, max: usize) -> Self {
        TtlMap {
            ttl,
            max,
            entries: Default::default(),
        }
    }

    /// The value for `key`, unless it expired.
    pub fn get(&self, key: &K) -> Option<V> {
        self.entries
            .lock()
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, v)| v.clone())
    }

    /// Remember `value` for `key` from now on, unless a value that has not expired is there:
    /// whether it was remembered (false also when the map is full).
    pub fn insert_new(&self, key: K, value: V) -> bool {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries
            .get(&key)
            .is_some_and(|(at, _)| now.duration_since(*at) < self.ttl)
        {
            return false;
        }
        if entries.len() >= self.max {
            entries.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        }
        if entries.len() < self.max || entries.contains_key(&key) {
            entries.insert(key, (now, value));
            return true;
        }
        false
    }

    /// Forget `key`.
    pub fn remove(&self, key: &K) {
        self.entries.lock().remove(key);
    }

    /// Remember `value` for `key` from now on.
    pub fn insert(&self, key: K, value: V) {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        if entries.len() >= self.max {
            entries.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        }
        if entries.len() < self.max || entries.contains_key(&key) {
            entries.insert(key, (now, value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let map = TtlMap::new(Duration::from_millis(50), 2);
        map.insert(1, "a");
        map.insert(2, "b");
        map.insert(3, "c");
        assert_eq!((map.get(&1), map.get(&3)), (Some("a"), None), "full");
        map.insert(1, "a2");
        assert_eq!(map.get(&1), Some("a2"), "a known key is updated");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(map.get(&1), None, "expired");
        map.insert(3, "c");
        assert_eq!(map.get(&3), Some("c"), "expired entries made room");
    }

    #[test]
    fn insert_new_keeps_what_is_there() {
        let map = TtlMap::new(Duration::from_millis(50), 2);
        assert!(map.insert_new(1, "a"));
        assert!(!map.insert_new(1, "b"), "known");
        assert_eq!(map.get(&1), Some("a"));
        assert!(map.insert_new(2, "b"));
        assert!(!map.insert_new(3, "c"), "full");
        map.remove(&1);
        assert!(map.insert_new(3, "c"), "room again");
        std::thread::sleep(Duration::from_millis(60));
        assert!(map.insert_new(3, "d"), "expired");
        assert_eq!(map.get(&3), Some("d"));
    }
}
