//! A mirror that does not exist yet: the upstream's listing its first requests are answered
//! from while it is created ([`Mirrors::preview`]), and the log of a creation's progress.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::failures::{failure_error, failure_key, FailureKey};
use super::plan::Planner;
use super::policy::Failure;
use super::{Error, Mirrors, Request};
use crate::protocol::advert::Refs;
use crate::upstream;

/// How long a preview is reused by every client of a public repository, or by requests with
/// the same credentials (at most `AUTH_CACHE_TTL` then: it is a verdict on them too): the
/// requests of one clone (the ref listing, then the fetch), and of concurrent clones, ask the
/// upstream once.
pub(super) const PREVIEW_TTL: Duration = Duration::from_secs(30);

/// A preview being made or made: when, and the refs of the listing as the mirror will
/// advertise them (sorted once, for every request it answers).
pub(super) type Preview = Arc<tokio::sync::OnceCell<(Instant, Arc<Refs>)>>;

/// Previews remembered at most (see [`crate::ttl::TtlMap`]).
pub(super) const MAX_PREVIEWS: usize = 10_000;

/// How often a creation's progress is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

impl Mirrors {
    /// The upstream's refs for the mirror of `req`, which does not exist yet, as its client
    /// may see them: listed as a creation lists them, with the same access rules (anonymously
    /// first; the client's credentials only after the upstream refused that, see
    /// [`super::Credentials`]), remembering refusals as a failed creation does. A client the
    /// upstream refuses gets the error a creation would give it; one it accepts may be shown
    /// these refs, and progress, while the mirror is created.
    pub async fn preview(&self, req: &Request) -> Result<Arc<Refs>, Error> {
        let key = req.failure_key();
        if let Some(failure) = self.remembered_failure(req, &key) {
            return Err(failure_error(req, failure));
        }
        if let Some(listing) = self.made_preview(req) {
            return Ok(listing);
        }
        // Concurrent requests with the same credentials share one listing.
        let made = self.previews.get(&key).filter(|cell| cell.initialized());
        if made.is_some() {
            // Made longer than AUTH_CACHE_TTL ago: made again.
            self.previews.remove(&key);
        }
        let cell = match self.previews.get(&key) {
            Some(cell) => cell,
            None => {
                let cell = Arc::new(tokio::sync::OnceCell::new());
                if self.previews.insert_new(key.clone(), Arc::clone(&cell)) {
                    cell
                } else {
                    self.previews.get(&key).unwrap_or(cell)
                }
            }
        };
        let (_, listing) = cell
            .get_or_try_init(|| self.preview_listing(req, key))
            .await?;
        Ok(Arc::clone(listing))
    }

    /// A preview made for every client (the repository is public) or for the credentials of
    /// `req` less than `AUTH_CACHE_TTL` ago.
    fn made_preview(&self, req: &Request) -> Option<Arc<Refs>> {
        let made = |key: &FailureKey| {
            let cell = self.previews.get(key)?;
            cell.get().map(|(at, listing)| (*at, Arc::clone(listing)))
        };
        let public = failure_key(&req.dir, None);
        if let Some((_, listing)) = made(&public) {
            return Some(listing);
        }
        made(&req.failure_key())
            .filter(|(at, _)| at.elapsed() < self.settings.access_ttl)
            .map(|(_, listing)| listing)
    }

    /// List the upstream's refs for [`Mirrors::preview`].
    async fn preview_listing(
        &self,
        req: &Request,
        key: FailureKey,
    ) -> Result<(Instant, Arc<Refs>), Error> {
        let started = Instant::now();
        let tmp = self.tmp_dir(&req.dir);
        let planner = Planner {
            lister: &self.lister(),
            failures: &self.failures,
            access: &self.access,
        };
        // The mirror's state is not touched: it does not exist, so it is not private yet.
        let planned = planner.plan(req, &Arc::default(), false, &tmp, false).await;
        // A listing made with gix's handshake needed a repository there.
        if tmp.exists() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(tmp)).await;
        }
        match planned {
            Ok(plan) => {
                let listing = Arc::new(plan.listing.advertised());
                if !plan.private {
                    let made = Some((started, Arc::clone(&listing)));
                    let cell = Arc::new(tokio::sync::OnceCell::new_with(made));
                    self.previews.insert(failure_key(&req.dir, None), cell);
                }
                Ok((started, listing))
            }
            Err(upstream::Error::AuthRequired) => {
                self.failures.insert(key, Failure::AuthRequired);
                Err(Error::AuthRequired(req.name.clone()))
            }
            Err(upstream::Error::NotFound) => {
                self.failures.insert(key, Failure::NotFound);
                Err(Error::NotFound(req.name.clone()))
            }
            Err(source) => Err(Error::Upstream {
                name: req.name.clone(),
                source,
            }),
        }
    }

    /// Whether the client of `req` has a [`Mirrors::preview`] of the mirror (its clone is under
    /// way).
    pub fn previewed(&self, req: &Request) -> bool {
        self.made_preview(req).is_some()
    }

    /// How far the fetch of the current (or last) update of the mirror at `dir` got.
    pub fn fetch_progress(&self, dir: &std::path::Path) -> Arc<upstream::Progress> {
        Arc::clone(&self.repo(dir).fetch_progress)
    }
}

/// Logs a creation's progress until dropped.
pub(super) struct Log(tokio::task::AbortHandle);

impl Drop for Log {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Log that the mirror `name` is being created, then what its fetch received every
/// [`LOG_INTERVAL`], until the returned [`Log`] is dropped.
pub(super) fn log(name: &str, progress: &Arc<upstream::Progress>) -> Log {
    tracing::info!(repo = %name, "creating the mirror");
    let (name, progress) = (name.to_owned(), Arc::clone(progress));
    let started = Instant::now();
    let task = tokio::spawn(async move {
        let first = tokio::time::Instant::now() + LOG_INTERVAL;
        let mut ticks = tokio::time::interval_at(first, LOG_INTERVAL);
        loop {
            ticks.tick().await;
            tracing::info!(
                repo = %name,
                received = %progress.received().describe(),
                seconds = started.elapsed().as_secs(),
                "creating the mirror"
            );
        }
    });
    Log(task.abort_handle())
}
