//! Credentials: the header sent upstream in static mode, and the cache of which client
//! credentials the upstream accepted for a private mirror.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use gix::ObjectId;

use crate::ttl::TtlMap;

/// The `Authorization` value for `STATIC_TOKEN`: basic auth with the token as password, which
/// GitHub (`x-access-token`), GitLab and Gitea accept for tokens.
pub fn static_token_header(token: &str) -> String {
    let pair = format!("x-access-token:{token}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// Remembers, for a short time, whether the upstream accepted or refused a credential for a
/// mirror, so that neither a right nor a wrong password costs an upstream round trip per
/// request. Only a hash of the credential is kept, and at most [`MAX_VERDICTS`] of them.
pub struct AccessCache {
    verdicts: TtlMap<(PathBuf, ObjectId), bool>,
}

/// Verdicts kept at most; beyond, new ones are not remembered until old ones expire, so that a
/// flood of made-up credentials cannot grow the cache.
const MAX_VERDICTS: usize = 10_000;

impl AccessCache {
    /// Remember verdicts for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        AccessCache {
            verdicts: TtlMap::new(ttl, MAX_VERDICTS),
        }
    }

    /// Note that the upstream just accepted `credentials` for `dir`.
    pub fn remember(&self, dir: &Path, credentials: &str) {
        self.record(dir, credentials, true);
    }

    fn record(&self, dir: &Path, credentials: &str, accepted: bool) {
        if let Some(h) = hash(credentials) {
            self.verdicts.insert((dir.to_path_buf(), h), accepted);
        }
    }

    pub async fn check<F>(
        &self,
        dir: &Path,
        credentials: &str,
        verify: F,
    ) -> Result<(), crate::upstream::Error>
    where
        F: FnOnce(&str) -> Result<(), crate::upstream::Error> + Send + 'static,
    {
        let verdict = hash(credentials).and_then(|h| self.verdicts.get(&(dir.to_path_buf(), h)));
        match verdict {
            Some(true) => return Ok(()),
            Some(false) => return Err(crate::upstream::Error::AuthRequired),
            None => {}
        }
        let owned = credentials.to_owned();
        let result = tokio::task::spawn_blocking(move || verify(&owned))
            .await
            .map_err(|e| crate::upstream::Error::Local(e.to_string()))?;
        match &result {
            Ok(()) => self.record(dir, credentials, true),
            Err(crate::upstream::Error::AuthRequired) => self.record(dir, credentials, false),
            Err(_) => {}
        }
        result
    }
}

/// `None` only if SHA-1 collision detection fires; such a credential is then never cached.
fn hash(credentials: &str) -> Option<ObjectId> {
    let mut hasher = gix::hash::hasher(gix::hash::Kind::Sha1);
    hasher.update(credentials.as_bytes());
    hasher.try_finalize().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_token_is_basic_auth() {
        assert_eq!(static_token_header("t0k"), "Basic eC1hY2Nlc3MtdG9rZW46dDBr");
    }

    #[tokio::test]
    async fn refusals_are_remembered_like_acceptances_and_other_failures_are_not() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        let cache = AccessCache::new(Duration::from_secs(60));
        let dir = Path::new("/m/host/o/r.git");
        let calls = Arc::new(AtomicUsize::new(0));
        let verify = |answer: fn() -> Result<(), crate::upstream::Error>| {
            let calls = Arc::clone(&calls);
            move |_: &str| {
                calls.fetch_add(1, Ordering::Relaxed);
                answer()
            }
        };
        let refused = || Err(crate::upstream::Error::AuthRequired);
        let down = || Err(crate::upstream::Error::Failed("unreachable".into()));
        for _ in 0..3 {
            let r = cache.check(dir, "Basic wrong", verify(refused)).await;
            assert!(matches!(r, Err(crate::upstream::Error::AuthRequired)));
        }
        assert_eq!(
            calls.load(Ordering::Relaxed),
            1,
            "one upstream check for three refusals"
        );
        for _ in 0..2 {
            assert!(cache.check(dir, "Basic other", verify(down)).await.is_err());
        }
        assert_eq!(
            calls.load(Ordering::Relaxed),
            3,
            "an unreachable upstream is asked again"
        );
        for _ in 0..2 {
            assert!(cache
                .check(dir, "Basic right", verify(|| Ok(())))
                .await
                .is_ok());
        }
        assert_eq!(calls.load(Ordering::Relaxed), 4);
    }
}
