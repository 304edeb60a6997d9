//! The auth policy: where a mirror is fetched from and which credentials may travel there —
//! none, the proxy's static token, or the client's own. (Which client credentials the upstream
//! accepts is the mirror store's business: [`crate::mirror`].)

use base64::Engine as _;

use super::AppState;
use crate::config::AuthMode;
use crate::mirror;
use crate::upstream::Upstream;

/// Where the mirrors of `upstream` are fetched from: the upstream itself, or with
/// `PARENT_PROXY` (`parent`) the parent proxy, which serves them under the same
/// `{host}/{path}` names.
pub(super) fn fetch_source(parent: Option<&str>, upstream: &Upstream) -> Upstream {
    match parent {
        Some(parent) => Upstream {
            segment: upstream.segment.clone(),
            base_url: format!("{parent}/{}", upstream.segment),
        },
        None => upstream.clone(),
    }
}

/// What may reach `source` when fetching a mirror: nothing, the static token (`STATIC_TOKEN`
/// or the GitHub App's; only where it may go: judged on the URL it would travel to, a parent
/// proxy's included), or the client's own credentials (pass-through, which a parent proxy
/// passes on in turn). Fails only when the GitHub App has no valid token.
pub(super) async fn upstream_credentials(
    state: &AppState,
    source: &Upstream,
    client_authorization: Option<&str>,
) -> Result<mirror::Credentials, crate::upstream::credentials::Error> {
    let config = &state.config;
    Ok(match config.auth_mode {
        AuthMode::None => mirror::Credentials::None,
        AuthMode::Static if !config.lends_static_token_to(source) => mirror::Credentials::None,
        AuthMode::Static => {
            let token = match &state.app_tokens {
                Some(app) => Some(app.token().await?),
                None => config.static_token.clone(),
            };
            token.map_or(mirror::Credentials::None, |t| {
                mirror::Credentials::Proxy(static_token_header(t.expose()).as_str().into())
            })
        }
        AuthMode::PassThrough => {
            mirror::Credentials::Client(client_authorization.map(crate::config::Secret::from))
        }
    })
}

/// The `Authorization` value for `STATIC_TOKEN`: basic auth with the token as password, which
/// GitHub (`x-access-token`), GitLab and Gitea accept for tokens.
pub fn static_token_header(token: &str) -> String {
    let pair = format!("x-access-token:{token}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_token_is_basic_auth() {
        assert_eq!(static_token_header("t0k"), "Basic eC1hY2Nlc3MtdG9rZW46dDBr");
    }
}
