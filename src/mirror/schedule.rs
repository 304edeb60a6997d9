//! When the store maintains a mirror ([`super::maintain`] does the work): in the background
//! after a sync that changed it, one mirror at a time on one thread, or now for a caller, and
//! then its snapshot is built again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::leases::Leases;
use super::{maintain, sync, Error, Mirrors, Repo};
use crate::repo::Snapshot;

/// Maintenance of one mirror, as a sync schedules it or a caller runs it.
pub(super) struct Maintenance {
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
    pub(super) fn start_if_due(self, snapshot: Arc<Snapshot>) {
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
        let local = |context: &'static str, source: Box<dyn std::error::Error + Send + Sync>| {
            Error::Local {
                name: name.clone(),
                context,
                source,
            }
        };
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown { name: name.clone() })?;
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
        .map_err(|e| local("maintenance", e.into()))?
        .map_err(|e| {
            crate::metrics::maintenance("failed");
            local("maintenance", e.into())
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
            Ok(Err(e)) => return Err(local("reading the maintained mirror", e.into())),
            Err(e) => return Err(local("reading the maintained mirror", e.into())),
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

impl Mirrors {
    /// Maintain the mirror at `dir` now (see [`maintain::run`]): one pack, and a bitmap and
    /// commit-graph that cover its refs ([`maintain::Policy::COMPLETE`]), holding its
    /// maintenance lock so that no sync runs meanwhile; then rebuild its snapshot.
    pub async fn maintain(&self, dir: &Path) -> Result<maintain::Outcome, Error> {
        let mut job = self.maintenance_job(&self.repo(dir), dir);
        job.threads = None;
        job.policy = maintain::Policy::COMPLETE;
        job.run().await
    }

    pub(super) fn maintenance_job(&self, repo: &Arc<Repo>, dir: &Path) -> Maintenance {
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
}
