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
//!
//! One job per file:
//! - `policy`: when a request syncs, waits, backs off or is served the mirror as it is (pure);
//! - `update`: carrying that out, one update at a time per mirror, shared by the requests
//!   that wait for it; `plan`: which listing and credentials an update uses; `sync`: the
//!   creation or sync on disk; `creation`: what a mirror not created yet is answered from
//!   (the upstream's listing) and how its creation's progress is logged;
//! - [`record`]: what is remembered of a mirror on disk (privacy, syncs, serves);
//! - `failures`: the creations the upstream refused, remembered; `access`: the upstream's
//!   verdicts on clients' credentials for private mirrors;
//! - `leases` and [`evict`]: which mirrors are in use, and deleting the least recently used;
//! - `schedule` and [`maintain`]: when a mirror is maintained, and the work;
//! - [`snapshots`]: the memory bound of the snapshots; `inventory`: the list of the mirrors;
//! - `root`: the mirror directory's lock, and its clean-up at start.

mod access;
mod creation;
pub mod evict;
mod failures;
mod inventory;
mod leases;
pub mod maintain;
mod plan;
mod policy;
pub mod record;
mod root;
mod schedule;
pub mod snapshots;
mod sync;
mod update;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::config::Secret;
use crate::repo::Snapshot;
use crate::ttl::TtlMap;
use crate::upstream;
use failures::{FailureKey, MAX_FAILURES};
pub use inventory::{inventory_on_disk, Info};
pub use leases::Lease;
use leases::{lease, Leases};
use policy::Failure;
pub use policy::{Freshness, Status};
pub use root::{lock_root, LockError};
use root::{remove_temporaries, scan};
use update::Creations;

/// Prefix of the temporary directories mirrors are created in.
const TMP_PREFIX: &str = ".smart-git-proxy-tmp-";

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
    #[error("mirror {name}: {context}: {source}")]
    Local {
        /// `host/path`
        name: String,
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The proxy is shutting down: no new sync or maintenance starts.
    #[error("mirror {name}: shutting down")]
    ShuttingDown {
        /// `host/path`
        name: String,
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
            Error::ShuttingDown { .. } => "server is shutting down".into(),
        }
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
    /// Its record (privacy, last sync and serve), as on disk (or newer).
    record: parking_lot::Mutex<record::Held>,
    /// Its size on disk; `None` until measured, and after a sync or maintenance changed it.
    usage: parking_lot::Mutex<Option<evict::Usage>>,
    /// When a request last took its snapshot ([`snapshots::Budget`]'s clock; 0: not since
    /// start).
    requested_ms: AtomicU64,
    /// How far the fetch of its current (or last) update got.
    fetch_progress: Arc<upstream::Progress>,
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
    /// The listings of mirrors not created yet, by mirror and credentials
    /// ([`Mirrors::preview`]).
    previews: TtlMap<FailureKey, creation::Preview>,
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
            previews: TtlMap::new(creation::PREVIEW_TTL, creation::MAX_PREVIEWS),
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

    /// Whether the mirror at `dir` exists and was made or synced with credentials, as its
    /// record says (read from disk for a mirror the store does not hold: one placed since
    /// start).
    fn is_private(&self, dir: &Path) -> bool {
        if !crate::repo::exists(dir) {
            return false;
        }
        let held = self.repos.lock().get(dir).cloned();
        match held {
            Some(repo) => repo.record.lock().record.private,
            None => record::Record::read(dir).private,
        }
    }

    /// The mirror's state, loading its record from disk the first time.
    fn repo(&self, dir: &Path) -> Arc<Repo> {
        if let Some(repo) = self.repos.lock().get(dir) {
            return Arc::clone(repo);
        }
        // Read from disk without the store's lock, which every request takes.
        let record = record::Record::read(dir);
        let last_sync = record
            .last_success_ms
            .and_then(|ms| record::time_of(ms).elapsed().ok())
            .and_then(|ago| Instant::now().checked_sub(ago));
        let repo = Arc::new(Repo {
            state: Arc::new(tokio::sync::Mutex::new(RepoState {
                last_sync,
                ..Default::default()
            })),
            record: parking_lot::Mutex::new(record::Held {
                record,
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
                context: "reading the mirror",
                source: e.into(),
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
                context: "reading the mirror",
                source: e.into(),
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
        if !self.is_private(&req.dir) {
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

    /// The mirrors on disk.
    pub fn list(&self) -> std::io::Result<Vec<PathBuf>> {
        Ok(scan(&self.settings.root)?.0)
    }
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
                tls: crate::upstream::tls::ClientTls::system(),
            },
            client: upstream::ListingClient::new(
                &crate::upstream::Options {
                    connect_timeout: timeout,
                    stall_timeout: timeout,
                    tls: crate::upstream::tls::ClientTls::system(),
                },
                &[],
            )
            .expect("a client without TLS settings builds"),
            access_ttl: timeout,
        })
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
}
