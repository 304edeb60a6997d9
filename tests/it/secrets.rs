//! Issue 23, item 4: secrets from files (`STATIC_TOKEN_FILE`, `ADMIN_TOKEN_FILE`,
//! `WEBHOOK_SECRET_FILE`), for systemd's `LoadCredential=` and Kubernetes secrets; a secret is
//! never printed.

use crate::common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use common::upstream::Upstream;
use common::{assert_fsck, git_output, request, wait_until, Killed};

const TOKEN: &str = "ghs_file-token-4f9a";
const ADMIN: &str = "admin-from-file-77c1";
const HOOK: &str = "hook-from-file-29de";

/// `secret` written to a new file under `dir` as `echo` would: with a trailing newline.
fn secret_file(dir: &Path, name: &str, secret: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    path.display().to_string()
}

#[test]
fn a_secret_set_both_ways_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    for key in ["STATIC_TOKEN", "ADMIN_TOKEN", "WEBHOOK_SECRET"] {
        let file = secret_file(dir.path(), "s", "x");
        let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", dir.path().join("m"))
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("AUTH_MODE", "static")
            .env("STATIC_TOKEN", "plain")
            .env("ADMIN_TOKEN", "plain")
            .env("WEBHOOK_SECRET", "plain")
            .env(format!("{key}_FILE"), &file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{key}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim(),
            format!("error: {key} and {key}_FILE are both set: keep one")
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", dir.path().join("m"))
        .env("ADMIN_TOKEN_FILE", dir.path().join("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ADMIN_TOKEN_FILE '") && stderr.contains("missing"),
        "{stderr}"
    );
}

#[test]
fn a_static_token_file_without_auth_mode_static_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", dir.path().join("m"))
        .env("STATIC_TOKEN_FILE", secret_file(dir.path(), "t", TOKEN))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("STATIC_TOKEN_FILE does nothing with AUTH_MODE=none"),
        "{stderr}"
    );
}

/// The server with every secret from a file: the token reaches the upstream (trailing newline
/// left out), the admin API and the webhooks answer to the secrets, and neither `--help` nor
/// the log shows any of them.
#[test]
fn secrets_from_files_work_and_are_never_printed() {
    let up = Upstream::start();
    up.add_fixture("private/r", "basic");
    up.require_auth("/private", &format!("x-access-token:{TOKEN}"));
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("ALLOWED_UPSTREAMS", up.allowed()),
        ("AUTH_MODE", "static".into()),
        ("STATIC_TOKEN_HOSTS", up.allowed()),
        (
            "STATIC_TOKEN_FILE",
            secret_file(dir.path(), "static-token", TOKEN),
        ),
        (
            "ADMIN_TOKEN_FILE",
            secret_file(dir.path(), "admin-token", ADMIN),
        ),
        (
            "WEBHOOK_SECRET_FILE",
            secret_file(dir.path(), "webhook-secret", HOOK),
        ),
        ("LOG_LEVEL", "debug".into()),
    ];

    let help = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .arg("--help")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("STATIC_TOKEN_FILE"), "{help}");
    for secret in [TOKEN, ADMIN, HOOK] {
        assert!(!help.contains(secret), "--help shows {secret}");
    }

    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", dir.path().join("m"))
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let _child = Killed(child);
    let read = || std::fs::read_to_string(log.path()).unwrap();
    let mut addr = None;
    wait_until("the server listens", || {
        addr = read().lines().find_map(|l| {
            let rest = l.split("addr=").nth(1)?;
            rest.split_whitespace().next()?.parse::<SocketAddr>().ok()
        });
        addr.is_some()
    });
    let addr = addr.unwrap();

    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/{}/private/r", up.segment());
    let out = git_output(work.path(), &["clone", "--bare", &url, "c.git"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_fsck(&work.path().join("c.git"));

    let bearer = format!("Bearer {ADMIN}");
    let admin = request(
        addr,
        "GET",
        "/api/v1/mirrors",
        &[("Authorization", &bearer)],
        b"",
    );
    assert_eq!(admin.status, 200, "{}", admin.text());
    let wrong = request(
        addr,
        "GET",
        "/api/v1/mirrors",
        &[("Authorization", "Bearer x")],
        b"",
    );
    assert_eq!(wrong.status, 401);

    // The GitLab webhook checks its token as given: the right one gets past the check (a body
    // that is no push is then a 400), a wrong one does not.
    let hook = |token: &str| {
        request(
            addr,
            "POST",
            "/webhooks/gitlab",
            &[("X-Gitlab-Token", token), ("X-Gitlab-Event", "Push Hook")],
            b"{}",
        )
        .status
    };
    assert_eq!(hook("wrong"), 401);
    assert_ne!(hook(HOOK), 401);
    assert_ne!(hook(HOOK), 404);

    let logged = read();
    assert!(logged.contains("listening"), "{logged}");
    for secret in [TOKEN, ADMIN, HOOK] {
        assert!(
            !logged.contains(secret),
            "the log shows {secret}:\n{logged}"
        );
    }
}

/// An empty `ADMIN_TOKEN` or `WEBHOOK_SECRET` (as `ADMIN_TOKEN=` in an environment file
/// leaves it) would turn the admin API or the webhooks on with the empty string as their
/// secret, which any request without credentials presents: the server refuses to start.
#[test]
fn empty_secrets_are_refused_at_start() {
    let mirror = tempfile::tempdir().unwrap();
    for key in ["ADMIN_TOKEN", "WEBHOOK_SECRET"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", mirror.path())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
            .env(key, "")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A server that starts would serve until killed.
        let mut exited = None;
        let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until("the server to refuse to start", || {
                exited = child.try_wait().unwrap();
                exited.is_some()
            })
        }));
        if waited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{key}: the server started with an empty secret");
        }
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(exited.is_some_and(|s| !s.success()), "{key}: {stderr}");
        assert!(stderr.contains(&format!("{key} is empty")), "{stderr}");
    }
}
