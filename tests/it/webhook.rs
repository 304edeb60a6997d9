//! Push-driven freshness: signed GitHub webhooks and GitLab token webhooks sync a mirror at
//! once (long before `SYNC_STALE_AFTER`), the warm-up API creates or syncs one with
//! `ADMIN_TOKEN`, and with `BALANCER_URL` a webhook is forwarded to the node holding the
//! mirror. The upstream is `git http-backend`.

use crate::common;

use common::upstream::Upstream;
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "hook-s3cret";
const ADMIN: &str = "admin-t0ken";

/// A proxy in front of `up` that syncs only when told (`SYNC_STALE_AFTER` is an hour).
fn proxy(up: &Upstream, adjust: impl FnOnce(&mut smart_git_proxy::config::Config)) -> Server {
    Server::in_front_of(up, move |c| {
        c.sync_stale_after = HOUR.into();
        c.webhook_secret = Some(SECRET.into());
        c.admin_token = Some(ADMIN.into());
        adjust(c);
    })
}

fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn push_payload(clone_url: &str) -> Vec<u8> {
    serde_json::json!({
        "ref": "refs/heads/main",
        "repository": { "full_name": "o/basic", "clone_url": clone_url },
    })
    .to_string()
    .into_bytes()
}

/// A GitHub delivery of `event` with `body`, signed with `secret` (unsigned when `None`).
fn github(server: &Server, event: &str, body: &[u8], secret: Option<&str>) -> Reply {
    let sig = secret.map(|s| signature(s, body));
    let mut headers = vec![
        ("X-GitHub-Event", event),
        ("Content-Type", "application/json"),
    ];
    if let Some(sig) = &sig {
        headers.push(("X-Hub-Signature-256", sig));
    }
    request(server.addr, "POST", "/webhooks/github", &headers, body)
}

fn mirror_dir(server: &Server, up: &Upstream, name: &str) -> std::path::PathBuf {
    server
        .mirror
        .path()
        .join(up.segment())
        .join(format!("{name}.git"))
}

fn head_of(git_dir: &std::path::Path) -> String {
    git(git_dir, &["rev-parse", "refs/heads/main"])
        .trim()
        .to_owned()
}

fn clone_head(url: &str) -> String {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["clone", "-q", "--mirror", url, "c"]);
    assert_fsck(&work.path().join("c"));
    head_of(&work.path().join("c"))
}

#[test]
fn a_signed_push_webhook_syncs_the_mirror_at_once() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, |_| {});
    let url = server.url_for(&up.segment(), "o/basic");
    let before = clone_head(&url);
    let pushed = push_commit(&upstream_dir, "main");
    assert_eq!(
        clone_head(&url),
        before,
        "without a notice, the mirror waits for SYNC_STALE_AFTER"
    );
    let clone_url = format!("http://{}/o/basic.git", up.segment());
    let r = github(&server, "push", &push_payload(&clone_url), Some(SECRET));
    assert_eq!(r.status, 202, "{}", r.text());
    let mirror = mirror_dir(&server, &up, "o/basic");
    wait_until("the webhook's sync", || head_of(&mirror) == pushed);
    assert_eq!(clone_head(&url), pushed);
    let metrics = request(server.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("smart_git_proxy_webhook_syncs_total{outcome=\"sync\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("# HELP smart_git_proxy_webhook_syncs_total"));
}

#[test]
fn bad_signatures_get_401_and_sync_nothing() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, |_| {});
    let url = server.url_for(&up.segment(), "o/basic");
    let before = clone_head(&url);
    push_commit(&upstream_dir, "main");
    let asked = up.log().len();
    let body = push_payload(&format!("http://{}/o/basic.git", up.segment()));
    for secret in [Some("wrong"), None] {
        let r = github(&server, "push", &body, secret);
        assert_eq!(r.status, 401, "{secret:?}: {}", r.text());
        assert!(!r.text().contains(SECRET));
    }
    // A valid signature of another body does not vouch for this one.
    let sig = signature(SECRET, b"{}");
    let r = request(
        server.addr,
        "POST",
        "/webhooks/github",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &body,
    );
    assert_eq!(r.status, 401);
    let r = request(
        server.addr,
        "POST",
        "/webhooks/gitlab",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "wrong")],
        b"{}",
    );
    assert_eq!(r.status, 401);
    assert_eq!(up.log().len(), asked, "nothing reached the upstream");
    assert_eq!(head_of(&mirror_dir(&server, &up, "o/basic")), before);
}

#[test]
fn notices_for_other_repositories_are_acknowledged_and_ignored() {
    let up = Upstream::start();
    up.add_fixture("o/basic", "basic");
    let server = proxy(&up, |_| {});
    let r = github(&server, "ping", b"{\"zen\":\"hi\"}", Some(SECRET));
    assert_eq!(r.status, 200, "{}", r.text());
    for clone_url in [
        // Not mirrored here: no mirror is created.
        format!("http://{}/o/basic.git", up.segment()),
        // Not allowlisted.
        "https://github.com/o/basic.git".to_owned(),
        format!("http://{}/../etc.git", up.segment()),
    ] {
        let r = github(&server, "push", &push_payload(&clone_url), Some(SECRET));
        assert_eq!(r.status, 202, "{clone_url}: {}", r.text());
        assert!(r.text().starts_with("ignored"), "{}", r.text());
    }
    let r = github(&server, "issues", b"{}", Some(SECRET));
    assert_eq!(r.status, 202);
    let r = github(&server, "push", b"[1, 2]", Some(SECRET));
    assert_eq!(r.status, 400);
    assert!(up.log().is_empty(), "{:?}", up.log());
    assert!(!mirror_dir(&server, &up, "o/basic").exists());

    // Without WEBHOOK_SECRET the endpoints do not exist.
    let off = Server::start_with(|c| c.webhook_secret = None);
    let r = github(&off, "push", b"{}", Some(SECRET));
    assert_eq!(r.status, 404);
}

#[test]
fn a_gitlab_push_hook_with_the_token_syncs_the_mirror() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("g/sub/basic", "basic");
    let server = proxy(&up, |_| {});
    let url = server.url_for(&up.segment(), "g/sub/basic");
    clone_head(&url);
    let pushed = push_commit(&upstream_dir, "main");
    let body = serde_json::json!({
        "object_kind": "push",
        "project": { "git_http_url": format!("http://{}/g/sub/basic.git", up.segment()) },
    })
    .to_string();
    let r = request(
        server.addr,
        "POST",
        "/webhooks/gitlab",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", SECRET)],
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let mirror = mirror_dir(&server, &up, "g/sub/basic");
    wait_until("the webhook's sync", || head_of(&mirror) == pushed);
    let tag = |git_dir: &std::path::Path| git(git_dir, &["tag", "--list", "v-pushed"]);
    git(&upstream_dir, &["tag", "v-pushed", &pushed]);
    let r = request(
        server.addr,
        "POST",
        "/webhooks/gitlab",
        &[
            ("X-Gitlab-Event", "Tag Push Hook"),
            ("X-Gitlab-Token", SECRET),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 202, "{}", r.text());
    wait_until("the tag push's sync", || !tag(&mirror).is_empty());
}

#[test]
fn webhook_bodies_are_bounded() {
    let up = Upstream::start();
    let server = proxy(&up, |c| {
        c.max_request_body = bytesize::ByteSize::kib(1);
        c.max_buffered_bodies = bytesize::ByteSize::kib(64);
    });
    let big = vec![b' '; 4096];
    let r = github(&server, "push", &big, Some(SECRET));
    assert_eq!(r.status, 413, "{}", r.text());
    // GitLab's token is checked first: a stranger's body is not even read.
    let r = request(
        server.addr,
        "POST",
        "/webhooks/gitlab",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "wrong")],
        &big,
    );
    assert_eq!(r.status, 401, "{}", r.text());
}

fn warm_up(server: &Server, name: &str, token: Option<&str>) -> Reply {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("Authorization", b)])
        .unwrap_or_default();
    request(
        server.addr,
        "POST",
        &format!("/api/v1/mirrors/{name}/sync"),
        &headers,
        b"",
    )
}

#[test]
fn the_warm_up_api_creates_and_syncs_mirrors_with_the_admin_token() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, |_| {});
    let name = format!("{}/o/basic", up.segment());
    for token in [None, Some("wrong")] {
        let r = warm_up(&server, &name, token);
        assert_eq!(r.status, 401, "{token:?}");
    }
    assert!(up.log().is_empty());
    let r = warm_up(&server, &name, Some(ADMIN));
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.text().contains("\"status\":\"clone\""), "{}", r.text());
    let mirror = mirror_dir(&server, &up, "o/basic");
    assert_eq!(refs(&mirror), refs(&upstream_dir));
    // Synchronous: the push is in the mirror when the answer comes.
    let pushed = push_commit(&upstream_dir, "main");
    let r = warm_up(&server, &name, Some(ADMIN));
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"status\":\"sync\""), "{}", r.text());
    assert_eq!(head_of(&mirror), pushed);
    let r = warm_up(&server, "github.com.evil/o/r", Some(ADMIN));
    assert_eq!(r.status, 403, "{}", r.text());
    for bad in ["..", "o/%2e%2e", ".hidden"] {
        let r = warm_up(&server, &format!("{}/{bad}", up.segment()), Some(ADMIN));
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let r = warm_up(&server, &format!("{}/o/missing", up.segment()), Some(ADMIN));
    assert_eq!(r.status, 404, "{}", r.text());

    // Without ADMIN_TOKEN the API does not exist.
    let off = Server::start_with(|c| c.admin_token = None);
    assert_eq!(warm_up(&off, &name, Some(ADMIN)).status, 404);
}

#[test]
fn with_balancer_url_a_webhook_is_forwarded_to_the_node_holding_the_mirror() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    // Nothing listens there: a node that forwarded again would fail.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    // B holds the mirror; A received the webhook and knows B only as the balancer.
    let b_balancer = nowhere.clone();
    let b = proxy(&up, |c| c.balancer_url = Some(b_balancer));
    let balancer = format!("http://{}", b.addr);
    let a = proxy(&up, |c| c.balancer_url = Some(balancer));
    let url = b.url_for(&up.segment(), "o/basic");
    clone_head(&url);
    let pushed = push_commit(&upstream_dir, "main");
    let clone_url = format!("http://{}/o/basic.git", up.segment());
    let r = github(&a, "push", &push_payload(&clone_url), Some(SECRET));
    assert_eq!(r.status, 202, "{}", r.text());
    let mirror = mirror_dir(&b, &up, "o/basic");
    wait_until("the forwarded sync", || head_of(&mirror) == pushed);
    assert!(
        !mirror_dir(&a, &up, "o/basic").exists(),
        "the receiving node mirrors nothing"
    );
    // A repository no node mirrors is not created by a forwarded notice.
    let other = format!("http://{}/o/other.git", up.segment());
    up.add_fixture("o/other", "basic");
    let r = github(&a, "push", &push_payload(&other), Some(SECRET));
    assert_eq!(r.status, 202, "{}", r.text());
    assert!(!mirror_dir(&b, &up, "o/other").exists());
    let metrics = request(a.addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("smart_git_proxy_webhook_forwards_total{result=\"ok\"}"),
        "{metrics}"
    );
    // A balancer that cannot be reached: the sender sees a failed delivery.
    let c = proxy(&up, |c| c.balancer_url = Some(nowhere));
    let r = github(&c, "push", &push_payload(&clone_url), Some(SECRET));
    assert_eq!(r.status, 502, "{}", r.text());
}

#[test]
fn secrets_are_never_logged() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let up = Upstream::start();
    up.add_fixture("o/basic", "basic");
    let mirror = tempfile::tempdir().unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror.path())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("LOG_LEVEL", "trace")
        .env("ALLOWED_UPSTREAMS", up.allowed())
        .env("WEBHOOK_SECRET", SECRET)
        .env("ADMIN_TOKEN", ADMIN)
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .unwrap();
    let child = Killed(child);
    let mut addr = None;
    wait_until("the server listens", || {
        addr = BufReader::new(log.reopen().unwrap())
            .lines()
            .map_while(Result::ok)
            .find_map(|l| {
                let rest = l.split("addr=").nth(1)?;
                rest.split_whitespace().next().map(str::to_owned)
            });
        addr.is_some()
    });
    let addr: std::net::SocketAddr = addr.unwrap().parse().unwrap();
    let name = format!("{}/o/basic", up.segment());
    for token in ["wrong", ADMIN, ADMIN] {
        request(
            addr,
            "POST",
            &format!("/api/v1/mirrors/{name}/sync"),
            &[("Authorization", &format!("Bearer {token}"))],
            b"",
        );
    }
    let body = push_payload(&format!("http://{}/o/basic.git", up.segment()));
    let bad = signature("wrong", &body);
    let good = signature(SECRET, &body);
    for sig in [bad.as_str(), good.as_str()] {
        request(
            addr,
            "POST",
            "/webhooks/github",
            &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", sig)],
            &body,
        );
    }
    request(
        addr,
        "POST",
        "/webhooks/gitlab",
        &[("X-Gitlab-Event", "Push Hook"), ("X-Gitlab-Token", "wrong")],
        b"{}",
    );
    let read = || std::fs::read_to_string(log.path()).unwrap();
    wait_until("the webhook's sync is logged", || {
        read().contains("reason=\"webhook\"")
    });
    drop(child);
    let logged = read();
    assert!(logged.contains("webhook refused"), "{logged}");
    assert!(logged.contains("reason=\"warm-up\""), "{logged}");
    for secret in [SECRET, ADMIN, good.as_str()] {
        assert!(!logged.contains(secret), "{secret} in the log");
    }
}

/// A GitHub delivery with its id, signed.
fn delivery(server: &Server, id: &str, body: &[u8]) -> Reply {
    let sig = signature(SECRET, body);
    request(
        server.addr,
        "POST",
        "/webhooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", id),
            ("X-Hub-Signature-256", &sig),
        ],
        body,
    )
}

/// The value of the counter line that starts with `series` in `/metrics` (0 when absent).
fn counter(server: &Server, series: &str) -> u64 {
    request(server.addr, "GET", "/metrics", &[], b"")
        .text()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Issue 19: a delivery that comes again (GitHub's redelivery, or a replay of a captured one)
/// within the window costs nothing: no sync, no upstream request; GitLab's likewise. A new id
/// is a new delivery.
#[test]
fn replayed_deliveries_cost_nothing() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let server = proxy(&up, |_| {});
    let url = server.url_for(&up.segment(), "o/basic");
    clone_head(&url);
    let mirror = mirror_dir(&server, &up, "o/basic");
    let pushed = push_commit(&upstream_dir, "main");
    let body = push_payload(&format!("http://{}/o/basic.git", up.segment()));
    let r = delivery(&server, "d-1", &body);
    assert_eq!(r.status, 202, "{}", r.text());
    // The refs move after the fetch, the sync's last upstream request.
    wait_until("the delivery's sync", || head_of(&mirror) == pushed);
    let asked = up.log().len();
    for _ in 0..20 {
        let r = delivery(&server, "d-1", &body);
        assert_eq!(r.status, 202, "{}", r.text());
        assert_eq!(r.text(), "ignored: delivery already received\n");
    }
    let gitlab = |id: &str| {
        let body = serde_json::json!({
            "project": { "git_http_url": format!("http://{}/o/basic.git", up.segment()) },
        })
        .to_string();
        request(
            server.addr,
            "POST",
            "/webhooks/gitlab",
            &[
                ("X-Gitlab-Event", "Push Hook"),
                ("X-Gitlab-Token", SECRET),
                ("X-Gitlab-Event-UUID", id),
            ],
            body.as_bytes(),
        )
        .text()
    };
    assert!(gitlab("g-1").starts_with("syncing"));
    // Nothing moved upstream: its sync is one ref listing.
    wait_until("the GitLab delivery's sync", || up.log().len() > asked);
    let asked_after_gitlab = up.log().len();
    assert!(asked_after_gitlab > asked);
    for _ in 0..5 {
        assert_eq!(gitlab("g-1"), "ignored: delivery already received\n");
    }
    assert_eq!(
        up.log().len(),
        asked_after_gitlab,
        "the replays reached nobody"
    );
    // Only this test of the binary (whose tests share one metrics registry) sends replays.
    assert_eq!(
        counter(
            &server,
            "smart_git_proxy_webhook_syncs_total{outcome=\"duplicate\"}"
        ),
        25
    );
    // The same id from the other sender, and a new id, are new deliveries.
    assert!(gitlab("d-1").starts_with("syncing"));
    let r = delivery(&server, "d-2", &body);
    assert!(r.text().starts_with("syncing"), "{}", r.text());
}

/// Issue 19: only a node that says it has no mirror makes a forwarded 404 a delivery; a 404 of
/// a balancer that lacks the route is a failure, which the sender can redeliver (the delivery
/// is not remembered as received).
#[test]
fn a_balancer_404_is_not_a_delivery() {
    let up = Upstream::start();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&asked);
    let balancer = Background::serve(axum::Router::new().fallback(move || {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { (axum::http::StatusCode::NOT_FOUND, "no route\n") }
    }));
    let url = format!("http://{}", balancer.addr);
    let a = proxy(&up, |c| c.balancer_url = Some(url));
    let body = push_payload(&format!("http://{}/o/basic.git", up.segment()));
    for _ in 0..2 {
        let r = delivery(&a, "d-1", &body);
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(
            r.text(),
            "forwarding to BALANCER_URL failed: HTTP 404 Not Found\n"
        );
    }
    assert_eq!(
        asked.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the redelivery was forwarded again"
    );
}

/// A GitHub delivery without a well-formed `X-Hub-Signature-256` cannot be authentic: it is
/// refused before its body is read (here, a body over the limit is not even looked at).
#[test]
fn unsigned_github_deliveries_are_refused_before_their_body_is_read() {
    let server = Server::start_with(|c| {
        c.webhook_secret = Some("s".into());
        c.max_request_body = bytesize::ByteSize::kib(1);
        c.max_buffered_bodies = bytesize::ByteSize::kib(64);
    });
    let big = vec![b' '; 4096];
    for signature in [None, Some("sha1=00"), Some("sha256=zz"), Some("sha256=")] {
        let mut headers = vec![("X-GitHub-Event", "push")];
        headers.extend(signature.map(|s| ("X-Hub-Signature-256", s)));
        let r = request(server.addr, "POST", "/webhooks/github", &headers, &big);
        assert_eq!(r.status, 401, "{signature:?}: {}", r.text());
    }
    // A well-formed signature gets the body read (and refused as too large).
    let sig = format!("sha256={}", "0".repeat(64));
    let r = request(
        server.addr,
        "POST",
        "/webhooks/github",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &sig)],
        &big,
    );
    assert_eq!(r.status, 413, "{}", r.text());
}
