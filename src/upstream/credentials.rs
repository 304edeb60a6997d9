//! The proxy's own upstream token from a GitHub App: an installation access token, minted with
//! a JWT the App's private key signs, renewed before it expires and shared by every request.
//!
//! GitHub's installation tokens live one hour. The proxy asks for one when a request first
//! needs it, and for the next once the current one is past its renewal point (half its life,
//! at most five minutes before it expires); one request renews while the others keep using
//! the current token. A renewal that fails is logged and counted, and the current token is
//! used while it is still valid; the next request past the renewal point tries again, but not
//! within [`RETRY_AFTER`] of the failure.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;

use crate::config::Secret;

/// How long after a failed renewal no other is tried (while a valid token remains).
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The longest margin before `expires_at` at which a token is renewed.
const MAX_MARGIN: Duration = Duration::from_secs(300);

/// How far in the past the JWT's `iat` is put, for clocks that differ (GitHub's advice).
const IAT_SKEW: Duration = Duration::from_secs(60);

/// How long the JWT is valid from now: GitHub refuses more than 10 minutes after `iat`.
const JWT_LIFETIME: Duration = Duration::from_secs(9 * 60);

/// Why a GitHub App token cannot be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// `GITHUB_APP_PRIVATE_KEY_FILE` cannot be read or is not an RSA private key in PEM.
    #[error("GITHUB_APP_PRIVATE_KEY_FILE '{path}': {reason}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The token endpoint could not be reached, refused the JWT, or answered something else
    /// than a token.
    #[error("GitHub App installation token from {url}: {reason}")]
    Mint {
        /// The token endpoint.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// The App's settings, checked: its id, signing key, installation and API.
#[derive(Clone)]
pub struct AppSettings {
    /// `GITHUB_APP_ID`: the JWT's issuer.
    pub app_id: String,
    /// `GITHUB_APP_INSTALLATION_ID`.
    pub installation_id: u64,
    /// `GITHUB_API_URL`, without a trailing slash.
    pub api_url: String,
    key: jsonwebtoken::EncodingKey,
}

impl std::fmt::Debug for AppSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppSettings")
            .field("app_id", &self.app_id)
            .field("installation_id", &self.installation_id)
            .field("api_url", &self.api_url)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl AppSettings {
    /// Settings with the private key read from `key_file` (PEM, PKCS#1 as GitHub hands it out,
    /// or PKCS#8).
    pub fn load(
        app_id: &str,
        key_file: &Path,
        installation_id: u64,
        api_url: &str,
    ) -> Result<Self, Error> {
        let error = |reason: String| Error::Key {
            path: key_file.to_owned(),
            reason,
        };
        let pem = std::fs::read(key_file).map_err(|e| error(e.to_string()))?;
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem)
            .map_err(|e| error(format!("not an RSA private key in PEM: {e}")))?;
        let settings = AppSettings {
            app_id: app_id.to_owned(),
            installation_id,
            api_url: api_url.trim_end_matches('/').to_owned(),
            key,
        };
        // The key's contents are only parsed when signing: sign once now, so that a bad key is
        // refused at start rather than at the first private fetch.
        settings
            .jwt(SystemTime::now())
            .map_err(|e| error(format!("not a usable RSA private key: {e}")))?;
        Ok(settings)
    }

    /// `{GITHUB_API_URL}/app/installations/{id}/access_tokens`.
    pub fn token_url(&self) -> String {
        format!(
            "{}/app/installations/{}/access_tokens",
            self.api_url, self.installation_id
        )
    }

    /// The App's JWT at `now`: RS256, `iss` the App id, `iat` a minute back, `exp` 9 minutes on.
    fn jwt(&self, now: SystemTime) -> Result<String, jsonwebtoken::errors::Error> {
        #[derive(serde::Serialize)]
        struct Claims<'a> {
            iss: &'a str,
            iat: u64,
            exp: u64,
        }
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = Claims {
            iss: &self.app_id,
            iat: secs(now - IAT_SKEW),
            exp: secs(now + JWT_LIFETIME),
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &self.key,
        )
    }
}

/// An installation token and its lifetime.
#[derive(Clone)]
struct Token {
    value: Secret,
    expires_at: SystemTime,
    /// When to mint the next one.
    renew_at: SystemTime,
}

impl Token {
    fn new(value: Secret, minted: SystemTime, expires_at: SystemTime) -> Token {
        let life = expires_at.duration_since(minted).unwrap_or_default();
        let margin = (life / 2).min(MAX_MARGIN);
        Token {
            value,
            expires_at,
            renew_at: expires_at - margin,
        }
    }
}

/// The current token, and when renewing it last failed.
#[derive(Default)]
struct State {
    token: Option<Token>,
    failed_at: Option<SystemTime>,
}

impl State {
    /// The token to use at `now` without minting: one before its renewal point, or, within
    /// [`RETRY_AFTER`] of a failed renewal, one still valid.
    fn fresh(&self, now: SystemTime) -> Option<Secret> {
        let token = self.token.as_ref()?;
        let retry_later = self
            .failed_at
            .is_some_and(|failed| now < failed + RETRY_AFTER);
        (now < token.renew_at || (retry_later && now < token.expires_at))
            .then(|| token.value.clone())
    }

    /// A renewal failed at `now`: the current token while it is valid.
    fn failed(&mut self, now: SystemTime) -> Option<Secret> {
        self.failed_at = Some(now);
        self.token
            .as_ref()
            .filter(|t| now < t.expires_at)
            .map(|t| t.value.clone())
    }
}

/// A GitHub App's installation tokens, shared by every request.
pub struct AppTokens {
    settings: AppSettings,
    client: reqwest::Client,
    state: RwLock<State>,
    /// One renewal at a time; the others wait for it, then use its token.
    renewing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for AppTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppTokens")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The token endpoint's answer (the rest of it, permissions and repositories, is not needed).
#[derive(serde::Deserialize)]
struct Minted {
    token: String,
    expires_at: String,
}

impl AppTokens {
    /// Tokens for `settings`, minted through `client` (which carries the upstream TLS roots and
    /// timeouts). Nothing is minted before a request needs it.
    pub fn new(settings: AppSettings, client: reqwest::Client) -> Self {
        AppTokens {
            settings,
            client,
            state: RwLock::new(State::default()),
            renewing: tokio::sync::Mutex::new(()),
        }
    }

    /// The token to send now: the current one, or a new one when it is due for renewal.
    pub async fn token(&self) -> Result<Secret, Error> {
        if let Some(token) = self.state.read().fresh(SystemTime::now()) {
            return Ok(token);
        }
        let _renewing = self.renewing.lock().await;
        // Renewed (or failed) while this request waited.
        if let Some(token) = self.state.read().fresh(SystemTime::now()) {
            return Ok(token);
        }
        let minted = SystemTime::now();
        match self.mint(minted).await {
            Ok((value, expires_at)) => {
                let token = Token::new(value, minted, expires_at);
                let value = token.value.clone();
                tracing::info!(
                    installation = self.settings.installation_id,
                    expires_at = %humantime::format_rfc3339_seconds(expires_at),
                    "GitHub App installation token minted"
                );
                crate::metrics::app_token("ok");
                *self.state.write() = State {
                    token: Some(token),
                    failed_at: None,
                };
                Ok(value)
            }
            Err(e) => {
                crate::metrics::app_token("failed");
                let current = self.state.write().failed(SystemTime::now());
                tracing::warn!(
                    error = %e,
                    current_token_still_valid = current.is_some(),
                    "renewing the GitHub App installation token failed"
                );
                current.ok_or(e)
            }
        }
    }

    /// Ask the token endpoint for a new installation token: its value and expiry.
    async fn mint(&self, now: SystemTime) -> Result<(Secret, SystemTime), Error> {
        let url = self.settings.token_url();
        let error = |reason: String| Error::Mint {
            url: url.clone(),
            reason,
        };
        let jwt = self
            .settings
            .jwt(now)
            .map_err(|e| error(format!("signing the JWT: {e}")))?;
        let response = self
            .client
            .post(&url)
            .bearer_auth(jwt)
            .header(reqwest::header::ACCEPT, "application/vnd.github+json")
            .header("X-GitHub-Api-Version", "2022-11-28")
            .send()
            .await
            .map_err(|e| error(crate::error_chain(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| error(crate::error_chain(&e)))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.chars().take(300).collect();
            return Err(error(format!("HTTP {status}: {text}")));
        }
        let minted: Minted =
            serde_json::from_slice(&body).map_err(|e| error(format!("not a token answer: {e}")))?;
        let expires_at = humantime::parse_rfc3339_weak(&minted.expires_at)
            .map_err(|e| error(format!("expires_at '{}': {e}", minted.expires_at)))?;
        if minted.token.is_empty() {
            return Err(error("an empty token".into()));
        }
        Ok((Secret::from(minted.token.as_str()), expires_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn a_token_is_renewed_halfway_at_most_five_minutes_before_it_expires() {
        let hour = Token::new(Secret::from("a"), at(0), at(3600));
        assert_eq!(hour.renew_at, at(3300));
        let short = Token::new(Secret::from("b"), at(0), at(4));
        assert_eq!(short.renew_at, at(2));
    }

    #[test]
    fn after_a_failed_renewal_the_valid_token_serves_and_the_next_try_waits() {
        let mut state = State {
            token: Some(Token::new(Secret::from("t"), at(0), at(3600))),
            failed_at: None,
        };
        let t = |s: Option<Secret>| s.map(|s| s.expose().to_owned());
        assert_eq!(t(state.fresh(at(100))), Some("t".into()));
        assert_eq!(t(state.fresh(at(3400))), None, "due for renewal");
        assert_eq!(t(state.failed(at(3400))), Some("t".into()), "still valid");
        assert_eq!(t(state.fresh(at(3405))), Some("t".into()), "no retry yet");
        assert_eq!(t(state.fresh(at(3411))), None, "retry");
        assert_eq!(t(state.failed(at(3600))), None, "expired");
        assert_eq!(t(state.fresh(at(3601))), None);
    }

    #[test]
    fn the_jwt_is_rs256_from_the_app_a_minute_back_for_nine_minutes() {
        let key = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/github-app-test-key.pem"
        );
        let public = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/github-app-test-key.pub.pem"
        );
        let settings = AppSettings::load("4242", Path::new(key), 7, "http://x/").unwrap();
        assert_eq!(
            settings.token_url(),
            "http://x/app/installations/7/access_tokens"
        );
        assert!(!format!("{settings:?}").contains("BEGIN"));
        let now = SystemTime::now();
        let jwt = settings.jwt(now).unwrap();
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(&std::fs::read(public).unwrap()).unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        validation.set_issuer(&["4242"]);
        validation.set_required_spec_claims(&["iss", "iat", "exp"]);
        #[derive(serde::Deserialize)]
        struct Claims {
            iat: u64,
            exp: u64,
        }
        let claims = jsonwebtoken::decode::<Claims>(&jwt, &key, &validation)
            .unwrap()
            .claims;
        let now = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(claims.iat, now - 60);
        assert_eq!(claims.exp, now + 540);
    }

    #[test]
    fn a_key_file_that_is_no_rsa_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key.pem");
        std::fs::write(
            &path,
            "-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = AppSettings::load("1", &path, 1, "https://api.github.com")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("GITHUB_APP_PRIVATE_KEY_FILE"), "{e}");
    }
}
