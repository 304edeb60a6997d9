//! Creating and syncing mirrors as the store does it: one update at a time per mirror, which
//! the requests that wait for it share (singleflight), in a task of its own that holds the
//! mirror's lock and the sync slots. What an update does next is decided by
//! [`super::policy`]; the fetch itself is [`super::sync`]'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::failures::{failure_error, FailureKey};
use super::leases::{lease, Leases};
use super::plan::{Lister, Planner};
use super::policy::{self, Failure, Settled};
use super::schedule::Maintenance;
use super::{
    access, evict, sync, Credentials, Error, Freshness, Mirrors, Repo, RepoState, Request, Status,
    SyncHook, Synced, TMP_PREFIX,
};
use crate::config::Secret;
use crate::repo::Snapshot;
use crate::ttl::TtlMap;
use crate::upstream;

/// The slots a running update holds: its host's and a global one.
type SyncSlots = (
    tokio::sync::OwnedSemaphorePermit,
    tokio::sync::OwnedSemaphorePermit,
);

/// How [`Mirrors::update`] goes on after [`Mirrors::start_update`].
enum Next {
    /// The request is answered with this status, without an update.
    Done(Status),
    /// Look the mirror up again.
    Retry,
    /// Wait until then, and ask again.
    WaitUntil(Instant),
    /// Update the mirror, holding its lock and the sync slots.
    Update(tokio::sync::OwnedMutexGuard<RepoState>, SyncSlots),
}

/// The interrupt flags of the mirror creations running, and whether creations are stopped
/// (shutdown: the listener is closed, and the client that waits for a creation cannot come
/// back for the pack).
#[derive(Default)]
pub(super) struct Creations {
    pub(super) running: parking_lot::Mutex<Vec<Arc<AtomicBool>>>,
    pub(super) stopped: AtomicBool,
}

impl Creations {
    /// The interrupt flag of a creation that starts now, set already once creations stopped.
    pub(super) fn start(&self) -> Arc<AtomicBool> {
        let mut running = self.running.lock();
        let flag = Arc::new(AtomicBool::new(self.stopped.load(Ordering::Relaxed)));
        running.push(Arc::clone(&flag));
        flag
    }

    pub(super) fn end(&self, flag: &Arc<AtomicBool>) {
        self.running.lock().retain(|f| !Arc::ptr_eq(f, flag));
    }
}

impl Mirrors {
    /// [`Mirrors::ensure`] without the access checks.
    pub(super) async fn update(
        &self,
        req: &Request,
        freshness: Freshness,
    ) -> Result<Status, Error> {
        // Callers without a lease of their own (warm-ups, push notices): eviction must not
        // remove the repository between `repo()` and its lock, or this update would run on a
        // state the store no longer holds, beside another request's.
        let _lease = self.lease(&req.dir);
        let ask = policy::Ask {
            freshness,
            arrived: Instant::now(),
        };
        let key = req.failure_key();
        let repo = loop {
            // Before `repo()`: a remembered failure leaves no trace in the store.
            if let Some(failure) = self.remembered_failure(req, &key) {
                return Err(failure_error(req, failure));
            }
            let repo = self.repo(&req.dir);
            match self.start_update(req, &key, &ask, &repo).await? {
                Next::Done(status) => return Ok(status),
                Next::Retry => {}
                Next::WaitUntil(t) => tokio::time::sleep_until(t.into()).await,
                Next::Update(state, slots) => break (repo, state, slots),
            }
        };
        let (repo, state, slots) = repo;
        let exists = crate::repo::exists(&req.dir);
        let job = Job {
            req: req.clone(),
            exists,
            key,
            reason: freshness.reason(exists),
            revalidate: freshness.revalidates(),
            via_parent: self.settings.via_parent,
            tmp: self.tmp_dir(&req.dir),
            aside: self.aside_dir(),
            opts: self.settings.upstream.clone(),
            lister: self.lister(),
            access: Arc::clone(&self.access),
            failures: Arc::clone(&self.failures),
            repos: Arc::clone(&self.repos),
            maintenance: self.maintenance_job(&repo, &req.dir),
            hook: self.sync_hook.get().cloned(),
            leases: Arc::clone(&self.leases),
            creations: Arc::clone(&self.creations),
            repo,
        };
        // The update runs in a task of its own that holds the repository's lock and the sync
        // slot: if this request goes away, the update still finishes and is recorded, and the
        // requests waiting for it see the outcome.
        let update = tokio::spawn(async move {
            let _slots = slots;
            job.run(state).await
        });
        let outcome = update.await.map_err(|e| Error::Local {
            name: req.name.clone(),
            context: "updating the mirror",
            source: e.into(),
        })?;
        match outcome {
            Ok(status) => Ok(status),
            Err(upstream::Error::AuthRequired) => Err(Error::AuthRequired(req.name.clone())),
            Err(upstream::Error::NotFound) => Err(Error::NotFound(req.name.clone())),
            Err(e) => Err(Error::Upstream {
                name: req.name.clone(),
                source: e,
            }),
        }
    }

    /// Take the mirror's lock, gather what the store knows of it, ask [`policy::next_step`]
    /// what the request does, and carry that out up to the update itself: re-read the mirror,
    /// take the sync slots, or say how the request is answered.
    async fn start_update(
        &self,
        req: &Request,
        key: &FailureKey,
        ask: &policy::Ask,
        repo: &Arc<Repo>,
    ) -> Result<Next, Error> {
        let exists = crate::repo::exists(&req.dir);
        let timing = self.timing();
        let lock = Arc::clone(&repo.state).lock_owned();
        let mut state = match policy::patience(exists, ask, &timing) {
            None => lock.await,
            Some(until) => match tokio::time::timeout_at(until.into(), lock).await {
                Ok(state) => state,
                Err(_) => return Ok(Next::Done(Status::Stale)),
            },
        };
        // Again under the lock: the creation this request waited for made it.
        let exists = crate::repo::exists(&req.dir);
        let view = policy::View {
            exists,
            current: self
                .repos
                .lock()
                .get(&req.dir)
                .is_some_and(|r| Arc::ptr_eq(r, repo)),
            // The creation this request waited for may just have failed: remembered, or
            // forgotten (the store dropped this entry; another request may have made a new
            // one).
            remembered: self.remembered_failure(req, key),
            last_sync: state.last_sync,
            last_failure: state.last_failure,
            last_want_miss: state.last_want_miss,
            last_busy: state.last_busy,
            last_error: state.last_error.as_ref().map(|(t, _)| *t),
        };
        let step = policy::next_step(Instant::now(), &view, ask, &timing);
        if step.rereads(&view) {
            self.refresh(repo, &req.dir).await;
        }
        let (slots_until, want_miss) = match step {
            policy::Step::Remembered(failure) => return Err(failure_error(req, failure)),
            policy::Step::CreationFailed => {
                // The step is only taken with a last error: otherwise, look again.
                return match &state.last_error {
                    Some((_, source)) => Err(Error::Upstream {
                        name: req.name.clone(),
                        source: source.clone(),
                    }),
                    None => Ok(Next::Retry),
                };
            }
            policy::Step::Retry => return Ok(Next::Retry),
            policy::Step::Hit => return Ok(Next::Done(Status::Hit)),
            policy::Step::Stale => return Ok(Next::Done(Status::Stale)),
            policy::Step::WaitUntil(t) => return Ok(Next::WaitUntil(t)),
            policy::Step::Update {
                slots_until,
                want_miss,
            } => (slots_until, want_miss),
        };
        let slots = self.sync_slots(req);
        let slots = match slots_until {
            None => slots.await,
            Some(until) => match tokio::time::timeout_at(until.into(), slots).await {
                Ok(slots) => slots,
                Err(_) => {
                    state.last_busy = Some(Instant::now());
                    tracing::info!(repo = %req.name, "no sync slot within SYNC_WAIT: serving the mirror as it is");
                    return Ok(Next::Done(Status::Stale));
                }
            },
        };
        let slots = slots.map_err(|_| Error::ShuttingDown {
            name: req.name.clone(),
        })?;
        if want_miss {
            state.last_want_miss = Some(Instant::now());
        }
        Ok(Next::Update(state, slots))
    }

    /// The settings of [`policy::next_step`].
    fn timing(&self) -> policy::Timing {
        policy::Timing {
            stale_after: self.settings.stale_after,
            sync_wait: self.settings.sync_wait,
            want_miss_interval: self.settings.want_miss_interval,
        }
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
    pub(super) fn tmp_dir(&self, dir: &Path) -> PathBuf {
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

/// An update of one mirror, as [`Mirrors::update`] runs it in a task of its own: what it
/// needs of the store.
struct Job {
    req: Request,
    repo: Arc<Repo>,
    /// The mirror existed when the update started: a sync (or a remake), else a creation.
    exists: bool,
    /// What a refused or unknown creation is remembered under.
    key: FailureKey,
    /// Why it runs, for the log.
    reason: &'static str,
    /// A parent proxy checks its own upstream too.
    revalidate: bool,
    /// Upstream URLs point at a parent proxy, for the metrics.
    via_parent: bool,
    /// Where a new mirror is made.
    tmp: PathBuf,
    /// Where a mirror made again is moved before it is deleted.
    aside: PathBuf,
    opts: upstream::Options,
    lister: Lister,
    access: Arc<access::AccessCache>,
    failures: Arc<TtlMap<FailureKey, Failure>>,
    repos: Arc<parking_lot::Mutex<HashMap<PathBuf, Arc<Repo>>>>,
    maintenance: Maintenance,
    hook: Option<SyncHook>,
    leases: Arc<Leases>,
    creations: Arc<Creations>,
}

impl Job {
    /// Fetch, then note the outcome in `state` (the mirror's, locked for the update), the
    /// record, the metrics and the log.
    async fn run(
        self,
        mut state: tokio::sync::OwnedMutexGuard<RepoState>,
    ) -> Result<Status, upstream::Error> {
        // A creation can be stopped at shutdown ([`Mirrors::stop_creations`]); a sync serves
        // clients waiting for it, or the next ones.
        let interrupt = if self.exists {
            Arc::new(AtomicBool::new(false))
        } else {
            self.creations.start()
        };
        let started = Instant::now();
        let current = self.repo.snapshot();
        let before = current.clone().filter(|_| self.exists);
        self.repo.fetch_progress.reset();
        let log =
            (!self.exists).then(|| super::creation::log(&self.req.name, &self.repo.fetch_progress));
        let result = self.fetch(current, &interrupt).await;
        drop(log);
        if !self.exists {
            self.creations.end(&interrupt);
        }
        match result {
            Ok(outcome) => Ok(self.succeeded(&mut state, outcome, before, started).await),
            Err(e) => self.failed(&mut state, e, started).await,
        }
    }

    /// Plan the update, then create, remake or sync the mirror on a blocking thread. `current`
    /// is the mirror's snapshot, if it has one.
    async fn fetch(
        &self,
        current: Option<Arc<Snapshot>>,
        interrupt: &Arc<AtomicBool>,
    ) -> Result<sync::Outcome, upstream::Error> {
        let planner = Planner {
            lister: &self.lister,
            failures: &self.failures,
            access: &self.access,
        };
        let plan = planner
            .plan(
                &self.req,
                &self.repo,
                self.exists,
                &self.tmp,
                self.revalidate,
            )
            .await?;
        if interrupt.load(Ordering::Relaxed) {
            return Err(upstream::Error::Interrupted);
        }
        let (mut req, repo, exists) = (self.req.clone(), Arc::clone(&self.repo), self.exists);
        let (tmp, aside, opts) = (self.tmp.clone(), self.aside.clone(), self.opts.clone());
        let interrupt = Arc::clone(interrupt);
        tokio::task::spawn_blocking(move || {
            let interrupt = &*interrupt;
            let progress = &repo.fetch_progress;
            if let Some(url) = &plan.listing.url {
                req.url = url.clone();
            }
            let held = &repo.record;
            if !exists {
                let authorization = plan.authorization.as_ref().map(Secret::expose);
                return sync::create(
                    &req,
                    &tmp,
                    authorization,
                    plan.private,
                    held,
                    &opts,
                    progress,
                    interrupt,
                );
            }
            if plan.recreate {
                tracing::info!(repo = %req.name, "the upstream lists the repository anonymously now: mirroring it again without credentials");
                return sync::recreate(&req, &tmp, &aside, held, &opts, progress, interrupt);
            }
            let snapshot = match current {
                Some(snapshot) => Ok(snapshot),
                None => Snapshot::open(&req.dir, None)
                    .map(Arc::new)
                    .map_err(|e| upstream::Error::Local(crate::error_chain(&e))),
            };
            snapshot.and_then(|s| sync::sync(&req, s, plan, held, &opts, progress, interrupt))
        })
        .await
        .unwrap_or_else(|e| Err(upstream::Error::Local(e.to_string())))
    }

    /// Note an update that succeeded, which started at `started`, on a mirror whose snapshot
    /// was `before` (`None`: a creation); tell the sync hook, eviction and maintenance.
    async fn succeeded(
        self,
        state: &mut RepoState,
        outcome: sync::Outcome,
        before: Option<Arc<Snapshot>>,
        started: Instant,
    ) -> Status {
        let (name, dir) = (&self.req.name, &self.req.dir);
        // When the listing was taken, not when the fetch ended: a want-miss that arrived
        // during a long fetch must not count this sync as newer than itself.
        state.last_sync = Some(started);
        state.last_failure = None;
        self.repo.set_snapshot(Arc::clone(&outcome.snapshot));
        let status = outcome.status;
        if let (Some(hook), Some(before)) = (&self.hook, before) {
            if outcome.changed > 0 {
                hook(Synced {
                    name: name.clone(),
                    dir: dir.clone(),
                    before,
                    after: Arc::clone(&outcome.snapshot),
                    lease: lease(&self.leases, dir),
                });
            }
        }
        record_sync(&self.repo, dir, Ok(())).await;
        if outcome.pack_bytes > 0 || status == Status::Clone {
            // The mirror grew: measured again, and perhaps over MIRROR_MAX_SIZE.
            self.leases.wake.notify_one();
        }
        crate::metrics::mirror_update(status.as_str(), started.elapsed(), outcome.pack_bytes);
        if self.via_parent {
            crate::metrics::parent_fetch(status.as_str());
        }
        tracing::info!(
            repo = %name,
            reason = self.reason,
            status = status.as_str(),
            refs = outcome.refs,
            changed = outcome.changed,
            bytes = outcome.pack_bytes,
            duration = ?started.elapsed(),
            "mirror updated"
        );
        if outcome.changed > 0 || status == Status::Clone {
            self.maintenance.start_if_due(Arc::clone(&outcome.snapshot));
        }
        status
    }

    /// Note an update that failed with `e`, which started at `started`, as
    /// [`policy::settle`] says: the existing mirror is then served as it is (`Ok(Stale)`).
    async fn failed(
        self,
        state: &mut RepoState,
        e: upstream::Error,
        started: Instant,
    ) -> Result<Status, upstream::Error> {
        let (name, dir) = (&self.req.name, &self.req.dir);
        let from_client = matches!(self.req.credentials, Credentials::Client(_));
        let settled = policy::settle(self.exists, from_client, &e);
        let outcome = match settled {
            Settled::Remember(failure) => {
                self.failures.insert(self.key, failure);
                self.repos.lock().remove(dir);
                "failed"
            }
            Settled::Refused => return Err(e),
            Settled::Stale => {
                state.last_failure = Some(started);
                record_sync(&self.repo, dir, Err(e.to_string())).await;
                "stale"
            }
            Settled::Failed => {
                state.last_error = Some((Instant::now(), e.clone()));
                self.repos.lock().remove(dir);
                "failed"
            }
        };
        crate::metrics::mirror_update(outcome, started.elapsed(), 0);
        if self.via_parent {
            crate::metrics::parent_fetch(outcome);
        }
        if settled == Settled::Stale {
            tracing::warn!(repo = %name, reason = self.reason, error = %e, "sync failed, serving the existing mirror");
            return Ok(Status::Stale);
        }
        Err(e)
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
