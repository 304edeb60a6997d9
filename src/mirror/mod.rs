//! The mirror store: bare mirrors under `MIRROR_DIR`, created and synced from their upstream
//! on demand, one sync at a time per repository (concurrent requests share it), several
//! repositories in parallel up to a bound.
//!
//! A mirror is created in a temporary sibling directory and renamed into place, so that a
//! half-written mirror is never served; temporaries left by a crash are removed at start. A
//! bare repository found at a mirror path (`git clone --mirror`, a restored backup) is adopted.
//!
//! Each mirror has a [`Snapshot`] — its refs, prebuilt advertisement and object store — built
//! after every create or sync that changed it (and at start), and swapped atomically: requests
//! read it through an `Arc` and never open the repository themselves. The snapshots of idle
//! mirrors are dropped beyond `SNAPSHOT_MEMORY` ([`snapshots`]) and built again on request.

mod access;
pub mod evict;
pub mod maintain;
pub mod record;
pub mod snapshots;
mod sync;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};

use crate::config::Secret;
use crate::repo::Snapshot;
use crate::ttl::TtlMap;
use crate::upstream;

/// Prefix of the temporary directories mirrors are created in.
const TMP_PREFIX: &str = ".smart-git-proxy-tmp-";

/// How a request was served, as told in `X-Git-Proxy-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The mirror was created for this request.
    Clone,
    /// The mirror was synced for this request.
    Sync,
    /// The mirror was fresh enough.
    Hit,
    /// The sync failed; the existing mirror was served.
    Stale,
}

impl Status {
    /// The header value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Clone => "clone",
            Status::Sync => "sync",
            Status::Hit => "hit",
            Status::Stale => "stale",
        }
    }
}

/// Why a mirror cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream needs (other) credentials.
    #[error("authentication required for {0}")]
    AuthRequired(String),
    /// There is no mirror and the upstream has no such repository.
    #[error("repository '{0}' not found upstream")]
    NotFound(String),
    /// There is no mirror and the upstream failed (or the disk, while fetching).
    #[error("cannot mirror {name}: {source}")]
    Upstream {
        /// `host/path`
        name: String,
        /// What went wrong.
        source: upstream::Error,
    },
    /// A local failure (disk, a task that panicked).
    #[error("mirror {name}: {message}")]
    Local {
        /// `host/path`
        name: String,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// What a client is told: the repository and the kind of failure, without the cause
    /// chain, which names local paths and URLs (the log has it).
    pub fn client_message(&self) -> String {
        match self {
            Error::AuthRequired(_) | Error::NotFound(_) => self.to_string(),
            Error::Upstream { name, source } => format!("cannot mirror {name}: {}", source.cause()),
            Error::Local { .. } => "internal server error (see the proxy's log)".into(),
        }
    }
}

/// Maintenance of one mirror, as a sync schedules it or a caller runs it.
struct Maintenance {
    repo: Arc<Repo>,
    dir: PathBuf,
    slots: Arc<Semaphore>,
    /// Eviction skips a mirror while its maintenance is pending, and is woken when it ends.
    leases: Arc<Leases>,
    /// When it works and what it does; `packs` 0: never in the background.
    policy: maintain::Policy,
    grace: Duration,
    threads: Option<usize>,
}

impl Maintenance {
    /// In the background, when the mirror (as `snapshot` shows it after a create or sync)
    /// needs it under the policy ([`maintain::due`]: a new mirror has no bitmap yet) and no
    /// maintenance is queued for it already (many syncs in a row schedule one).
    fn start_if_due(self, snapshot: Arc<Snapshot>) {
        if self.policy.packs == 0 || self.repo.maintenance_pending.swap(true, Ordering::Relaxed) {
            return;
        }
        tokio::spawn(async move {
            let (repo, leases) = (Arc::clone(&self.repo), Arc::clone(&self.leases));
            let (dir, policy) = (self.dir.clone(), self.policy);
            let checked = dir.clone();
            let due = tokio::task::spawn_blocking(move || {
                maintain::due(&checked, snapshot.refs(), policy, &AtomicBool::new(false))
            })
            .await;
            let result = match due {
                Ok(Ok(maintain::Work::Nothing)) => Ok(()),
                Ok(Ok(_)) => self.run().await.map(drop).map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "maintenance failed; the mirror is unchanged");
            }
            repo.maintenance_pending.store(false, Ordering::Relaxed);
            if leases.deferred.lock().remove(&dir) {
                leases.wake.notify_one();
            }
        });
    }

    async fn run(self) -> Result<maintain::Outcome, Error> {
        let name = self.dir.display().to_string();
        let local = |message: String| Error::Local {
            name: name.clone(),
            message,
        };
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| local("shutting down".into()))?;
        // Not under the mirror's state lock: requests that check its freshness go on being
        // answered. The maintenance lock keeps syncs out (a sync that starts meanwhile waits
        // for it).
        let started = Instant::now();
        let dir = self.dir.clone();
        let (grace, policy, threads) = (self.grace, self.policy, self.threads);
        let outcome = tokio::task::spawn_blocking(move || {
            maintain::run(&dir, grace, policy, threads, &AtomicBool::new(false))
        })
        .await
        .map_err(|e| local(e.to_string()))?
        .map_err(|e| {
            crate::metrics::maintenance("failed");
            local(format!("maintenance: {e}"))
        })?;
        if outcome.work == maintain::Work::Nothing {
            return Ok(outcome);
        }
        crate::metrics::maintenance("ok");
        // Under the state lock, as a sync sets the snapshot: one built now from the disk is
        // not replaced by an older one.
        let _state = self.repo.state.lock().await;
        *self.repo.usage.lock() = None;
        let previous = self.repo.snapshot();
        let dir = self.dir.clone();
        match tokio::task::spawn_blocking(move || sync::refresh(&dir, previous)).await {
            Ok(Ok(snapshot)) => self.repo.set_snapshot(snapshot),
            Ok(Err(e)) => return Err(local(crate::error_chain(&e))),
            Err(e) => return Err(local(e.to_string())),
        }
        tracing::info!(
            repo = %name,
            work = ?outcome.work,
            packs_before = outcome.packs_before,
            objects = outcome.regions.iter().sum::<usize>(),
            objects_head = outcome.regions[0],
            objects_branches = outcome.regions[1],
            objects_rest = outcome.regions[2],
            dropped = outcome.dropped,
            bytes = outcome.bytes,
            bitmap_commits = outcome.bitmap_commits,
            bitmap_reused = outcome.bitmap_reused,
            commit_graph = outcome.commit_graph.unwrap_or(0),
            duration_ms = started.elapsed().as_millis() as u64,
            "mirror maintained"
        );
        Ok(outcome)
    }
}

/// The slots a running update holds: its host's and a global one.
type SyncSlots = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

/// What `ensure` does next.
enum Step {
    Done(Status),
    Retry,
    WaitUntil(Instant),
    Update(tokio::sync::OwnedMutexGuard<RepoState>, SyncSlots),
}

/// When a sync is due.
#[derive(Debug, Clone, Copy)]
pub enum Freshness {
    /// When the last successful sync is older than `SYNC_STALE_AFTER`.
    IfStale,
    /// Unless a sync finished after this instant (a want-miss: the client saw newer refs).
    SyncedAfter(Instant),
    /// Unless a sync started after this instant: the upstream said it changed (a push
    /// webhook) or an operator asks for it (warm-up). `reason` is logged with the sync.
    Pushed {
        /// When the notice arrived: notices that arrive during one sync share the next.
        since: Instant,
        /// Why, for the log (`webhook`, `warm-up`).
        reason: &'static str,
    },
}

impl Freshness {
    /// Whether this asks for newer data than `SYNC_STALE_AFTER` would: a parent proxy is then
    /// asked to check its own upstream too (`Cache-Control: no-cache`).
    fn revalidates(self) -> bool {
        !matches!(self, Freshness::IfStale)
    }
}

/// Settings of the store.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `MIRROR_DIR`
    pub root: PathBuf,
    /// `SYNC_STALE_AFTER`
    pub stale_after: Duration,
    /// `MAX_CONCURRENT_SYNCS`
    pub max_syncs: usize,
    /// `MAX_CONCURRENT_SYNCS_PER_HOST`
    pub max_syncs_per_host: usize,
    /// `SYNC_WAIT`
    pub sync_wait: Duration,
    /// `WANT_MISS_SYNC_INTERVAL`
    pub want_miss_interval: Duration,
    /// `FAILURE_CACHE_TTL`
    pub failure_ttl: Duration,
    /// `MAINTENANCE_PACK_THRESHOLD` (0: no background maintenance at all).
    pub maintenance_packs: usize,
    /// `MAINTENANCE_BITMAP_LAG`
    pub maintenance_bitmap_lag: usize,
    /// `MAINTENANCE_GRACE`
    pub maintenance_grace: Duration,
    /// `SNAPSHOT_MEMORY`, in bytes.
    pub snapshot_memory: u64,
    /// Upstream timeouts.
    pub upstream: upstream::Options,
    /// The HTTP client of ref listings.
    pub client: upstream::ListingClient,
    /// `AUTH_CACHE_TTL`: how long a verdict on client credentials is remembered.
    pub access_ttl: Duration,
    /// Upstream URLs point at a parent proxy (`PARENT_PROXY`), for the metrics.
    pub via_parent: bool,
}

#[derive(Default)]
struct RepoState {
    last_sync: Option<Instant>,
    /// After a failed sync, the next attempt waits until `stale_after` has passed again.
    last_failure: Option<Instant>,
    /// When the last want-miss sync started: the next waits `want_miss_interval` after it.
    last_want_miss: Option<Instant>,
    /// When a sync last could not start within `sync_wait`: until that much time has passed
    /// again, requests that only need a fresh mirror are served the mirror as it is.
    last_busy: Option<Instant>,
    /// When the last creation attempt failed, and why: requests that waited for it get this
    /// error rather than each trying again in turn.
    last_error: Option<(Instant, upstream::Error)>,
}

/// One mirror: its sync state behind the lock that serialises its updates (and maintenance),
/// and its snapshot.
#[derive(Default)]
struct Repo {
    state: Arc<tokio::sync::Mutex<RepoState>>,
    snapshot: parking_lot::RwLock<Option<Arc<Snapshot>>>,
    /// A background maintenance is queued or running.
    maintenance_pending: AtomicBool,
    /// Its last sync and serve, as on disk (or newer).
    record: parking_lot::Mutex<record::Held>,
    /// Its size on disk; `None` until measured, and after a sync or maintenance changed it.
    usage: parking_lot::Mutex<Option<evict::Usage>>,
    /// When a request last took its snapshot ([`snapshots::Budget`]'s clock; 0: not since
    /// start).
    requested_ms: AtomicU64,
}

impl Repo {
    /// The mirror's size, measured now if it is not known (a directory walk: call on a
    /// blocking thread).
    fn usage(&self, dir: &Path) -> evict::Usage {
        if let Some(usage) = *self.usage.lock() {
            return usage;
        }
        let usage = evict::usage(dir);
        *self.usage.lock() = Some(usage);
        usage
    }

    /// Write the record of the mirror at `dir`, under its lock so that writes land in order.
    fn write_record(&self, dir: &Path) {
        let mut held = self.record.lock();
        held.dirty = false;
        if let Err(e) = held.record.write(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the mirror's record");
        }
    }

    /// Note a sync's outcome (`Err` with the upstream's message) and write it.
    fn synced(&self, dir: &Path, result: Result<(), String>) {
        {
            let mut held = self.record.lock();
            held.record.last_sync_ms = Some(record::now_ms());
            held.record.last_sync_outcome = Some(match result {
                Ok(()) => record::SyncOutcome::Ok,
                Err(_) => record::SyncOutcome::Failed,
            });
            held.record.last_sync_error = result.err();
        }
        *self.usage.lock() = None;
        self.write_record(dir);
    }

    fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.read().clone()
    }

    fn set_snapshot(&self, snapshot: Arc<Snapshot>) {
        *self.snapshot.write() = Some(snapshot);
    }
}

/// The leases requests hold on mirrors, by directory: a leased mirror is not evicted.
#[derive(Default)]
struct Leases {
    counts: parking_lot::Mutex<HashMap<PathBuf, usize>>,
    /// Mirrors an eviction pass skipped as in use: the end of one's last lease wakes it (not
    /// any mirror's, or every request would start a pass while the limit is exceeded).
    deferred: parking_lot::Mutex<std::collections::HashSet<PathBuf>>,
    /// Wakes the eviction task.
    wake: Arc<Notify>,
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

fn lease(leases: &Arc<Leases>, dir: &Path) -> Lease {
    *leases.counts.lock().entry(dir.to_path_buf()).or_default() += 1;
    Lease {
        leases: Arc::clone(leases),
        dir: dir.to_path_buf(),
    }
}

/// A sync that changed an existing mirror, as a [`SyncHook`] is told of it.
pub struct Synced {
    /// `host/path`
    pub name: String,
    /// The mirror directory.
    pub dir: PathBuf,
    /// The mirror's snapshot before the sync.
    pub before: Arc<Snapshot>,
    /// Its snapshot after the sync.
    pub after: Arc<Snapshot>,
    /// Keeps the mirror from eviction while the hook holds it.
    pub lease: Lease,
}

/// Called on the runtime after each sync that changed an existing mirror; must not block.
pub type SyncHook = Arc<dyn Fn(Synced) + Send + Sync>;

/// One mirror as the inventory lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Info {
    /// `host/path`
    pub repo: String,
    /// Bytes of its files.
    pub bytes: u64,
    /// Its pack files.
    pub packs: usize,
    /// When its last sync (or creation) ended, RFC 3339.
    pub last_sync: Option<String>,
    /// `ok` or `failed`.
    pub last_sync_outcome: Option<record::SyncOutcome>,
    /// When it was last served, RFC 3339.
    pub last_serve: Option<String>,
    /// Served only to clients whose credentials the upstream accepts (who they are is not
    /// kept).
    pub private: bool,
    /// Bytes of its packs in the pack cache.
    pub pack_cache_bytes: u64,
}

impl Info {
    fn new(
        repo: String,
        dir: &Path,
        usage: evict::Usage,
        rec: &record::Record,
        pack_cache_bytes: u64,
    ) -> Info {
        // RFC 3339 ends with year 9999 (the formatter fails beyond it): a damaged record's
        // time, or a marker's, is then unknown.
        let time = |ms: u64| {
            use std::fmt::Write;
            let mut text = String::new();
            write!(
                text,
                "{}",
                humantime::format_rfc3339_seconds(record::time_of(ms))
            )
            .ok()
            .map(|()| text)
        };
        // An adopted mirror, or one synced before records existed: its sync marker.
        let last_sync_ms = rec.last_sync_ms.or_else(|| {
            sync::last_synced(dir)
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
        });
        Info {
            repo,
            bytes: usage.bytes,
            packs: usage.packs,
            last_sync: last_sync_ms.and_then(time),
            last_sync_outcome: rec.last_sync_outcome,
            last_serve: rec.last_serve_ms.and_then(time),
            private: Mirrors::is_private(dir),
            pack_cache_bytes,
        }
    }
}

/// The mirrors under `root` as read from disk alone, sorted by name: what `smart-git-proxy
/// mirrors` prints beside a running server (whose serve times may be up to
/// [`record::SERVE_WRITE_INTERVAL`] behind). Call on a blocking thread.
pub fn inventory_on_disk(root: &Path, pack_cache_dir: &Path) -> std::io::Result<Vec<Info>> {
    let cached = crate::pack::cache::bytes_by_mirror_on_disk(pack_cache_dir)?;
    let mut out: Vec<Info> = scan(root)?
        .0
        .into_iter()
        .map(|dir| {
            let name = name_of(root, &dir);
            let cache = cached
                .get(&crate::pack::cache::MirrorId::of(&name))
                .copied()
                .unwrap_or(0);
            Info::new(
                name,
                &dir,
                evict::usage(&dir),
                &record::Record::read(&dir),
                cache,
            )
        })
        .collect();
    out.sort_by(|a, b| a.repo.cmp(&b.repo));
    Ok(out)
}

/// `host/path` of the mirror at `dir` below `root`.
fn name_of(root: &Path, dir: &Path) -> String {
    let relative = dir.strip_prefix(root).unwrap_or(dir).to_string_lossy();
    relative
        .strip_suffix(".git")
        .unwrap_or(&relative)
        .to_owned()
}

/// The mirror store.
pub struct Mirrors {
    settings: Settings,
    syncs: Arc<Semaphore>,
    /// Per upstream host (the first segment of a mirror's name), `max_syncs_per_host` slots.
    host_syncs: parking_lot::Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Mirrors on disk, and those being created.
    repos: Arc<parking_lot::Mutex<HashMap<PathBuf, Arc<Repo>>>>,
    /// Failed creations by mirror and credentials: answered without asking the upstream again
    /// for `failure_ttl`.
    failures: Arc<TtlMap<FailureKey, Failure>>,
    /// The upstream's verdicts on client credentials for private mirrors.
    access: Arc<access::AccessCache>,
    tmp_counter: AtomicU64,
    /// Background maintenance runs one at a time.
    maintenance: Arc<Semaphore>,
    leases: Arc<Leases>,
    sync_hook: std::sync::OnceLock<SyncHook>,
    snapshots: Arc<snapshots::Budget>,
    creations: Arc<Creations>,
}

/// The interrupt flags of the mirror creations running, and whether creations are stopped
/// (shutdown: the listener is closed, and the client that waits for a creation cannot come
/// back for the pack).
#[derive(Default)]
struct Creations {
    running: parking_lot::Mutex<Vec<Arc<AtomicBool>>>,
    stopped: AtomicBool,
}

impl Creations {
    /// The interrupt flag of a creation that starts now, set already once creations stopped.
    fn start(&self) -> Arc<AtomicBool> {
        let mut running = self.running.lock();
        let flag = Arc::new(AtomicBool::new(self.stopped.load(Ordering::Relaxed)));
        running.push(Arc::clone(&flag));
        flag
    }

    fn end(&self, flag: &Arc<AtomicBool>) {
        self.running.lock().retain(|f| !Arc::ptr_eq(f, flag));
    }
}

/// A mirror directory and a digest of the credentials its creation was tried with (`None`:
/// anonymously).
type FailureKey = (PathBuf, Option<u64>);

/// Why a creation failed, as remembered: only answers of the upstream that another request
/// would get again, not transient failures.
#[derive(Debug, Clone, Copy)]
enum Failure {
    AuthRequired,
    NotFound,
}

/// Failed creations remembered at most (see [`TtlMap`]).
const MAX_FAILURES: usize = 10_000;

fn failure_key(dir: &Path, credentials: Option<&Secret>) -> FailureKey {
    use std::hash::{Hash, Hasher};
    let digest = credentials.map(|c| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        c.expose().hash(&mut h);
        h.finish()
    });
    (dir.to_path_buf(), digest)
}

/// Which credentials reach the upstream for a mirror, and who is served.
///
/// With a client's own credentials (pass-through), privacy is the upstream's: a mirror is
/// public while the upstream lists its refs anonymously, and a public mirror is only ever
/// synced anonymously, so that anonymous clients receive exactly what the upstream gives
/// anonymous clients, even from an upstream that shows authenticated users more refs. A
/// client's credentials are sent only for a mirror whose upstream refuses anonymous access
/// (HTTP 401, as git itself tries credentials only then), and a private mirror is served
/// only to credentials the upstream accepts ([`Mirrors::authorize`]).
#[derive(Debug, Clone)]
pub enum Credentials {
    /// Nothing: every sync is anonymous (`AUTH_MODE=none`, or a static token not lent to this
    /// upstream).
    None,
    /// The proxy's own (`STATIC_TOKEN`): every sync uses them, and what they read is served to
    /// every client.
    Proxy(Secret),
    /// The client's own (`AUTH_MODE=pass-through`), if it sent any.
    Client(Option<Secret>),
}

/// A mirror to ensure: where it lives and where it comes from.
#[derive(Debug, Clone)]
pub struct Request {
    /// `host/path`, for messages.
    pub name: String,
    /// The mirror directory.
    pub dir: PathBuf,
    /// The upstream URL.
    pub url: String,
    /// What may reach the upstream, and who is served.
    pub credentials: Credentials,
}

impl Request {
    /// The credentials that key this request's remembered creation failures.
    fn failure_key(&self) -> FailureKey {
        match &self.credentials {
            Credentials::None | Credentials::Client(None) => failure_key(&self.dir, None),
            Credentials::Proxy(c) | Credentials::Client(Some(c)) => failure_key(&self.dir, Some(c)),
        }
    }
}

/// How an update fetches, as the upstream's answers decided it.
struct Plan {
    /// The upstream's refs, as the credentials below show them.
    listing: upstream::Listing,
    /// What is sent upstream (`None`: nothing).
    authorization: Option<Secret>,
    /// Whether the mirror is private after the update.
    private: bool,
    /// The existing mirror was private and is public now: it is made again anonymously, so
    /// that nothing fetched with credentials stays in it.
    recreate: bool,
}

impl Mirrors {
    /// A store over `settings.root`. Call [`Mirrors::remove_temporaries`] once at start.
    pub fn new(settings: Settings) -> Self {
        let snapshots = snapshots::Budget::new(settings.snapshot_memory, settings.stale_after);
        Mirrors {
            syncs: Arc::new(Semaphore::new(settings.max_syncs.max(1))),
            failures: Arc::new(TtlMap::new(settings.failure_ttl, MAX_FAILURES)),
            access: Arc::new(access::AccessCache::new(settings.access_ttl)),
            settings,
            host_syncs: Default::default(),
            repos: Default::default(),
            tmp_counter: AtomicU64::new(0),
            maintenance: Arc::new(Semaphore::new(1)),
            leases: Default::default(),
            sync_hook: Default::default(),
            snapshots: Arc::new(snapshots),
            creations: Default::default(),
        }
    }

    /// Stop the mirror creations running and those that start from now on (shutdown); returns
    /// how many were running. Their requests fail with [`upstream::Error::Interrupted`].
    pub fn stop_creations(&self) -> usize {
        let running = self.creations.running.lock();
        self.creations.stopped.store(true, Ordering::Relaxed);
        for flag in running.iter() {
            flag.store(true, Ordering::Relaxed);
        }
        running.len()
    }

    /// Hold the mirror at `dir` (which need not exist yet) for a request: it is not evicted
    /// until the lease is dropped.
    pub fn lease(&self, dir: &Path) -> Lease {
        lease(&self.leases, dir)
    }

    /// Tell `hook` of every sync that changes an existing mirror (set once, at start).
    pub fn on_sync(&self, hook: SyncHook) {
        if self.sync_hook.set(hook).is_err() {
            tracing::warn!("a sync hook is set already");
        }
    }

    /// A request was served from the mirror at `dir`: its place in the eviction order. Written
    /// to its record at most once per [`record::SERVE_WRITE_INTERVAL`] (the rest at shutdown,
    /// see [`Mirrors::flush_records`]).
    pub fn served(&self, dir: &Path) {
        let repo = self.repo(dir);
        if !repo.record.lock().served() {
            return;
        }
        // Written later, on a blocking thread: by then the request may be gone and the mirror
        // evicted and created anew, whose record this one must not replace.
        let lease = self.lease(dir);
        let repos = Arc::clone(&self.repos);
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            let _lease = lease;
            let current = repos
                .lock()
                .get(&dir)
                .is_some_and(|r| Arc::ptr_eq(r, &repo));
            if current && crate::repo::exists(&dir) {
                repo.write_record(&dir);
            }
        });
    }

    /// Write every serve not written yet (at shutdown: the eviction order survives restarts).
    /// Call on a blocking thread.
    pub fn flush_records(&self) -> usize {
        let repos: Vec<(PathBuf, Arc<Repo>)> = self
            .repos
            .lock()
            .iter()
            .filter(|(_, r)| r.record.lock().dirty)
            .map(|(d, r)| (d.clone(), Arc::clone(r)))
            .collect();
        let mut written = 0;
        for (dir, repo) in repos {
            if crate::repo::exists(&dir) {
                repo.write_record(&dir);
                written += 1;
            }
        }
        written
    }

    /// One page of the inventory: up to `limit` mirrors whose names sort after `after`, in
    /// name order, and whether more follow. Call on a blocking thread (sizes not known yet are
    /// measured).
    pub fn inventory(
        &self,
        cache: Option<&crate::pack::cache::PackCache>,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<Info>, bool) {
        let root = &self.settings.root;
        let mut all: Vec<(String, PathBuf, Arc<Repo>)> = self
            .repos
            .lock()
            .iter()
            .map(|(dir, repo)| (name_of(root, dir), dir.clone(), Arc::clone(repo)))
            .filter(|(name, ..)| after.is_none_or(|a| name.as_str() > a))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let cached = cache.map(|c| c.bytes_by_mirror()).unwrap_or_default();
        let mut page = Vec::new();
        let mut more = false;
        for (name, dir, repo) in all {
            if !crate::repo::exists(&dir) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break;
            }
            let cache = cached
                .get(&crate::pack::cache::MirrorId::of(&name))
                .copied()
                .unwrap_or(0);
            let rec = repo.record.lock().record.clone();
            page.push(Info::new(name, &dir, repo.usage(&dir), &rec, cache));
        }
        (page, more)
    }

    /// `host/path` of the mirror at `dir`.
    fn name_of(&self, dir: &Path) -> String {
        name_of(&self.settings.root, dir)
    }

    /// Remove what a previous process left behind when it died: temporary mirror directories
    /// (mid-clone), and temporary pack files and stale ref locks inside mirrors (mid-sync).
    /// Returns how many were removed.
    pub fn remove_temporaries(&self) -> std::io::Result<usize> {
        remove_temporaries(&self.settings.root)
    }

    /// Build the snapshots of the mirrors on disk, so that the first requests find them ready:
    /// the most recently served first, until they take `SNAPSHOT_MEMORY` (the others are built
    /// on their first request). Returns how many were loaded; a mirror that cannot be read is
    /// logged and skipped.
    pub fn load_all(&self) -> usize {
        let dirs = match scan(&self.settings.root) {
            Ok((mirrors, _)) => mirrors,
            Err(e) => {
                tracing::warn!(error = %e, "cannot scan the mirror directory");
                Vec::new()
            }
        };
        let mut repos: Vec<(Option<u64>, PathBuf, Arc<Repo>)> = dirs
            .into_iter()
            .map(|dir| {
                let repo = self.repo(&dir);
                let served = repo.record.lock().record.last_serve_ms;
                (served, dir, repo)
            })
            .collect();
        repos.sort_by_key(|r| std::cmp::Reverse(r.0));
        let mut bytes = self.snapshots.pass(&self.repos).bytes;
        let mut loaded = 0;
        for (_, dir, repo) in repos {
            if repo.snapshot().is_some() {
                continue;
            }
            match Snapshot::open(&dir, None) {
                Ok(snapshot) => {
                    let size = snapshot.heap_bytes() as u64;
                    if bytes + size > self.snapshots.limit() {
                        break;
                    }
                    // A request may have synced the mirror meanwhile: its snapshot is newer.
                    let mut current = repo.snapshot.write();
                    if current.is_none() {
                        bytes += size;
                        *current = Some(Arc::new(snapshot));
                        loaded += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read mirror")
                }
            }
        }
        self.snapshots.pass(&self.repos);
        loaded
    }

    /// Whether the snapshot of the mirror at `dir` is held (built, and not dropped since).
    pub fn holds_snapshot(&self, dir: &Path) -> bool {
        let repo = self.repos.lock().get(dir).cloned();
        repo.is_some_and(|r| r.snapshot().is_some())
    }

    /// Measure the snapshots held and drop those of idle mirrors beyond `SNAPSHOT_MEMORY` (see
    /// [`snapshots`]); requests start such a pass at most once a second. A walk over every
    /// mirror: call on a blocking thread.
    pub fn trim_snapshots(&self) -> snapshots::Usage {
        self.snapshots.pass(&self.repos)
    }

    /// Whether the mirror at `dir` was made with credentials.
    pub fn is_private(dir: &Path) -> bool {
        dir.join(sync::PRIVATE_MARKER).is_file()
    }

    /// The mirror's state, loading its last sync time from disk the first time.
    fn repo(&self, dir: &Path) -> Arc<Repo> {
        if let Some(repo) = self.repos.lock().get(dir) {
            return Arc::clone(repo);
        }
        // Read from disk without the store's lock, which every request takes.
        let last_sync = sync::last_synced(dir)
            .and_then(|t| t.elapsed().ok())
            .and_then(|ago| Instant::now().checked_sub(ago));
        let repo = Arc::new(Repo {
            state: Arc::new(tokio::sync::Mutex::new(RepoState {
                last_sync,
                ..Default::default()
            })),
            record: parking_lot::Mutex::new(record::Held {
                record: record::Record::read(dir),
                ..Default::default()
            }),
            ..Default::default()
        });
        // Another request may have been first: its state is the one shared.
        Arc::clone(self.repos.lock().entry(dir.to_path_buf()).or_insert(repo))
    }

    /// The current snapshot of the mirror at `dir`, built now if it has none yet (a mirror an
    /// operator placed after start). `None` when there is no mirror.
    pub async fn snapshot(&self, dir: &Path) -> Result<Option<Arc<Snapshot>>, Error> {
        let repo = self.repo(dir);
        if self.snapshots.requested(&repo) {
            let (budget, repos) = (Arc::clone(&self.snapshots), Arc::clone(&self.repos));
            tokio::task::spawn_blocking(move || budget.pass(&repos));
        }
        if let Some(snapshot) = repo.snapshot() {
            return Ok(Some(snapshot));
        }
        if !crate::repo::exists(dir) {
            return Ok(None);
        }
        let _state = repo.state.lock().await;
        if let Some(snapshot) = repo.snapshot() {
            return Ok(Some(snapshot));
        }
        let owned = dir.to_path_buf();
        let snapshot = tokio::task::spawn_blocking(move || Snapshot::open(&owned, None))
            .await
            .map_err(|e| Error::Local {
                name: dir.display().to_string(),
                message: e.to_string(),
            })?;
        match snapshot {
            Ok(snapshot) => {
                let snapshot = Arc::new(snapshot);
                repo.set_snapshot(Arc::clone(&snapshot));
                Ok(Some(snapshot))
            }
            Err(crate::repo::Error::NotFound) => Ok(None),
            Err(e) => Err(Error::Local {
                name: dir.display().to_string(),
                message: crate::error_chain(&e),
            }),
        }
    }

    /// Rebuild the snapshot of `repo` if the mirror changed on disk; failures are logged and
    /// the old snapshot kept.
    async fn refresh(&self, repo: &Arc<Repo>, dir: &Path) {
        let previous = repo.snapshot();
        let owned = dir.to_path_buf();
        match tokio::task::spawn_blocking(move || sync::refresh(&owned, previous)).await {
            Ok(Ok(snapshot)) => repo.set_snapshot(snapshot),
            Ok(Err(e)) => {
                tracing::warn!(dir = %dir.display(), error = %crate::error_chain(&e), "cannot read mirror")
            }
            Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "cannot read mirror"),
        }
    }

    /// Whether the client of `req` may be served the mirror. Always, unless the mirror is
    /// private and `req` carries a client's credentials (pass-through, see [`Credentials`]):
    /// then only if the upstream accepts them, as remembered for `AUTH_CACHE_TTL` or checked
    /// now with one ref listing that concurrent requests with the same credentials share.
    /// Call it before anything else a request can trigger (a sync, a want-miss): a refused
    /// client then costs no upstream request beyond that check, and learns nothing by timing.
    ///
    /// A client without credentials is checked the same way, with an anonymous listing: when
    /// the upstream has opened the repository, the mirror is first made again anonymously
    /// (nothing fetched with credentials stays in it), and the client is served.
    pub async fn authorize(&self, req: &Request) -> Result<(), Error> {
        if self.access(req).await? {
            return Ok(());
        }
        self.update(
            req,
            Freshness::Pushed {
                since: Instant::now(),
                reason: "now public",
            },
        )
        .await?;
        if self.access(req).await? {
            return Ok(());
        }
        // Still private: the update failed. Anonymous requests are refused without asking the
        // upstream again until the verdict expires.
        if let Credentials::Client(None) = req.credentials {
            self.access.record(&req.dir, None, false);
        }
        Err(Error::AuthRequired(req.name.clone()))
    }

    /// [`Mirrors::authorize`] without the update: `Ok(false)` for an anonymous client of a
    /// private mirror whose upstream lists it anonymously now.
    async fn access(&self, req: &Request) -> Result<bool, Error> {
        let Credentials::Client(credentials) = &req.credentials else {
            return Ok(true);
        };
        if !Mirrors::is_private(&req.dir) {
            return Ok(true);
        }
        let check = {
            let (lister, url, dir) = (self.lister(), req.url.clone(), req.dir.clone());
            let credentials = credentials.clone();
            async move {
                let listed = lister
                    .list(&url, &dir, false, credentials.as_ref(), false)
                    .await;
                match (listed, &credentials) {
                    (Ok(_), _) => Ok(()),
                    // Credentials the upstream knows that cannot read the repository (GitHub
                    // answers 404 to those).
                    (Err(upstream::Error::NotFound), Some(_)) => Err(upstream::Error::AuthRequired),
                    (Err(e), Some(_)) => Err(e),
                    // Anonymously, anything but a listing leaves the mirror private, and is
                    // remembered as a refusal: anonymous requests cost no upstream request
                    // each, even while the upstream fails.
                    (Err(_), None) => Err(upstream::Error::AuthRequired),
                }
            }
        };
        let verdict = self
            .access
            .check(&req.dir, credentials.as_ref().map(Secret::expose), check)
            .await;
        match (verdict, credentials) {
            (Ok(()), Some(_)) => Ok(true),
            (Ok(()), None) => Ok(false),
            (Err(upstream::Error::AuthRequired), _) => Err(Error::AuthRequired(req.name.clone())),
            (Err(source), _) => Err(Error::Upstream {
                name: req.name.clone(),
                source,
            }),
        }
    }

    /// Make sure the mirror exists and is as fresh as `freshness` asks, creating or syncing it
    /// (one at a time per repository; concurrent callers wait for and share the result), for
    /// a client that [`Mirrors::authorize`] lets in, before and after.
    pub async fn ensure(&self, req: &Request, freshness: Freshness) -> Result<Status, Error> {
        self.authorize(req).await?;
        let status = self.update(req, freshness).await?;
        // The mirror may have been created, or found private, by the update this request
        // waited for (another request's, with other credentials).
        self.authorize(req).await?;
        Ok(status)
    }

    /// The ref lister of updates and access checks.
    fn lister(&self) -> Lister {
        Lister {
            client: self.settings.client.clone(),
            opts: self.settings.upstream.clone(),
        }
    }

    /// [`Mirrors::ensure`] without the access checks.
    async fn update(&self, req: &Request, freshness: Freshness) -> Result<Status, Error> {
        // Callers without a lease of their own (warm-ups, push notices): eviction must not
        // remove the repository between `repo()` and its lock, or this update would run on a
        // state the store no longer holds, beside another request's.
        let _lease = self.lease(&req.dir);
        let started = Instant::now();
        let key = req.failure_key();
        let repo = loop {
            // Before `repo()`: a remembered failure leaves no trace in the store.
            if let Some(e) = self.remembered_failure(req, &key) {
                return Err(e);
            }
            let repo = self.repo(&req.dir);
            match self
                .start_update(req, &key, freshness, &repo, started)
                .await?
            {
                Step::Done(status) => return Ok(status),
                Step::Retry => {}
                Step::WaitUntil(t) => tokio::time::sleep_until(t.into()).await,
                Step::Update(state, slots) => break (repo, state, slots),
            }
        };
        let (repo, mut state, slots) = repo;
        let exists = crate::repo::exists(&req.dir);
        let local = |message: String| Error::Local {
            name: req.name.clone(),
            message,
        };
        if let Freshness::SyncedAfter(_) = freshness {
            state.last_want_miss = Some(Instant::now());
        }
        // Why this update runs, for the log.
        let reason = match freshness {
            _ if !exists => "new mirror",
            Freshness::IfStale => "stale",
            Freshness::SyncedAfter(_) => "want-miss",
            Freshness::Pushed { reason, .. } => reason,
        };
        let revalidate = freshness.revalidates();
        let via_parent = self.settings.via_parent;
        let owned = req.clone();
        let owned_dir = req.dir.clone();
        let tmp = self.tmp_dir(&req.dir);
        let aside = self.aside_dir();
        let opts = self.settings.upstream.clone();
        let lister = self.lister();
        let access = Arc::clone(&self.access);
        // The update runs in a task of its own that holds the repository's lock and the sync
        // slot: if this request goes away, the update still finishes and is recorded, and the
        // requests waiting for it see the outcome.
        let failures = Arc::clone(&self.failures);
        let repos = Arc::clone(&self.repos);
        let maintenance = self.maintenance_job(&repo, &req.dir);
        let wake_eviction = Arc::clone(&self.leases.wake);
        let hook = self.sync_hook.get().cloned();
        let leases = Arc::clone(&self.leases);
        let creations = Arc::clone(&self.creations);
        let update = tokio::spawn(async move {
            let _slots = slots;
            // A creation can be stopped at shutdown ([`Mirrors::stop_creations`]); a sync
            // serves clients waiting for it, or the next ones.
            let interrupt = if exists {
                Arc::new(AtomicBool::new(false))
            } else {
                creations.start()
            };
            let started = Instant::now();
            let name = owned.name.clone();
            let current = repo.snapshot();
            let before = current.clone().filter(|_| exists);
            let from_client = matches!(owned.credentials, Credentials::Client(_));
            let plan = plan(
                &lister, &owned, exists, &tmp, revalidate, &failures, &access,
            )
            .await;
            let stopped = Arc::clone(&interrupt);
            let result = match plan {
                Err(e) => Err(e),
                Ok(_) if stopped.load(Ordering::Relaxed) => Err(upstream::Error::Interrupted),
                Ok(plan) => tokio::task::spawn_blocking(move || {
                    let interrupt = &*stopped;
                    let mut owned = owned;
                    if let Some(url) = &plan.listing.url {
                        owned.url = url.clone();
                    }
                    let authorization = plan.authorization.as_ref().map(Secret::expose);
                    if !exists {
                        return sync::create(
                            &owned,
                            &tmp,
                            authorization,
                            plan.private,
                            &opts,
                            interrupt,
                        );
                    }
                    if plan.recreate {
                        tracing::info!(repo = %owned.name, "the upstream lists the repository anonymously now: mirroring it again without credentials");
                        return sync::recreate(&owned, &tmp, &aside, &opts, interrupt);
                    }
                    let snapshot = match current {
                        Some(snapshot) => Ok(snapshot),
                        None => Snapshot::open(&owned.dir, None)
                            .map(Arc::new)
                            .map_err(|e| upstream::Error::Local(crate::error_chain(&e))),
                    };
                    snapshot.and_then(|s| {
                        let listing = plan.listing;
                        let private = plan.private;
                        sync::sync(&owned, s, listing, authorization, private, &opts, interrupt)
                    })
                })
                .await
                .unwrap_or_else(|e| Err(upstream::Error::Local(e.to_string()))),
            };
            if !exists {
                creations.end(&interrupt);
            }
            match result {
                Ok(outcome) => {
                    // When the listing was taken, not when the fetch ended: a want-miss that
                    // arrived during a long fetch must not count this sync as newer than itself.
                    state.last_sync = Some(started);
                    state.last_failure = None;
                    repo.set_snapshot(Arc::clone(&outcome.snapshot));
                    let status = outcome.status;
                    if let (Some(hook), Some(before)) = (&hook, before) {
                        if outcome.changed > 0 {
                            hook(Synced {
                                name: name.clone(),
                                dir: owned_dir.clone(),
                                before,
                                after: Arc::clone(&outcome.snapshot),
                                lease: lease(&leases, &owned_dir),
                            });
                        }
                    }
                    record_sync(&repo, &owned_dir, Ok(())).await;
                    if outcome.pack_bytes > 0 || status == Status::Clone {
                        // The mirror grew: measured again, and perhaps over MIRROR_MAX_SIZE.
                        wake_eviction.notify_one();
                    }
                    crate::metrics::mirror_update(
                        status.as_str(),
                        started.elapsed(),
                        outcome.pack_bytes,
                    );
                    if via_parent {
                        crate::metrics::parent_fetch(status.as_str());
                    }
                    tracing::info!(
                        repo = %name,
                        reason,
                        status = status.as_str(),
                        refs = outcome.refs,
                        changed = outcome.changed,
                        bytes = outcome.pack_bytes,
                        duration = ?started.elapsed(),
                        "mirror updated"
                    );
                    if outcome.changed > 0 || status == Status::Clone {
                        maintenance.start_if_due(Arc::clone(&outcome.snapshot));
                    }
                    Ok(status)
                }
                Err(e @ (upstream::Error::AuthRequired | upstream::Error::NotFound)) if !exists => {
                    // Remembered, and forgotten as a mirror: an unknown repository or refused
                    // credentials cost one upstream request per FAILURE_CACHE_TTL, and no
                    // memory beyond the cache.
                    let failure = match e {
                        upstream::Error::AuthRequired => Failure::AuthRequired,
                        _ => Failure::NotFound,
                    };
                    failures.insert(key, failure);
                    repos.lock().remove(&owned_dir);
                    crate::metrics::mirror_update("failed", started.elapsed(), 0);
                    if via_parent {
                        crate::metrics::parent_fetch("failed");
                    }
                    Err(e)
                }
                // The upstream refuses this client, or anonymous access to a mirror that is
                // private from now on: its clients are checked before any sync, so refusals do
                // not reach the upstream again.
                Err(upstream::Error::AuthRequired) if from_client => {
                    Err(upstream::Error::AuthRequired)
                }
                Err(e) if exists => {
                    state.last_failure = Some(started);
                    record_sync(&repo, &owned_dir, Err(e.to_string())).await;
                    crate::metrics::mirror_update("stale", started.elapsed(), 0);
                    if via_parent {
                        crate::metrics::parent_fetch("stale");
                    }
                    tracing::warn!(repo = %name, reason, error = %e, "sync failed, serving the existing mirror");
                    Ok(Status::Stale)
                }
                Err(e) => {
                    crate::metrics::mirror_update("failed", started.elapsed(), 0);
                    if via_parent {
                        crate::metrics::parent_fetch("failed");
                    }
                    state.last_error = Some((Instant::now(), e.clone()));
                    repos.lock().remove(&owned_dir);
                    Err(e)
                }
            }
        });
        match update.await.map_err(|e| local(e.to_string()))? {
            Ok(status) => Ok(status),
            Err(upstream::Error::AuthRequired) => Err(Error::AuthRequired(req.name.clone())),
            Err(upstream::Error::NotFound) => Err(Error::NotFound(req.name.clone())),
            Err(e) => Err(Error::Upstream {
                name: req.name.clone(),
                source: e,
            }),
        }
    }

    /// Maintain the mirror at `dir` now (see [`maintain::run`]): one pack, and a bitmap and
    /// commit-graph that cover its refs ([`maintain::Policy::COMPLETE`]), holding its
    /// maintenance lock so that no sync runs meanwhile; then rebuild its snapshot.
    pub async fn maintain(&self, dir: &Path) -> Result<maintain::Outcome, Error> {
        let mut job = self.maintenance_job(&self.repo(dir), dir);
        job.threads = None;
        job.policy = maintain::Policy::COMPLETE;
        job.run().await
    }

    /// The mirrors on disk.
    pub fn list(&self) -> std::io::Result<Vec<PathBuf>> {
        Ok(scan(&self.settings.root)?.0)
    }

    fn maintenance_job(&self, repo: &Arc<Repo>, dir: &Path) -> Maintenance {
        Maintenance {
            repo: Arc::clone(repo),
            dir: dir.to_path_buf(),
            slots: Arc::clone(&self.maintenance),
            leases: Arc::clone(&self.leases),
            policy: maintain::Policy {
                packs: self.settings.maintenance_packs,
                bitmap_lag: self.settings.maintenance_bitmap_lag,
            },
            grace: self.settings.maintenance_grace,
            // In the background: one thread, leaving the cores to requests.
            threads: Some(1),
        }
    }

    /// Decide what `ensure` does next, under the repository's lock: nothing (fresh, or served
    /// as it is), wait (want-miss backoff), or update, holding the lock and the sync slots.
    async fn start_update(
        &self,
        req: &Request,
        key: &FailureKey,
        freshness: Freshness,
        repo: &Arc<Repo>,
        arrived: Instant,
    ) -> Result<Step, Error> {
        let exists = crate::repo::exists(&req.dir);
        // A request that only needs some fresh mirror does not wait long for a sync to start:
        // it is served the mirror as it is.
        let patient = !(exists && matches!(freshness, Freshness::IfStale));
        let wait_until = arrived + self.settings.sync_wait;
        let lock = Arc::clone(&repo.state).lock_owned();
        let mut state = if patient {
            lock.await
        } else {
            match tokio::time::timeout_at(wait_until.into(), lock).await {
                Ok(state) => state,
                Err(_) => return Ok(Step::Done(Status::Stale)),
            }
        };
        // The creation this request waited for may just have failed: remembered, or forgotten
        // (the store dropped this entry; another request may have made a new one).
        if let Some(e) = self.remembered_failure(req, key) {
            return Err(e);
        }
        match &state.last_error {
            Some((failed, source)) if !exists && *failed > arrived => {
                return Err(Error::Upstream {
                    name: req.name.clone(),
                    source: source.clone(),
                });
            }
            _ => {}
        }
        let current = self
            .repos
            .lock()
            .get(&req.dir)
            .is_some_and(|r| Arc::ptr_eq(r, repo));
        if !current {
            return Ok(Step::Retry);
        }
        let now = Instant::now();
        if exists {
            let fresh = match freshness {
                Freshness::IfStale => state
                    .last_sync
                    .is_some_and(|t| now.duration_since(t) < self.settings.stale_after),
                Freshness::SyncedAfter(since) | Freshness::Pushed { since, .. } => {
                    state.last_sync.is_some_and(|t| t > since)
                }
            };
            if fresh {
                return Ok(Step::Done(Status::Hit));
            }
            // A sync check: first pick up what others changed on disk, so that a mirror whose
            // upstream fails is still served as it is now.
            self.refresh(repo, &req.dir).await;
            let recently = |t: Option<Instant>, d: Duration| t.is_some_and(|t| now < t + d);
            let backing_off = recently(state.last_failure, self.settings.stale_after)
                || recently(state.last_busy, self.settings.sync_wait);
            // A want-miss shares a failed attempt that started after it arrived, as it shares a
            // successful one: waiting requests do not each retry a failing upstream.
            let failed_since = |since: Instant| state.last_failure.is_some_and(|t| t > since);
            match freshness {
                Freshness::IfStale if backing_off => return Ok(Step::Done(Status::Stale)),
                Freshness::SyncedAfter(since) | Freshness::Pushed { since, .. }
                    if failed_since(since) =>
                {
                    return Ok(Step::Done(Status::Stale))
                }
                Freshness::SyncedAfter(_)
                    if recently(state.last_want_miss, self.settings.want_miss_interval) =>
                {
                    // Back off: one want-miss sync per interval; the requests waiting now share
                    // the next one.
                    let next = state
                        .last_want_miss
                        .map_or(now, |t| t + self.settings.want_miss_interval);
                    return Ok(Step::WaitUntil(next));
                }
                _ => {}
            }
        }
        let slots = self.sync_slots(req);
        let slots = if patient {
            slots.await
        } else {
            match tokio::time::timeout_at(wait_until.into(), slots).await {
                Ok(slots) => slots,
                Err(_) => {
                    state.last_busy = Some(Instant::now());
                    tracing::info!(repo = %req.name, "no sync slot within SYNC_WAIT: serving the mirror as it is");
                    return Ok(Step::Done(Status::Stale));
                }
            }
        };
        let slots = slots.map_err(|_| Error::Local {
            name: req.name.clone(),
            message: "shutting down".into(),
        })?;
        Ok(Step::Update(state, slots))
    }

    /// The remembered failure to create the mirror with these credentials, if it does not
    /// exist (an operator may have placed it since). A repository the upstream does not have
    /// for anonymous requests is not looked for with a client's credentials either: they are
    /// tried only after a refusal (401).
    fn remembered_failure(&self, req: &Request, key: &FailureKey) -> Option<Error> {
        let anonymously = || match &req.credentials {
            Credentials::Client(Some(_)) => self
                .failures
                .get(&failure_key(&req.dir, None))
                .filter(|f| matches!(f, Failure::NotFound)),
            _ => None,
        };
        let failure = self.failures.get(key).or_else(anonymously)?;
        if crate::repo::exists(&req.dir) {
            return None;
        }
        Some(match failure {
            Failure::AuthRequired => Error::AuthRequired(req.name.clone()),
            Failure::NotFound => Error::NotFound(req.name.clone()),
        })
    }

    /// A slot of the mirror's upstream host, then a global one: requests for a host whose
    /// slots are all taken (a hanging upstream) do not hold global slots while they wait.
    async fn sync_slots(&self, req: &Request) -> Result<SyncSlots, tokio::sync::AcquireError> {
        let host = req.name.split('/').next().unwrap_or_default();
        let host_slots = Arc::clone(
            self.host_syncs
                .lock()
                .entry(host.to_owned())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(self.settings.max_syncs_per_host.max(1)))
                }),
        );
        let host = host_slots.acquire_owned().await?;
        let global = Arc::clone(&self.syncs).acquire_owned().await?;
        Ok((host, global))
    }

    /// Where an existing mirror is moved before it is deleted (when it is made again),
    /// directly under the root: the start-up cleanup removes what a crash leaves there.
    fn aside_dir(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.settings.root.join(format!(
            "{}replaced-{}-{n}",
            evict::EVICTED_PREFIX,
            std::process::id()
        ))
    }

    /// A temporary directory for a new mirror, directly under the root: nothing is created at
    /// the mirror's place until the mirror is complete.
    fn tmp_dir(&self, dir: &Path) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.settings
            .root
            .join(format!("{TMP_PREFIX}{name}-{}-{n}", std::process::id()))
    }
}

/// Lists an upstream's refs for updates and access checks.
#[derive(Clone)]
struct Lister {
    client: upstream::ListingClient,
    opts: upstream::Options,
}

impl Lister {
    /// The refs at `url` as `authorization` shows them: one `ls-refs` request, or gix's
    /// handshake from the local repository `local` when the upstream does not take a bare
    /// `ls-refs`. With `fresh`, `local` is a new mirror's temporary directory: made for the
    /// handshake, and removed again when the listing fails.
    async fn list(
        &self,
        url: &str,
        local: &Path,
        fresh: bool,
        authorization: Option<&Secret>,
        revalidate: bool,
    ) -> Result<upstream::Listing, upstream::Error> {
        let auth = authorization.map(Secret::expose);
        match upstream::ls_refs(&self.client, url, auth, revalidate, &self.opts).await {
            Ok(listing) => Ok(listing),
            Err(upstream::LsRefsError::Failed(e)) => Err(e),
            Err(upstream::LsRefsError::Unsupported(why)) => {
                tracing::debug!(url, %why, "listing refs with a handshake");
                let (url, local) = (url.to_owned(), local.to_path_buf());
                let (authorization, opts) = (authorization.cloned(), self.opts.clone());
                tokio::task::spawn_blocking(move || {
                    let auth = authorization.as_ref().map(Secret::expose);
                    let listed = if fresh {
                        sync::init(&local).and_then(|()| upstream::list(&local, &url, auth, &opts))
                    } else {
                        upstream::list(&local, &url, auth, &opts)
                    };
                    if fresh && listed.is_err() {
                        let _ = std::fs::remove_dir_all(&local);
                    }
                    listed
                })
                .await
                .unwrap_or_else(|e| Err(upstream::Error::Local(e.to_string())))
            }
        }
    }
}

/// Decide how the update of `req` fetches (see [`Credentials`]): from which listing, with
/// which credentials, and whether the mirror is private afterwards. `tmp` is where a new
/// mirror is made. Anonymous refusals and the verdicts on a client's credentials are noted on
/// the way.
async fn plan(
    lister: &Lister,
    req: &Request,
    exists: bool,
    tmp: &Path,
    revalidate: bool,
    failures: &TtlMap<FailureKey, Failure>,
    access: &access::AccessCache,
) -> Result<Plan, upstream::Error> {
    let local = if exists { req.dir.as_path() } else { tmp };
    let list = |authorization| lister.list(&req.url, local, !exists, authorization, revalidate);
    let was_private = exists && Mirrors::is_private(&req.dir);
    let client = match &req.credentials {
        Credentials::None => {
            return Ok(Plan {
                listing: list(None).await?,
                authorization: None,
                private: false,
                recreate: was_private,
            })
        }
        Credentials::Proxy(token) => {
            let listing = list(Some(token)).await?;
            // Privacy is the upstream's, not the request's: whether it also answers without
            // the token.
            let private = upstream::ls_refs(&lister.client, &req.url, None, false, &lister.opts)
                .await
                .is_err();
            return Ok(Plan {
                listing,
                authorization: Some(token.clone()),
                private,
                recreate: false,
            });
        }
        Credentials::Client(client) => client,
    };
    let anonymous_key = failure_key(&req.dir, None);
    let refused_before =
        !exists && matches!(failures.get(&anonymous_key), Some(Failure::AuthRequired));
    let anonymously = if refused_before {
        Err(upstream::Error::AuthRequired)
    } else {
        list(None).await
    };
    match anonymously {
        Ok(listing) => {
            return Ok(Plan {
                listing,
                authorization: None,
                private: false,
                recreate: was_private,
            })
        }
        Err(upstream::Error::AuthRequired) => {}
        Err(e) => {
            if let (false, upstream::Error::NotFound) = (exists, &e) {
                failures.insert(anonymous_key, Failure::NotFound);
            }
            return Err(e);
        }
    }
    // The upstream refuses anonymous access: the mirror is private from now on, before
    // anything else happens to it.
    access.record(&req.dir, None, false);
    if !exists {
        failures.insert(anonymous_key, Failure::AuthRequired);
    } else if !was_private {
        let dir = req.dir.clone();
        tokio::task::spawn_blocking(move || sync::set_private(&dir, true))
            .await
            .unwrap_or_else(|e| Err(upstream::Error::Local(e.to_string())))?;
        tracing::info!(repo = %req.name, "the upstream refuses anonymous access: the mirror is private");
    }
    let Some(credentials) = client else {
        return Err(upstream::Error::AuthRequired);
    };
    match list(Some(credentials)).await {
        Ok(listing) => {
            access.record(&req.dir, Some(credentials.expose()), true);
            Ok(Plan {
                listing,
                authorization: Some(credentials.clone()),
                private: true,
                recreate: false,
            })
        }
        Err(upstream::Error::AuthRequired | upstream::Error::NotFound) if exists => {
            access.record(&req.dir, Some(credentials.expose()), false);
            Err(upstream::Error::AuthRequired)
        }
        Err(e) => Err(e),
    }
}

/// Note a sync's outcome in the mirror's record, on a blocking thread.
async fn record_sync(repo: &Arc<Repo>, dir: &Path, result: Result<(), String>) {
    let (repo, dir) = (Arc::clone(repo), dir.to_path_buf());
    let written = tokio::task::spawn_blocking(move || repo.synced(&dir, result)).await;
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write the mirror's record");
    }
}

/// The lock file that makes a server the only one on its `MIRROR_DIR`.
const SERVER_LOCK: &str = ".smart-git-proxy.lock";

/// Another process serves the same `MIRROR_DIR`.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The lock is held.
    #[error(
        "MIRROR_DIR {root} is already served by another smart-git-proxy ({holder}; its lock \
         is {lock}): run one server per MIRROR_DIR"
    )]
    Held {
        /// `MIRROR_DIR`
        root: String,
        /// What the lock file says of its holder.
        holder: String,
        /// The lock file.
        lock: String,
    },
    /// The lock file cannot be used.
    #[error("cannot lock {lock}: {source}")]
    Io {
        /// The lock file.
        lock: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Take `root`'s server lock for as long as the returned file stays open: a second server on
/// the same `MIRROR_DIR` would break the one-sync-per-mirror guarantee and remove the first
/// one's temporaries at its start. (`smart-git-proxy maintain` does not take it: maintenance
/// has a lock of its own per mirror.)
pub fn lock_root(root: &Path) -> Result<std::fs::File, LockError> {
    use std::io::{Read, Seek, Write};
    let path = root.join(SERVER_LOCK);
    let io = |source| LockError::Io {
        lock: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        return Err(LockError::Held {
            root: root.display().to_string(),
            holder: holder.trim().to_owned(),
            lock: path.display().to_string(),
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "pid {}", std::process::id()).map_err(io)?;
    Ok(file)
}

/// The mirrors and the temporary mirror directories below `root`, at any depth. Symbolic links
/// are not followed and other dot-directories (the pack cache) are not entered.
fn scan(root: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut mirrors, mut temporaries) = (Vec::new(), Vec::new());
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let path = entry.path();
            let evicted = dir == root && name.starts_with(evict::EVICTED_PREFIX);
            if name.starts_with(TMP_PREFIX) || evicted {
                temporaries.push(path);
            } else if name.starts_with('.') {
                continue;
            } else if name.ends_with(".git") && crate::repo::exists(&path) {
                mirrors.push(path);
            } else {
                pending.push(path);
            }
        }
    }
    Ok((mirrors, temporaries))
}

fn remove_temporaries(root: &Path) -> std::io::Result<usize> {
    let (mirrors, temporaries) = scan(root)?;
    for tmp in &temporaries {
        tracing::info!(path = %tmp.display(), "removing an unfinished or evicted mirror");
        std::fs::remove_dir_all(tmp)?;
    }
    let mut removed = temporaries.len();
    for mirror in &mirrors {
        removed += sync::remove_leftovers_unless_busy(mirror);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn store(root: &Path) -> Mirrors {
        let timeout = Duration::from_secs(1);
        Mirrors::new(Settings {
            root: root.to_path_buf(),
            stale_after: timeout,
            max_syncs: 1,
            max_syncs_per_host: 1,
            sync_wait: timeout,
            want_miss_interval: timeout,
            failure_ttl: timeout,
            maintenance_packs: 0,
            maintenance_bitmap_lag: 0,
            maintenance_grace: timeout,
            snapshot_memory: 1 << 30,
            via_parent: false,
            upstream: crate::upstream::Options {
                connect_timeout: timeout,
                stall_timeout: timeout,
                tls: crate::tls::ClientTls::system(),
            },
            client: upstream::ListingClient::new(
                &crate::upstream::Options {
                    connect_timeout: timeout,
                    stall_timeout: timeout,
                    tls: crate::tls::ClientTls::system(),
                },
                &[],
            )
            .expect("a client without TLS settings builds"),
            access_ttl: timeout,
        })
    }

    #[test]
    fn the_inventory_pages_through_every_mirror_in_name_order() {
        let root = tempfile::tempdir().unwrap();
        let mirrors = store(root.path());
        // Thousands of directories are slow to make on a busy disk: 2,000 in pages of 250.
        for i in 0..2_000 {
            let dir = root.path().join(format!("h/g{}/r{i}.git", i % 100));
            std::fs::create_dir_all(dir.join("objects")).unwrap();
            mirrors.repo(&dir);
        }
        let started = Instant::now();
        let (mut names, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let (page, more) = mirrors.inventory(None, cursor.as_deref(), 250);
            pages += 1;
            names.extend(page.into_iter().map(|m| m.repo));
            if !more {
                break;
            }
            cursor = names.last().cloned();
        }
        eprintln!("2,000 mirrors in {pages} pages: {:?}", started.elapsed());
        assert_eq!(pages, 8);
        assert_eq!(names.len(), 2_000);
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert_eq!(names[0], "h/g0/r0");
    }

    #[test]
    fn the_inventory_shows_times_beyond_year_9999_as_unknown() {
        let root = tempfile::tempdir().unwrap();
        let mirrors = store(root.path());
        let dir = root.path().join("h/r.git");
        std::fs::create_dir_all(dir.join("objects")).unwrap();
        // A damaged or hand-edited record: RFC 3339 has no year 10000.
        std::fs::write(
            dir.join(record::FILE),
            br#"{"last_sync_ms":300000000000000,"last_serve_ms":18446744073709551615}"#,
        )
        .unwrap();
        mirrors.repo(&dir);
        let (page, _) = mirrors.inventory(None, None, 10);
        assert_eq!(
            (page[0].last_sync.as_deref(), page[0].last_serve.as_deref()),
            (None, None)
        );
        let on_disk = inventory_on_disk(root.path(), &root.path().join(".pack-cache")).unwrap();
        assert_eq!(on_disk[0].last_serve, None);
    }

    #[test]
    fn requests_never_print_credentials() {
        for credentials in [
            Credentials::Client(Some(Secret::from("Basic c2VjcmV0"))),
            Credentials::Proxy(Secret::from("Basic c2VjcmV0")),
        ] {
            let req = Request {
                name: "h/o/r".into(),
                dir: "/m/h/o/r.git".into(),
                url: "https://h/o/r.git".into(),
                credentials,
            };
            let printed = format!("{req:?} {req:#?}");
            assert!(!printed.contains("c2VjcmV0"), "{printed}");
            assert!(printed.contains("<redacted>"), "{printed}");
        }
    }

    #[test]
    fn removes_temporaries_but_not_mirrors() {
        let root = tempfile::tempdir().unwrap();
        let keep = root.path().join("github.com/o/r.git/objects");
        let tmp = root
            .path()
            .join(format!("github.com/o/{TMP_PREFIX}x.git-1-0/objects"));
        std::fs::create_dir_all(&keep).unwrap();
        std::fs::create_dir_all(&tmp).unwrap();
        assert_eq!(remove_temporaries(root.path()).unwrap(), 1);
        assert!(keep.is_dir());
        assert!(!tmp.parent().unwrap().exists());
    }
}
