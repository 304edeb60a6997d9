//! The leases requests hold on mirrors: a leased mirror is not evicted, and the end of the
//! last lease on a mirror an eviction pass skipped wakes the eviction task again.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Notify;

/// The leases requests hold on mirrors, by directory: a leased mirror is not evicted.
#[derive(Default)]
pub(super) struct Leases {
    pub(super) counts: parking_lot::Mutex<HashMap<PathBuf, usize>>,
    /// Mirrors an eviction pass skipped as in use: the end of one's last lease wakes it (not
    /// any mirror's, or every request would start a pass while the limit is exceeded).
    pub(super) deferred: parking_lot::Mutex<HashSet<PathBuf>>,
    /// Wakes the eviction task.
    pub(super) wake: Arc<Notify>,
}

/// A request's hold on a mirror: while it lives, the mirror is not evicted. Taken before the
/// request looks at the mirror, dropped when its answer has been sent.
pub struct Lease {
    leases: Arc<Leases>,
    dir: PathBuf,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut counts = self.leases.counts.lock();
        let last = match counts.get_mut(&self.dir) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            _ => {
                counts.remove(&self.dir);
                true
            }
        };
        drop(counts);
        if last && self.leases.deferred.lock().remove(&self.dir) {
            self.leases.wake.notify_one();
        }
    }
}

pub(super) fn lease(leases: &Arc<Leases>, dir: &Path) -> Lease {
    *leases.counts.lock().entry(dir.to_path_buf()).or_default() += 1;
    Lease {
        leases: Arc::clone(leases),
        dir: dir.to_path_buf(),
    }
}
