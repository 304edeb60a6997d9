//! What requests decode from bitmaps, shared by every mirror of the process and bounded by
//! bytes: packs' reverse indexes and type bitmaps, commit bitmaps, and what a snapshot's refs
//! reach. Least recently used values go first; a value larger than the whole bound is not
//! kept. A request holds what it took out (`Arc`s) until it finishes, so an eviction never
//! takes anything from under it: the bound is on what stays decoded between requests.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use clru::{CLruCache, CLruCacheConfig, WeightScale};
use gix::hashtable::HashSet;
use gix::ObjectId;

use super::{Bits, Rev};

/// The bound of [`Cache::global`]: what stays decoded for the mirrors served recently. A
/// pack's reverse index takes 8 bytes per object and a commit bitmap one bit per object
/// (1.2 MiB and 19 KiB for a pack of 157k objects), so this holds the working set of a few
/// dozen such mirrors; a mirror whose values were evicted decodes them again on its next
/// request.
pub const CACHE_BYTES: usize = 64 << 20;

/// What a value costs beyond its heap bytes: its key, node and table slot.
const OVERHEAD: usize = 64;

/// The owner of cached values: a bitmap file or a snapshot, numbered by [`next_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Key(pub(super) u64, pub(super) Slot);

/// Which of its owner's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Slot {
    /// The pack order of a bitmap's pack.
    Rev,
    /// A bitmap file's type bitmaps.
    Types,
    /// A commit bitmap, by entry.
    Commit(usize),
    /// What a snapshot's tips reach.
    Reachable,
    /// The stored deltas of a bitmap's pack, by base.
    Children,
}

/// A decoded value.
#[derive(Clone)]
pub(super) enum Value {
    Rev(Arc<Rev>),
    Types(Arc<[Bits; 4]>),
    Commit(Arc<Bits>),
    /// `None`: the bitmaps do not cover the tips (remembered, so that the walk that found it
    /// out is not repeated).
    Reachable(Option<Arc<Reached>>),
    Children(Arc<super::Children>),
}

/// What a snapshot's tips reach: bits of the bitmapped pack, ids of other objects.
pub(super) struct Reached {
    pub(super) bits: Bits,
    pub(super) ext: HashSet<ObjectId>,
}

impl Value {
    /// Heap bytes, roughly.
    fn bytes(&self) -> usize {
        match self {
            Value::Rev(rev) => rev.bytes(),
            Value::Types(types) => types.iter().map(Bits::bytes).sum(),
            Value::Commit(bits) => bits.bytes(),
            Value::Reachable(None) => 0,
            Value::Reachable(Some(r)) => {
                r.bits.bytes() + r.ext.capacity() * (std::mem::size_of::<ObjectId>() + 1)
            }
            Value::Children(children) => children.bytes(),
        }
    }
}

struct Weight;

impl WeightScale<Key, Value> for Weight {
    fn weight(&self, _: &Key, value: &Value) -> usize {
        value.bytes() + OVERHEAD
    }
}

/// A least-recently-used map of decoded values, bounded by bytes. See the module
/// documentation.
pub struct Cache {
    lru: parking_lot::Mutex<CLruCache<Key, Value, std::hash::RandomState, Weight>>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lru = self.lru.lock();
        f.debug_struct("Cache")
            .field("bytes", &lru.weight())
            .field("capacity", &lru.capacity())
            .finish()
    }
}

/// A number no other owner of cached values has.
pub(super) fn next_key() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Cache {
    /// A cache holding at most `bytes` of decoded values.
    pub fn new(bytes: usize) -> Cache {
        let capacity = NonZeroUsize::new(bytes).unwrap_or(NonZeroUsize::MIN);
        Cache {
            lru: parking_lot::Mutex::new(CLruCache::with_config(
                CLruCacheConfig::new(capacity).with_scale(Weight),
            )),
        }
    }

    /// The cache of the process, of [`CACHE_BYTES`].
    pub fn global() -> &'static Arc<Cache> {
        static GLOBAL: OnceLock<Arc<Cache>> = OnceLock::new();
        GLOBAL.get_or_init(|| Arc::new(Cache::new(CACHE_BYTES)))
    }

    /// The bytes its values take, as weighed.
    pub fn bytes(&self) -> usize {
        let lru = self.lru.lock();
        lru.weight() + lru.len() * OVERHEAD
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.lru.lock().len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.lru.lock().is_empty()
    }

    pub(super) fn get(&self, key: &Key) -> Option<Value> {
        self.lru.lock().get(key).cloned()
    }

    /// Keep `value`, evicting the least recently used values to make room; one larger than
    /// the whole bound is not kept.
    pub(super) fn put(&self, key: Key, value: Value) {
        // Dropped after the lock is released: freeing a large value takes a while.
        let _evicted = self.lru.lock().put_with_weight(key, value);
    }

    /// Drop every value of `owner`: it is gone.
    pub(super) fn forget(&self, owner: u64) {
        self.lru.lock().retain(|key, _| key.0 != owner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(n: usize) -> Value {
        Value::Commit(Arc::new(Bits::with_len(n)))
    }

    #[test]
    fn holds_at_most_its_bound_and_evicts_the_least_recently_used() {
        // Each value: 8,000 bits = 1,000 bytes, plus the overhead.
        let cache = Cache::new(10 * (1000 + OVERHEAD));
        for i in 0..9 {
            cache.put(Key(1, Slot::Commit(i)), bits(8000));
        }
        assert_eq!(cache.len(), 9);
        // Entry 0 used again: entry 1 is now the oldest.
        assert!(cache.get(&Key(1, Slot::Commit(0))).is_some());
        for i in 9..20 {
            cache.put(Key(1, Slot::Commit(i)), bits(8000));
            assert!(cache.bytes() <= 10 * (1000 + OVERHEAD), "{}", cache.bytes());
        }
        assert!(cache.get(&Key(1, Slot::Commit(1))).is_none());
        assert!(cache.get(&Key(1, Slot::Commit(19))).is_some());
        assert!(cache.len() < 10);
    }

    #[test]
    fn a_value_larger_than_the_bound_is_not_kept_but_stays_usable() {
        let cache = Cache::new(4096);
        cache.put(Key(1, Slot::Commit(0)), bits(64));
        let big = Arc::new(Bits::with_len(1 << 20));
        cache.put(Key(1, Slot::Commit(1)), Value::Commit(Arc::clone(&big)));
        assert!(cache.get(&Key(1, Slot::Commit(1))).is_none());
        assert!(
            cache.get(&Key(1, Slot::Commit(0))).is_some(),
            "nothing evicted for it"
        );
        assert_eq!(big.bytes(), 1 << 17);
    }

    #[test]
    fn an_evicted_value_lives_on_where_it_is_used() {
        let cache = Cache::new(2 * (1000 + OVERHEAD) + 1);
        let Some(Value::Commit(held)) = ({
            cache.put(Key(1, Slot::Commit(0)), bits(8000));
            cache.get(&Key(1, Slot::Commit(0)))
        }) else {
            panic!("cached");
        };
        cache.put(Key(1, Slot::Commit(1)), bits(8000));
        cache.put(Key(1, Slot::Commit(2)), bits(8000));
        assert!(cache.get(&Key(1, Slot::Commit(0))).is_none());
        assert_eq!(held.bytes(), 1000);
    }

    #[test]
    fn forgetting_an_owner_drops_its_values_only() {
        let cache = Cache::new(1 << 20);
        for owner in [1, 2] {
            cache.put(
                Key(owner, Slot::Types),
                Value::Types(Arc::new(Default::default())),
            );
            cache.put(Key(owner, Slot::Commit(3)), bits(100));
            cache.put(Key(owner, Slot::Reachable), Value::Reachable(None));
        }
        cache.forget(1);
        assert_eq!(cache.len(), 3);
        assert!(cache.get(&Key(1, Slot::Commit(3))).is_none());
        assert!(cache.get(&Key(2, Slot::Commit(3))).is_some());
    }

    #[test]
    fn the_process_cache_holds_64_mib() {
        assert_eq!(CACHE_BYTES, 64 << 20);
        assert_eq!(Cache::global().lru.lock().capacity(), CACHE_BYTES);
    }

    #[test]
    fn keys_are_unique() {
        let (a, b) = (next_key(), next_key());
        assert_ne!(a, b);
    }
}
