//! The proxy's own credentials: the header its static token is sent upstream as. (Which client
//! credentials the upstream accepts is the mirror store's business: [`crate::mirror`].)

use base64::Engine as _;

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
