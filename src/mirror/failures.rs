//! The failure memo: creations the upstream refused (401) or did not know (404), remembered
//! per mirror and credentials for `FAILURE_CACHE_TTL`, so that an unknown repository or
//! refused credentials cost one upstream request per period and no mirror state.

use std::path::{Path, PathBuf};

use super::policy::Failure;
use super::{Credentials, Error, Mirrors, Request};
use crate::config::Secret;

/// A mirror directory and a digest of the credentials its creation was tried with (`None`:
/// anonymously).
pub(super) type FailureKey = (PathBuf, Option<u64>);

/// The error of a request answered with a remembered failure.
pub(super) fn failure_error(req: &Request, failure: Failure) -> Error {
    match failure {
        Failure::AuthRequired => Error::AuthRequired(req.name.clone()),
        Failure::NotFound => Error::NotFound(req.name.clone()),
    }
}

/// Failed creations remembered at most (see [`crate::ttl::TtlMap`]).
pub(super) const MAX_FAILURES: usize = 10_000;

pub(super) fn failure_key(dir: &Path, credentials: Option<&Secret>) -> FailureKey {
    use std::hash::{Hash, Hasher};
    let digest = credentials.map(|c| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        c.expose().hash(&mut h);
        h.finish()
    });
    (dir.to_path_buf(), digest)
}

impl Request {
    /// The credentials that key this request's remembered creation failures.
    pub(super) fn failure_key(&self) -> FailureKey {
        match &self.credentials {
            Credentials::None | Credentials::Client(None) => failure_key(&self.dir, None),
            Credentials::Proxy(c) | Credentials::Client(Some(c)) => failure_key(&self.dir, Some(c)),
        }
    }
}

impl Mirrors {
    /// The remembered failure to create the mirror with these credentials, if it does not
    /// exist (an operator may have placed it since). A repository the upstream does not have
    /// for anonymous requests is not looked for with a client's credentials either: they are
    /// tried only after a refusal (401).
    pub(super) fn remembered_failure(&self, req: &Request, key: &FailureKey) -> Option<Failure> {
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
        Some(failure)
    }
}
