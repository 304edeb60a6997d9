//! Issue 23, item 3: GitHub App authentication. A test double of GitHub's token endpoint checks
//! each JWT with the App's public key and issues installation tokens that expire within
//! seconds; the test upstream accepts only the latest token. A private clone works, and a fetch
//! after the first token expired works with a second one.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use common::upstream::Upstream;
use common::{assert_fsck, git, git_output, push_commit, request, wait_until, Background, Killed};

const APP_ID: &str = "4242";
const INSTALLATION: u64 = 7;

fn fixture(name: &str) -> String {
    format!("{}/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// What the token endpoint saw.
#[derive(Default)]
struct Seen {
    /// Tokens minted, with their expiry.
    minted: Vec<(String, SystemTime)>,
    /// Why JWTs were refused.
    refused: Vec<String>,
}

#[derive(Clone)]
struct Double {
    upstream: Arc<Upstream>,
    seen: Arc<Mutex<Seen>>,
    /// Answer 500 to every request (a GitHub outage).
    failing: bool,
}

/// `POST /app/installations/{id}/access_tokens`: the JWT must verify with the App's public key,
/// come from the App, have `iat` in the past and `exp` at most 10 minutes after it. The token
/// minted lives 3 seconds, and from now on is the only one the upstream accepts.
async fn access_tokens(
    State(double): State<Double>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
) -> (StatusCode, String) {
    if double.failing {
        return (StatusCode::INTERNAL_SERVER_ERROR, "outage".into());
    }
    let refuse = |why: String| {
        double.seen.lock().unwrap().refused.push(why.clone());
        (StatusCode::UNAUTHORIZED, why)
    };
    if id != INSTALLATION {
        return refuse(format!("installation {id}"));
    }
    let Some(jwt) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return refuse("no bearer JWT".into());
    };
    let public = std::fs::read(fixture("github-app-test-key.pub.pem")).unwrap();
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(&public).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.set_issuer(&[APP_ID]);
    validation.set_required_spec_claims(&["iss", "iat", "exp"]);
    #[derive(serde::Deserialize)]
    struct Claims {
        iat: u64,
        exp: u64,
    }
    let claims = match jsonwebtoken::decode::<Claims>(jwt, &key, &validation) {
        Ok(data) => data.claims,
        Err(e) => return refuse(format!("JWT: {e}")),
    };
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).unwrap().as_secs();
    if claims.iat > secs || claims.exp > claims.iat + 600 {
        return refuse(format!("iat {} exp {} at {secs}", claims.iat, claims.exp));
    }
    let mut seen = double.seen.lock().unwrap();
    let token = format!("ghs_test_{}", seen.minted.len() + 1);
    let expires_at = now + Duration::from_secs(3);
    seen.minted.push((token.clone(), expires_at));
    double
        .upstream
        .require_auth("/private", &format!("x-access-token:{token}"));
    let body = serde_json::json!({
        "token": token,
        "expires_at": humantime::format_rfc3339_seconds(expires_at).to_string(),
        "permissions": {"contents": "read"},
    });
    (StatusCode::CREATED, body.to_string())
}

/// The token endpoint, in front of `upstream`.
fn start_double(upstream: Arc<Upstream>, failing: bool) -> (Background, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let app = axum::Router::new()
        .route(
            "/app/installations/{id}/access_tokens",
            axum::routing::post(access_tokens),
        )
        .with_state(Double {
            upstream,
            seen: Arc::clone(&seen),
            failing,
        });
    (Background::serve(app), seen)
}

/// The binary with the App's settings against the double at `api`, its log in `log`; killed
/// when dropped. Its address.
fn proxy(up: &Upstream, api: SocketAddr, mirror: &Path, log: &Path) -> (Killed, SocketAddr) {
    let child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ALLOWED_UPSTREAMS", up.allowed())
        .env("AUTH_MODE", "static")
        .env("STATIC_TOKEN_HOSTS", up.allowed())
        .env("GITHUB_APP_ID", APP_ID)
        .env(
            "GITHUB_APP_PRIVATE_KEY_FILE",
            fixture("github-app-test-key.pem"),
        )
        .env("GITHUB_APP_INSTALLATION_ID", INSTALLATION.to_string())
        .env("GITHUB_API_URL", format!("http://{api}"))
        .env("SYNC_STALE_AFTER", "10ms")
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .unwrap();
    let child = Killed(child);
    let mut addr = None;
    wait_until("the server listens", || {
        addr = std::fs::read_to_string(log).unwrap().lines().find_map(|l| {
            let rest = l.split("addr=").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        });
        addr.is_some()
    });
    (child, addr.unwrap())
}

#[test]
fn private_clones_work_with_app_tokens_across_their_expiry() {
    let up = Arc::new(Upstream::start());
    let dir = up.add_fixture("private/r", "basic");
    up.require_auth("/private", "x-access-token:none-minted-yet");
    let (double, seen) = start_double(Arc::clone(&up), false);
    let mirror = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let (_proxy, addr) = proxy(&up, double.addr, mirror.path(), log.path());
    let url = format!("http://{addr}/{}/private/r", up.segment());

    let work = tempfile::tempdir().unwrap();
    let out = git_output(work.path(), &["clone", "--bare", &url, "c.git"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let clone = work.path().join("c.git");
    assert_fsck(&clone);
    let first = seen.lock().unwrap().minted[0].clone();

    // Once the first token expired (the upstream no longer takes it either), a fetch syncs
    // the mirror with a second one.
    wait_until("the first token expires", || SystemTime::now() > first.1);
    let branch = git(&dir, &["symbolic-ref", "--short", "HEAD"]);
    let pushed = push_commit(&dir, branch.trim());
    git(
        &clone,
        &[
            "fetch",
            "-q",
            &url,
            &format!("+{}:refs/heads/x", branch.trim()),
        ],
    );
    assert_eq!(git(&clone, &["rev-parse", "refs/heads/x"]).trim(), pushed);
    assert_fsck(&clone);

    let seen = seen.lock().unwrap();
    assert!(seen.minted.len() >= 2, "{:?}", seen.minted);
    assert_ne!(seen.minted[0].0, seen.minted[1].0);
    assert!(seen.refused.is_empty(), "refused JWTs: {:?}", seen.refused);
    let logged = std::fs::read_to_string(log.path()).unwrap();
    for (token, _) in &seen.minted {
        assert!(!logged.contains(token.as_str()), "the log shows {token}");
    }
    let metrics = request(addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("smart_git_proxy_github_app_tokens_total{result=\"failed\"} 0"),
        "{metrics}"
    );
}

/// A token endpoint that fails: logged, counted, and, without a valid token, the request is
/// answered 502.
#[test]
fn a_failed_mint_is_logged_counted_and_answered() {
    let up = Arc::new(Upstream::start());
    up.add_fixture("private/r", "basic");
    up.require_auth("/private", "x-access-token:none-minted");
    let (double, _seen) = start_double(Arc::clone(&up), true);
    let mirror = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let (_proxy, addr) = proxy(&up, double.addr, mirror.path(), log.path());
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/{}/private/r", up.segment());
    let out = git_output(work.path(), &["clone", "--bare", &url, "c.git"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the proxy has no upstream token"),
        "{stderr}"
    );
    let logged = std::fs::read_to_string(log.path()).unwrap();
    assert!(
        logged.contains("renewing the GitHub App installation token failed"),
        "{logged}"
    );
    let metrics = request(addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("smart_git_proxy_github_app_tokens_total{result=\"failed\"} 1"),
        "{metrics}"
    );
}

#[test]
fn app_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let run = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", dir.path().join("m"))
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("AUTH_MODE", "static")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{env:?}");
        String::from_utf8_lossy(&out.stderr).trim().to_owned()
    };
    let key = fixture("github-app-test-key.pem");
    let app = [
        ("GITHUB_APP_ID", APP_ID),
        ("GITHUB_APP_PRIVATE_KEY_FILE", key.as_str()),
        ("GITHUB_APP_INSTALLATION_ID", "7"),
    ];
    let both = run(&[&app[..], &[("STATIC_TOKEN", "ghp_x")]].concat());
    assert!(
        both.starts_with("error: STATIC_TOKEN and GITHUB_APP_ID are both set"),
        "{both}"
    );
    let partial = run(&app[..2]);
    assert_eq!(
        partial,
        "error: a GitHub App needs GITHUB_APP_INSTALLATION_ID too"
    );
    let public = fixture("github-app-test-key.pub.pem");
    let bad_key = run(&[
        app[0],
        ("GITHUB_APP_PRIVATE_KEY_FILE", public.as_str()),
        app[2],
    ]);
    assert!(
        bad_key.starts_with("error: GITHUB_APP_PRIVATE_KEY_FILE"),
        "{bad_key}"
    );
}
