//! Eviction: under `MIRROR_MAX_SIZE`, the least recently used mirrors are deleted, with their
//! pack-cache entries, until the disk use is back to 90 % of the limit.
//!
//! The disk use is the mirrors' bytes (each mirror's size is measured by walking its directory
//! once, and again after each sync or maintenance changed it) plus the pack cache's. The order is
//! each mirror's last serve (else its last sync), from its [`record`](super::record), so it
//! survives restarts.
//!
//! A mirror is never deleted under a reader: requests hold a [`Lease`](super::Lease) on their
//! mirror for as long as they read it (a pack streams after the handler returned), and a
//! mirror that is leased, syncing, being maintained (in this process, or by `smart-git-proxy
//! maintain` through its lock) is skipped; the pass is repeated when its last lease ends. A
//! mirror to delete is first renamed to `{MIRROR_DIR}/.evicted-*` while no request can take a
//! lease (a request arriving afterwards creates the mirror anew), then deleted; a crash in
//! between leaves a directory that the start-up cleanup removes.
//!
//! This module does not decide what a mirror is or how it is synced; it hands the bytes it
//! freed to metrics.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Mirrors, Repo};
use crate::pack::cache::{MirrorId, PackCache};

/// Prefix of the directories evicted mirrors are moved to before they are deleted.
pub(super) const EVICTED_PREFIX: &str = ".evicted-";
/// Eviction deletes down to this share of the limit, so that it does not run after every sync.
const LOW_WATER_PERCENT: u64 = 90;
/// Between passes nobody asked for: the disk use is reported, and a share-of-filesystem limit
/// follows a resized filesystem.
const PASS_INTERVAL: Duration = Duration::from_secs(60);

/// `MIRROR_MAX_SIZE`: bytes, or a share of `MIRROR_DIR`'s filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    /// At most this many bytes.
    Bytes(u64),
    /// At most this percentage (0–100] of the filesystem's size.
    Share(f64),
}

/// A `MIRROR_MAX_SIZE` that is neither a size nor a percentage.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    /// A number without a unit or `%`: `80` is not taken as 80 bytes.
    #[error("size unit needed: '{0}' is neither a share of the filesystem (`{0}%`) nor a size (`{0}GiB`; `{0}B` for bytes)")]
    NoUnit(String),
    /// Anything else that is not a limit.
    #[error("'{0}' is neither a size (`200GiB`) nor a share of the filesystem above 0 % and at most 100 % (`80%`)")]
    Invalid(String),
}

impl std::str::FromStr for Limit {
    type Err = LimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let invalid = || LimitError::Invalid(s.to_owned());
        match s.strip_suffix('%') {
            Some(share) => {
                let share: f64 = share.trim().parse().map_err(|_| invalid())?;
                if share > 0.0 && share <= 100.0 {
                    Ok(Limit::Share(share))
                } else {
                    Err(invalid())
                }
            }
            None => match crate::config::parse_size(s) {
                Ok(b) => Ok(Limit::Bytes(b.as_u64())),
                Err(crate::config::SizeError::NoUnit(_)) => Err(LimitError::NoUnit(s.to_owned())),
                Err(crate::config::SizeError::Invalid(_)) => Err(invalid()),
            },
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Limit::Bytes(b) => write!(f, "{}", bytesize::ByteSize::b(b)),
            Limit::Share(share) => write!(f, "{share}%"),
        }
    }
}

impl Limit {
    /// The limit in bytes for the filesystem of `root`; `None` when a share cannot be resolved
    /// (the filesystem cannot be queried).
    pub fn bytes(&self, root: &Path) -> Option<u64> {
        match *self {
            Limit::Bytes(b) => Some(b),
            Limit::Share(share) => {
                let stat = rustix::fs::statvfs(root).ok()?;
                let size = stat.f_blocks.saturating_mul(stat.f_frsize);
                Some((size as f64 * share / 100.0) as u64)
            }
        }
    }
}

/// What a mirror takes on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of its files (their lengths).
    pub bytes: u64,
    /// Its pack files.
    pub packs: usize,
}

/// Measure the mirror at `dir` by walking it (symbolic links are not followed).
pub fn usage(dir: &Path) -> Usage {
    let mut usage = Usage::default();
    for entry in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if !entry.file_type().is_file() {
            continue;
        }
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        usage.bytes += meta.len();
        let name = entry.file_name().to_string_lossy();
        if name.starts_with("pack-") && name.ends_with(".pack") {
            usage.packs += 1;
        }
    }
    usage
}

/// What a pass found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Mirrors on disk after the pass.
    pub mirrors: usize,
    /// Their bytes.
    pub mirror_bytes: u64,
    /// The pack cache's bytes.
    pub pack_cache_bytes: u64,
    /// The limit, when there is one.
    pub limit: Option<u64>,
    /// Mirrors deleted.
    pub evicted: usize,
    /// Mirrors that were due but in use.
    pub deferred: usize,
}

/// One pass, on a blocking thread: measure, and with a `limit` exceeded delete the least
/// recently used mirrors that are not in use until the disk use is at 90 % of it.
pub fn pass(mirrors: &Mirrors, cache: Option<&PackCache>, limit: Option<Limit>) -> Outcome {
    let root = &mirrors.settings.root;
    // This pass decides afresh which mirrors it waits for.
    mirrors.leases.deferred.lock().clear();
    let mut candidates: Vec<(PathBuf, Arc<Repo>)> = mirrors
        .repos
        .lock()
        .iter()
        .map(|(dir, repo)| (dir.clone(), Arc::clone(repo)))
        .collect();
    candidates.retain(|(dir, _)| crate::repo::exists(dir));
    let sizes: Vec<u64> = candidates
        .iter()
        .map(|(dir, repo)| repo.usage(dir).bytes)
        .collect();
    let mut outcome = Outcome {
        mirrors: candidates.len(),
        mirror_bytes: sizes.iter().sum(),
        pack_cache_bytes: cache.map_or(0, PackCache::total_bytes),
        limit: limit.and_then(|l| l.bytes(root)),
        ..Outcome::default()
    };
    let total = |o: &Outcome| o.mirror_bytes + o.pack_cache_bytes;
    if let Some(max) = outcome.limit.filter(|max| total(&outcome) > *max) {
        let low_water = max / 100 * LOW_WATER_PERCENT;
        let mut order: Vec<(u64, usize)> = candidates
            .iter()
            .enumerate()
            .map(|(i, (_, repo))| (repo.record.lock().record.last_used_ms(), i))
            .collect();
        order.sort_unstable();
        for (_, i) in order {
            if total(&outcome) <= low_water {
                break;
            }
            let (dir, repo) = &candidates[i];
            match evict(mirrors, dir, repo) {
                Evicted::Yes => {
                    let name = mirrors.name_of(dir);
                    let cached = cache.map_or(0, |c| c.remove_mirror(MirrorId::of(&name)));
                    outcome.mirrors -= 1;
                    outcome.mirror_bytes -= sizes[i];
                    outcome.pack_cache_bytes = outcome.pack_cache_bytes.saturating_sub(cached);
                    outcome.evicted += 1;
                    crate::metrics::mirror_evicted();
                    tracing::info!(
                        repo = %name,
                        bytes = sizes[i],
                        pack_cache_bytes = cached,
                        "evicted the least recently used mirror (MIRROR_MAX_SIZE)"
                    );
                }
                Evicted::InUse => outcome.deferred += 1,
                Evicted::Failed => {}
                Evicted::Gone => {
                    outcome.mirrors -= 1;
                    outcome.mirror_bytes -= sizes[i];
                }
            }
        }
        if total(&outcome) > max {
            tracing::warn!(
                bytes = total(&outcome),
                limit = max,
                in_use = outcome.deferred,
                "over MIRROR_MAX_SIZE: the mirrors left are in use; retrying when they are released"
            );
        }
    }
    crate::metrics::mirror_disk(outcome.mirrors, outcome.mirror_bytes, outcome.limit);
    outcome
}

enum Evicted {
    Yes,
    /// Leased, syncing or being maintained: retried when its last lease ends.
    InUse,
    /// Not in the store any more (a failed creation removed it).
    Gone,
    /// It could not be locked or moved aside (logged); it stays.
    Failed,
}

/// Delete the mirror at `dir` unless it is in use.
fn evict(mirrors: &Mirrors, dir: &Path, repo: &Arc<Repo>) -> Evicted {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // Under the store's lock (which `Mirrors::repo` takes) and, below, the lease counts' (which
    // `Mirrors::lease` takes), both held until the rename: no request can start reading the
    // mirror between the check and the rename.
    let mut repos = mirrors.repos.lock();
    if !repos.get(dir).is_some_and(|r| Arc::ptr_eq(r, repo)) {
        return Evicted::Gone;
    }
    let leases = mirrors.leases.counts.lock();
    let in_use = || {
        mirrors.leases.deferred.lock().insert(dir.to_path_buf());
        Evicted::InUse
    };
    if leases.contains_key(dir) || repo.maintenance_pending.load(Ordering::Relaxed) {
        return in_use();
    }
    let Ok(_state) = repo.state.try_lock() else {
        return in_use();
    };
    // `smart-git-proxy maintain` in another process.
    let _maintenance = match super::maintain::try_lock(dir) {
        Ok(Some(lock)) => lock,
        Ok(None) => return in_use(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot evict a mirror");
            return Evicted::Failed;
        }
    };
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let aside = mirrors
        .settings
        .root
        .join(format!("{EVICTED_PREFIX}{}-{n}", std::process::id()));
    if let Err(e) = std::fs::rename(dir, &aside) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot evict a mirror");
        return Evicted::Failed;
    }
    repos.remove(dir);
    drop((leases, repos));
    if let Err(e) = std::fs::remove_dir_all(&aside) {
        // Removed at the next start.
        tracing::warn!(dir = %aside.display(), error = %e, "cannot delete an evicted mirror");
    }
    Evicted::Yes
}

/// Run passes until the store is dropped: when woken (a sync grew a mirror, a mirror due for
/// eviction was released) and every minute.
pub async fn run(mirrors: Weak<Mirrors>, cache: Option<PackCache>, limit: Option<Limit>) {
    loop {
        let Some(store) = mirrors.upgrade() else {
            return;
        };
        let wake = Arc::clone(&store.leases.wake);
        let cache = cache.clone();
        let passed = tokio::task::spawn_blocking(move || pass(&store, cache.as_ref(), limit)).await;
        if let Err(e) = passed {
            tracing::error!(error = %e, "eviction pass failed");
        }
        tokio::select! {
            () = wake.notified() => {}
            () = tokio::time::sleep(PASS_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_sizes_or_shares() {
        assert_eq!("200GiB".parse(), Ok(Limit::Bytes(200 << 30)));
        assert_eq!("1000B".parse(), Ok(Limit::Bytes(1000)));
        assert_eq!("80".parse::<Limit>(), Err(LimitError::NoUnit("80".into())));
        assert_eq!(" 80% ".parse(), Ok(Limit::Share(80.0)));
        for bad in ["0%", "101%", "x%", "lots", ""] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().unwrap();
        let half = Limit::Share(50.0).bytes(dir.path()).unwrap();
        let whole = Limit::Share(100.0).bytes(dir.path()).unwrap();
        assert!(half > 0 && half <= whole / 2 + 1, "{half} of {whole}");
    }

    /// A mirror as far as the store can tell (`objects/`), with `bytes` of pack, last served
    /// at `served_ms`.
    fn mirror(mirrors: &Mirrors, name: &str, bytes: usize, served_ms: u64) -> PathBuf {
        let dir = mirrors.settings.root.join(format!("{name}.git"));
        std::fs::create_dir_all(dir.join("objects/pack")).unwrap();
        std::fs::write(dir.join("objects/pack/pack-1.pack"), vec![0; bytes]).unwrap();
        mirrors.repo(&dir).record.lock().record.last_serve_ms = Some(served_ms);
        dir
    }

    #[test]
    fn passes_evict_the_least_recently_used_mirrors_not_in_use() {
        let root = tempfile::tempdir().unwrap();
        let mirrors = super::super::tests::store(root.path());
        let a = mirror(&mirrors, "h/a", 1000, 1);
        let b = mirror(&mirrors, "h/b", 1000, 2);
        let c = mirror(&mirrors, "h/c", 1000, 3);
        let cache = PackCache::open(root.path().join(".pack-cache"), 1 << 20).unwrap();
        let under = pass(&mirrors, Some(&cache), Some(Limit::Bytes(3000)));
        assert_eq!(
            (under.mirrors, under.mirror_bytes, under.evicted),
            (3, 3000, 0)
        );

        // Over the limit, down to 90 % of it: `a` would go first, but it is read, and `b` is
        // being maintained by another process; `c` goes.
        let lease = mirrors.lease(&a);
        let maintenance = crate::mirror::maintain::lock(&b).unwrap();
        let limit = Some(Limit::Bytes(2500));
        let busy = pass(&mirrors, Some(&cache), limit);
        assert_eq!((busy.evicted, busy.deferred), (1, 2));
        assert!(a.exists() && b.exists() && !c.exists());
        assert!(mirrors.leases.deferred.lock().contains(&a));

        // Released: a pass over a lower limit takes the least recently used, `a`, and stops
        // under 90 % of it.
        drop((lease, maintenance));
        let released = pass(&mirrors, Some(&cache), Some(Limit::Bytes(1500)));
        assert_eq!((released.evicted, released.mirrors), (1, 1));
        assert!(!a.exists() && b.exists());
        let left: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !left.iter().any(|n| n.starts_with(EVICTED_PREFIX)),
            "{left:?}"
        );
        assert!(!mirrors.repos.lock().contains_key(&a));
    }

    #[test]
    fn only_the_release_of_a_deferred_mirror_wakes_eviction() {
        use futures_util::FutureExt;
        let root = tempfile::tempdir().unwrap();
        let mirrors = super::super::tests::store(root.path());
        let a = mirror(&mirrors, "h/a", 1000, 1);
        let b = mirror(&mirrors, "h/b", 1000, 2);
        let c = mirror(&mirrors, "h/c", 10, 3);
        let woken = || mirrors.leases.wake.notified().now_or_never().is_some();
        let lease = mirrors.lease(&a);
        let busy = pass(&mirrors, None, Some(Limit::Bytes(1500)));
        assert_eq!((busy.evicted, busy.deferred), (1, 1));
        assert!(a.exists() && !b.exists());
        // Requests for other mirrors end: no pass (under load, one after every request).
        for _ in 0..3 {
            drop(mirrors.lease(&c));
        }
        assert!(!woken());
        drop(lease);
        assert!(woken(), "the deferred mirror was released");
    }

    #[test]
    fn evicted_leftovers_are_removed_at_start() {
        let root = tempfile::tempdir().unwrap();
        let aside = root.path().join(format!("{EVICTED_PREFIX}1-0/objects"));
        std::fs::create_dir_all(&aside).unwrap();
        let kept = root.path().join("h/.evicted-not-ours.git/objects");
        std::fs::create_dir_all(&kept).unwrap();
        assert_eq!(
            super::super::tests::store(root.path())
                .remove_temporaries()
                .unwrap(),
            1
        );
        assert!(!aside.exists() && kept.exists());
    }

    #[test]
    fn usage_counts_files_and_packs() {
        let dir = tempfile::tempdir().unwrap();
        let pack = dir.path().join("objects/pack");
        std::fs::create_dir_all(&pack).unwrap();
        std::fs::write(pack.join("pack-1.pack"), [0; 100]).unwrap();
        std::fs::write(pack.join("pack-1.idx"), [0; 10]).unwrap();
        std::fs::write(dir.path().join("HEAD"), [0; 5]).unwrap();
        assert_eq!(
            usage(dir.path()),
            Usage {
                bytes: 115,
                packs: 1
            }
        );
    }
}
