//! Which client credentials the upstream accepts for a private mirror (and whether it still
//! refuses anonymous requests): verdicts remembered for a short time, and one upstream check
//! shared by every request that needs the same verdict.
//!
//! Only a hash of a credential is kept, and at most [`MAX_VERDICTS`] verdicts. This module
//! does not decide which mirrors need a check, nor how a check asks the upstream: the caller
//! hands it the check to run.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use gix::ObjectId;
use tokio::sync::watch;

use crate::ttl::TtlMap;
use crate::upstream;

/// A mirror and the hash of a credential (`None`: no credentials).
type Key = (PathBuf, Option<ObjectId>);

/// Verdicts kept at most; beyond, new ones are not remembered until old ones expire, so that a
/// flood of made-up credentials cannot grow the cache.
const MAX_VERDICTS: usize = 10_000;

/// What a shared check found, as every request waiting for it receives it.
#[derive(Debug, Clone)]
enum Verdict {
    Accepted,
    Refused,
    /// The check could not tell (the upstream failed): not remembered.
    Failed(String),
}

/// Remembers, for `AUTH_CACHE_TTL`, whether the upstream accepted or refused a credential for a
/// mirror, so that neither a right nor a wrong password costs an upstream round trip per
/// request; requests that arrive while a check runs wait for its verdict.
pub(super) struct AccessCache {
    verdicts: TtlMap<Key, bool>,
    /// Checks under way, by key. Only checks in flight are here (each ends within the upstream
    /// timeouts), so the map is bounded by the requests in flight.
    pending: parking_lot::Mutex<HashMap<Key, watch::Receiver<Option<Verdict>>>>,
}

impl AccessCache {
    /// Remember verdicts for `ttl`.
    pub(super) fn new(ttl: Duration) -> Self {
        AccessCache {
            verdicts: TtlMap::new(ttl, MAX_VERDICTS),
            pending: Default::default(),
        }
    }

    /// Note what the upstream just answered to `credentials` (`None`: none) for `dir`: a sync
    /// that listed refs with them.
    pub(super) fn record(&self, dir: &Path, credentials: Option<&str>, accepted: bool) {
        if let Some(key) = key(dir, credentials) {
            self.verdicts.insert(key, accepted);
        }
    }

    /// Whether the upstream accepts `credentials` (`None`: none) for `dir`: remembered, or the
    /// verdict of `check` (an upstream request; `Err(AuthRequired)` is a refusal), which
    /// concurrent callers with the same credentials share. The check runs in a task of its
    /// own, so that a caller that goes away does not leave the others without a verdict.
    pub(super) async fn check<F>(
        self: &Arc<Self>,
        dir: &Path,
        credentials: Option<&str>,
        check: F,
    ) -> Result<(), upstream::Error>
    where
        F: Future<Output = Result<(), upstream::Error>> + Send + 'static,
    {
        let Some(key) = key(dir, credentials) else {
            // Never remembered (see `hash`): checked every time.
            return check.await;
        };
        let mut verdict = {
            // Under the lock of the checks in flight: a check records its verdict before it
            // leaves that map, so a request finds one or the other.
            let mut pending = self.pending.lock();
            if let Some(accepted) = self.verdicts.get(&key) {
                return answer(if accepted {
                    Verdict::Accepted
                } else {
                    Verdict::Refused
                });
            }
            match pending.get(&key) {
                Some(verdict) => verdict.clone(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    pending.insert(key.clone(), rx.clone());
                    let cache = Arc::clone(self);
                    tokio::spawn(async move {
                        let verdict = match check.await {
                            Ok(()) => Verdict::Accepted,
                            Err(upstream::Error::AuthRequired) => Verdict::Refused,
                            Err(e) => Verdict::Failed(e.to_string()),
                        };
                        match verdict {
                            Verdict::Accepted => cache.verdicts.insert(key.clone(), true),
                            Verdict::Refused => cache.verdicts.insert(key.clone(), false),
                            Verdict::Failed(_) => {}
                        }
                        cache.pending.lock().remove(&key);
                        tx.send_replace(Some(verdict));
                    });
                    rx
                }
            }
        };
        let verdict = match verdict.wait_for(Option::is_some).await {
            Ok(v) => v.clone(),
            // The check's task ended without a verdict: the runtime is shutting down.
            Err(_) => None,
        };
        answer(verdict.unwrap_or_else(|| Verdict::Failed("the check was stopped".into())))
    }
}

fn answer(verdict: Verdict) -> Result<(), upstream::Error> {
    match verdict {
        Verdict::Accepted => Ok(()),
        Verdict::Refused => Err(upstream::Error::AuthRequired),
        Verdict::Failed(message) => Err(upstream::Error::Failed(message)),
    }
}

/// The key of `credentials` for `dir`; `None` only if SHA-1 collision detection fires on them:
/// such a credential is never remembered.
fn key(dir: &Path, credentials: Option<&str>) -> Option<Key> {
    let hash = match credentials {
        Some(c) => Some(hash(c)?),
        None => None,
    };
    Some((dir.to_path_buf(), hash))
}

fn hash(credentials: &str) -> Option<ObjectId> {
    let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
    hasher.update(credentials.as_bytes());
    hasher.try_finalize().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A check that counts its runs and answers `answer` after `delay`.
    fn counted(
        calls: &Arc<AtomicUsize>,
        delay: Duration,
        answer: fn() -> Result<(), upstream::Error>,
    ) -> impl Future<Output = Result<(), upstream::Error>> + Send + 'static {
        let calls = Arc::clone(calls);
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            answer()
        }
    }

    #[tokio::test]
    async fn refusals_are_remembered_like_acceptances_and_other_failures_are_not() {
        let cache = Arc::new(AccessCache::new(Duration::from_secs(60)));
        let dir = Path::new("/m/host/o/r.git");
        let calls = Arc::new(AtomicUsize::new(0));
        let refused = || Err(upstream::Error::AuthRequired);
        let down = || Err(upstream::Error::Failed("unreachable".into()));
        let none = Duration::ZERO;
        for _ in 0..3 {
            let r = cache
                .check(dir, Some("Basic wrong"), counted(&calls, none, refused))
                .await;
            assert!(matches!(r, Err(upstream::Error::AuthRequired)));
        }
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "one check for three refusals"
        );
        for _ in 0..2 {
            let r = cache
                .check(dir, Some("Basic other"), counted(&calls, none, down))
                .await;
            assert!(matches!(r, Err(upstream::Error::Failed(_))));
        }
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "an unreachable upstream is asked again"
        );
        for _ in 0..2 {
            let r = cache
                .check(dir, Some("Basic right"), counted(&calls, none, || Ok(())))
                .await;
            assert!(r.is_ok());
        }
        assert_eq!(calls.load(Ordering::Relaxed), 4);
        cache.record(dir, Some("Basic synced"), true);
        cache.record(dir, None, false);
        let r = cache
            .check(dir, Some("Basic synced"), counted(&calls, none, refused))
            .await;
        assert!(r.is_ok(), "a sync's verdict is remembered");
        let r = cache
            .check(dir, None, counted(&calls, none, || Ok(())))
            .await;
        assert!(
            matches!(r, Err(upstream::Error::AuthRequired)),
            "and so is an anonymous refusal"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }

    #[tokio::test]
    async fn concurrent_requests_share_one_check_even_when_the_first_goes_away() {
        let cache = Arc::new(AccessCache::new(Duration::from_secs(60)));
        let dir = Path::new("/m/host/o/r.git");
        let calls = Arc::new(AtomicUsize::new(0));
        let slow = Duration::from_millis(200);
        let refused = || Err(upstream::Error::AuthRequired);
        // The first caller starts the check and is dropped before it ends.
        let first = cache.check(dir, Some("Basic wrong"), counted(&calls, slow, refused));
        assert!(tokio::time::timeout(Duration::from_millis(20), first)
            .await
            .is_err());
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let (cache, calls) = (Arc::clone(&cache), Arc::clone(&calls));
                tokio::spawn(async move {
                    cache
                        .check(dir, Some("Basic wrong"), counted(&calls, slow, refused))
                        .await
                })
            })
            .collect();
        for w in waiters {
            assert!(matches!(
                w.await.unwrap(),
                Err(upstream::Error::AuthRequired)
            ));
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
