//! Keeping the mirrors' snapshots within `SNAPSHOT_MEMORY`: a snapshot holds a mirror's refs
//! and prebuilt advertisement (about 1.2 MiB for 5,500 refs), which a fleet of idle mirrors
//! need not keep. When the snapshots held pass the bound, those of the mirrors requested
//! least recently are dropped, down to 90 % of it; the next request for such a mirror builds
//! its snapshot again, as at start.
//!
//! A snapshot requested within the last `SYNC_STALE_AFTER` (at least a second) is never
//! dropped: until then a request is answered from the snapshot alone, after it the request
//! checks the mirror on disk anyway (re-listing its refs), which costs about as much as
//! building the snapshot again. So a snapshot is still built once per sync, never per
//! request, however small the bound.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Repo;

/// At most one pass over the mirrors per this interval.
const PASS_INTERVAL: Duration = Duration::from_secs(1);

/// What the snapshots held take, as [`crate::repo::Snapshot::heap_bytes`] estimates it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Mirrors whose snapshot is held.
    pub snapshots: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// The bound and the clock of the mirrors' last requests.
pub(super) struct Budget {
    /// `SNAPSHOT_MEMORY`
    limit: u64,
    /// A snapshot requested more recently than this is kept.
    keep: Duration,
    /// The zero of [`Repo::requested_ms`].
    started: Instant,
    /// When the next pass may run, in the same milliseconds.
    next_pass_ms: AtomicU64,
}

impl Budget {
    pub(super) fn new(limit: u64, stale_after: Duration) -> Budget {
        Budget {
            limit,
            keep: stale_after.max(Duration::from_secs(1)),
            started: Instant::now(),
            next_pass_ms: AtomicU64::new(0),
        }
    }

    /// `SNAPSHOT_MEMORY`
    pub(super) fn limit(&self) -> u64 {
        self.limit
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A request takes `repo`'s snapshot now. Whether a pass over the mirrors is due.
    pub(super) fn requested(&self, repo: &Repo) -> bool {
        let now = self.now_ms();
        // Never 0, which means "not requested since start".
        repo.requested_ms.store(now.max(1), Ordering::Relaxed);
        let next = self.next_pass_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_pass_ms
                .compare_exchange(
                    next,
                    now + PASS_INTERVAL.as_millis() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Measure the snapshots held, and drop those of the least recently requested mirrors
    /// when they take more than the bound (see the module documentation). Returns what is
    /// held afterwards. A walk over every mirror: call on a blocking thread.
    pub(super) fn pass(&self, repos: &parking_lot::Mutex<HashMap<PathBuf, Arc<Repo>>>) -> Usage {
        let repos: Vec<Arc<Repo>> = repos.lock().values().cloned().collect();
        let mut held: Vec<(u64, u64, Arc<Repo>)> = repos
            .into_iter()
            .filter_map(|repo| {
                let bytes = repo.snapshot.read().as_ref()?.heap_bytes() as u64;
                Some((repo.requested_ms.load(Ordering::Relaxed), bytes, repo))
            })
            .collect();
        let mut usage = Usage {
            snapshots: held.len(),
            bytes: held.iter().map(|(_, bytes, _)| bytes).sum(),
        };
        if usage.bytes > self.limit {
            let target = self.limit / 10 * 9;
            let recent = self.now_ms().saturating_sub(self.keep.as_millis() as u64);
            held.sort_unstable_by_key(|(requested, _, _)| *requested);
            let mut dropped = 0;
            for (requested, bytes, repo) in held {
                if usage.bytes <= target || requested > recent {
                    break;
                }
                // Freed after the lock is released; a request that holds it keeps it until it
                // is answered.
                let snapshot = repo.snapshot.write().take();
                drop(snapshot);
                usage.bytes -= bytes;
                usage.snapshots -= 1;
                dropped += 1;
            }
            tracing::debug!(
                dropped,
                held = usage.snapshots,
                bytes = usage.bytes,
                "dropped the snapshots of idle mirrors"
            );
        }
        crate::metrics::snapshots(usage.snapshots, usage.bytes);
        usage
    }
}
