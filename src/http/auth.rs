//! Credentials: the header sent upstream in static mode, and the cache of which client
//! credentials the upstream accepted for a private mirror.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use gix::ObjectId;

/// The `Authorization` value for `STATIC_TOKEN`: basic auth with the token as password, which
/// GitHub (`x-access-token`), GitLab and Gitea accept for tokens.
pub fn static_token_header(token: &str) -> String {
    let pair = format!("x-access-token:{token}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// Remembers, for a short time, that the upstream accepted a credential for a mirror. Only a
/// hash of the credential is kept.
pub struct AccessCache {
    ttl: Duration,
    accepted: parking_lot::Mutex<HashMap<(PathBuf, ObjectId), Instant>>,
}

impl AccessCache {
    /// Remember acceptances for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        AccessCache {
            ttl,
            accepted: Default::default(),
        }
    }

    /// Note that the upstream just accepted `credentials` for `dir`.
    pub fn remember(&self, dir: &Path, credentials: &str) {
        if let Some(h) = hash(credentials) {
            self.accepted
                .lock()
                .insert((dir.to_path_buf(), h), Instant::now());
        }
    }

    /// Whether `credentials` may read `dir`: from the cache, else by running `verify` on a
    /// blocking thread.
    pub async fn check<F>(
        &self,
        dir: &Path,
        credentials: &str,
        verify: F,
    ) -> Result<(), crate::upstream::Error>
    where
        F: FnOnce(&str) -> Result<(), crate::upstream::Error> + Send + 'static,
    {
        let key = hash(credentials).map(|h| (dir.to_path_buf(), h));
        let now = Instant::now();
        if let Some(key) = &key {
            let mut accepted = self.accepted.lock();
            accepted.retain(|_, at| now.duration_since(*at) < self.ttl);
            if accepted.contains_key(key) {
                return Ok(());
            }
        }
        let credentials = credentials.to_owned();
        tokio::task::spawn_blocking(move || verify(&credentials))
            .await
            .map_err(|e| crate::upstream::Error::Local(e.to_string()))??;
        if let Some(key) = key {
            self.accepted.lock().insert(key, now);
        }
        Ok(())
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
}
