//! How an update fetches: the upstream's listing, the credentials that read it, and whether
//! the mirror is private afterwards (see [`super::Credentials`]).

use std::path::Path;
use std::sync::Arc;

use super::failures::{failure_key, FailureKey};
use super::policy::Failure;
use super::{access, sync, Credentials, Mirrors, Repo, Request};
use crate::config::Secret;
use crate::ttl::TtlMap;
use crate::upstream;

/// How an update fetches, as the upstream's answers decided it.
pub(super) struct Plan {
    /// The upstream's refs, as the credentials below show them.
    pub(super) listing: upstream::Listing,
    /// What is sent upstream (`None`: nothing).
    pub(super) authorization: Option<Secret>,
    /// Whether the mirror is private after the update.
    pub(super) private: bool,
    /// The existing mirror was private and is public now: it is made again anonymously, so
    /// that nothing fetched with credentials stays in it.
    pub(super) recreate: bool,
}

/// Lists an upstream's refs for updates and access checks.
#[derive(Clone)]
pub(super) struct Lister {
    client: upstream::ListingClient,
    opts: upstream::Options,
}

impl Lister {
    /// The refs at `url` as `authorization` shows them: one `ls-refs` request, or gix's
    /// handshake from the local repository `local` when the upstream does not take a bare
    /// `ls-refs`. With `fresh`, `local` is a new mirror's temporary directory: made for the
    /// handshake, and removed again when the listing fails.
    pub(super) async fn list(
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

/// What deciding how an update fetches consults, and notes on the way.
pub(super) struct Planner<'a> {
    pub(super) lister: &'a Lister,
    /// Anonymous refusals and unknown repositories.
    pub(super) failures: &'a TtlMap<FailureKey, Failure>,
    /// The verdicts on a client's credentials.
    pub(super) access: &'a access::AccessCache,
}

impl Planner<'_> {
    /// Decide how the update of `req` fetches (see [`Credentials`]): from which listing, with
    /// which credentials, and whether the mirror is private afterwards. `repo` is the mirror's
    /// state (it existed: `exists`), `tmp` where a new mirror is made.
    pub(super) async fn plan(
        &self,
        req: &Request,
        repo: &Arc<Repo>,
        exists: bool,
        tmp: &Path,
        revalidate: bool,
    ) -> Result<Plan, upstream::Error> {
        let (lister, failures, access) = (self.lister, self.failures, self.access);
        let local = if exists { req.dir.as_path() } else { tmp };
        let list = |authorization| lister.list(&req.url, local, !exists, authorization, revalidate);
        let was_private = exists && repo.record.lock().record.private;
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
                let private =
                    upstream::ls_refs(&lister.client, &req.url, None, false, &lister.opts)
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
            let (repo, dir) = (Arc::clone(repo), req.dir.clone());
            tokio::task::spawn_blocking(move || sync::set_private(&repo.record, &dir, true))
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
}

impl Mirrors {
    /// The ref lister of updates and access checks.
    pub(super) fn lister(&self) -> Lister {
        Lister {
            client: self.settings.client.clone(),
            opts: self.settings.upstream.clone(),
        }
    }
}
