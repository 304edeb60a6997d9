//! Proxy chaining (`PARENT_PROXY`): an edge proxy mirrors from a parent proxy, which mirrors
//! from the upstream (`git http-backend`). One upstream fetch serves every edge; credentials
//! and privacy pass through the chain; want-miss and stale-serving work across it.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::upstream::{Mode, Upstream};
use common::*;
use smart_git_proxy::config::AuthMode;

/// A proxy in front of `up`, or in front of `parent` when given.
fn proxy(up: &Upstream, parent: Option<&Server>, mode: AuthMode, stale_after: Duration) -> Server {
    let parent = parent.map(|p| format!("http://{}/", p.addr));
    Server::in_front_of(up, move |c| {
        c.parent_proxy = parent;
        c.auth_mode = mode;
        c.sync_stale_after = stale_after.into();
        c.auth_cache_ttl = Duration::from_millis(1).into();
    })
}

/// Fetches from the upstream: upload-pack requests that want objects.
fn upstream_fetches(up: &Upstream) -> usize {
    up.log()
        .iter()
        .filter(|l| l.path.ends_with("/git-upload-pack"))
        .filter(|l| String::from_utf8_lossy(&l.body).contains("want "))
        .count()
}

#[test]
fn cold_clones_through_two_edges_fetch_from_the_upstream_once() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let regional = proxy(&up, None, AuthMode::None, HOUR);
    let edges = [
        proxy(&up, Some(&regional), AuthMode::None, HOUR),
        proxy(&up, Some(&regional), AuthMode::None, HOUR),
    ];
    for (i, edge) in edges.iter().enumerate() {
        for v in PROTOCOLS {
            let work = tempfile::tempdir().unwrap();
            let url = edge.url_for(&up.segment(), "o/basic");
            git(
                work.path(),
                &args(&["clone", "-q", "--mirror", &url, "c"], &proto(v)),
            );
            assert_fsck(&work.path().join("c"));
            assert_eq!(
                refs(&work.path().join("c")),
                refs(&upstream_dir),
                "edge {i}, v{v}"
            );
        }
        // Mirror paths stay `{host}/{path}` at every tier.
        let mirror = edge.mirror.path().join(up.segment()).join("o/basic.git");
        assert_eq!(refs(&mirror), refs(&upstream_dir));
    }
    assert_eq!(
        refs(
            &regional
                .mirror
                .path()
                .join(up.segment())
                .join("o/basic.git")
        ),
        refs(&upstream_dir)
    );
    assert_eq!(
        upstream_fetches(&up),
        1,
        "{:?}",
        up.log().iter().map(|l| &l.path).collect::<Vec<_>>()
    );
    // The allowlist still applies at the edge.
    let r = request(
        edges[0].addr,
        "GET",
        "/github.com/o/r/info/refs?service=git-upload-pack",
        &[],
        b"",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let metrics = request(edges[0].addr, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains("smart_git_proxy_parent_fetches_total{status=\"clone\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("# HELP smart_git_proxy_parent_fetches_total"));
}

fn basic(user_password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

fn info_refs(server: &Server, up: &Upstream, name: &str, auth: Option<&str>) -> Reply {
    let mut headers = vec![];
    if let Some(a) = auth {
        headers.push(("Authorization", a));
    }
    request(
        server.addr,
        "GET",
        &format!("/{}/{name}/info/refs?service=git-upload-pack", up.segment()),
        &headers,
        b"",
    )
}

#[test]
fn a_private_repository_through_the_chain_needs_credentials_at_the_edge() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let regional = proxy(&up, None, AuthMode::PassThrough, HOUR);
    let edge = proxy(&up, Some(&regional), AuthMode::PassThrough, HOUR);
    let other_edge = proxy(&up, Some(&regional), AuthMode::PassThrough, HOUR);

    // Cold and anonymous: refused at the edge, with a challenge git answers.
    let r = info_refs(&edge, &up, "private/repo", None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.header("www-authenticate").is_some());

    // The client's credentials reach the real upstream through both tiers.
    let with_creds =
        edge.url_for(&up.segment(), "private/repo")
            .replacen("http://", "http://alice:secret@", 1);
    let (_work, clone) = clone_checked(&with_creds);
    assert_eq!(refs(&clone), refs(&upstream_dir));

    // Both tiers now hold a private mirror, served only with accepted credentials.
    let right = basic("alice:secret");
    let wrong = basic("alice:guess");
    for server in [&edge, &regional, &other_edge] {
        for (auth, status) in [
            (None, 401),
            (Some(wrong.as_str()), 401),
            (Some(&right), 200),
        ] {
            let r = info_refs(server, &up, "private/repo", auth);
            assert_eq!(r.status, status, "{auth:?}: {}", r.text());
        }
    }
    let anonymous = tempfile::tempdir().unwrap();
    let out = git_output(
        anonymous.path(),
        &[
            "clone",
            &edge.url_for(&up.segment(), "private/repo"),
            "anon",
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "an anonymous clone at the edge fails"
    );
}

#[test]
fn a_want_miss_at_the_edge_reaches_the_upstream_through_the_parent() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let regional = proxy(&up, None, AuthMode::None, HOUR);
    let edge = proxy(&up, Some(&regional), AuthMode::None, HOUR);
    let url = edge.url_for(&up.segment(), "o/basic");
    clone_checked(&url);
    // Pushed after both tiers synced, with SYNC_STALE_AFTER an hour away at both.
    let sha = push_commit(&upstream_dir, "main");
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &["init", "-q"]);
        let out = git_output(work.path(), &args(&["fetch", &url, &sha], &proto(v)), &[]);
        assert!(
            out.status.success(),
            "v{v}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_fsck(&work.path().join(".git"));
        git(work.path(), &["cat-file", "-e", &sha]);
    }
}

#[test]
fn stale_mirrors_are_served_across_the_chain() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let regional = proxy(&up, None, AuthMode::None, Duration::from_millis(1));
    let edge = proxy(
        &up,
        Some(&regional),
        AuthMode::None,
        Duration::from_millis(1),
    );
    let url = edge.url_for(&up.segment(), "o/basic");
    clone_checked(&url);
    // The upstream fails: the parent serves its mirror as it is, so the edge's sync succeeds.
    up.set_mode(Mode::Fail);
    let (_work, clone) = clone_checked(&url);
    assert_eq!(refs(&clone), refs(&upstream_dir));
    // The parent is gone too: the edge serves its own mirror, marked stale.
    drop(regional);
    let r = info_refs(&edge, &up, "o/basic", None);
    assert_eq!(
        (r.status, r.header("x-git-proxy-status").as_deref()),
        (200, Some("stale"))
    );
    let (_work, clone) = clone_checked(&url);
    assert_eq!(refs(&clone), refs(&upstream_dir));
}

#[test]
fn an_edge_lends_its_static_token_to_the_parent_only_where_it_may_go() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "x-access-token:t0k");
    let regional = proxy(&up, None, AuthMode::PassThrough, HOUR);
    let edge_with = |hosts: String| {
        let parent = format!("http://{}", regional.addr);
        Server::in_front_of(&up, move |c| {
            c.parent_proxy = Some(parent);
            c.auth_mode = AuthMode::Static;
            c.static_token = Some("t0k".into());
            c.static_token_hosts = hosts;
        })
    };
    // The parent is plain http: the token goes there only with an `http://` entry.
    let edge = edge_with(up.segment());
    let r = info_refs(&edge, &up, "private/repo", None);
    assert_eq!(r.status, 401, "{}", r.text());
    let edge = edge_with(format!("http://{}", up.segment()));
    let (_work, clone) = clone_checked(&edge.url_for(&up.segment(), "private/repo"));
    assert_eq!(refs(&clone), refs(&upstream_dir));
    // The parent got the token passed through, and keeps its mirror private.
    let r = info_refs(&regional, &up, "private/repo", None);
    assert_eq!(r.status, 401, "{}", r.text());
}

#[test]
fn pushes_reach_the_edge_after_sync_stale_after_at_both_tiers() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let regional = proxy(&up, None, AuthMode::None, Duration::from_millis(1));
    let edge = proxy(
        &up,
        Some(&regional),
        AuthMode::None,
        Duration::from_millis(1),
    );
    let url = edge.url_for(&up.segment(), "o/basic");
    clone_checked(&url);
    // The edge lists the parent's refs with `ls-refs` alone, which syncs the parent.
    push_commit(&upstream_dir, "main");
    let (_work, clone) = clone_checked(&url);
    assert_eq!(refs(&clone), refs(&upstream_dir));
}

#[test]
fn a_warm_up_at_the_edge_makes_the_parent_check_its_upstream() {
    let up = Upstream::start();
    let upstream_dir = up.add_fixture("o/basic", "basic");
    let regional = proxy(&up, None, AuthMode::None, HOUR);
    let parent = format!("http://{}", regional.addr);
    let edge = Server::in_front_of(&up, move |c| {
        c.parent_proxy = Some(parent);
        c.sync_stale_after = HOUR.into();
        c.admin_token = Some("t0ken".into());
    });
    clone_checked(&edge.url_for(&up.segment(), "o/basic"));
    let pushed = push_commit(&upstream_dir, "main");
    let r = request(
        edge.addr,
        "POST",
        &format!("/api/v1/mirrors/{}/o/basic/sync", up.segment()),
        &[("Authorization", "Bearer t0ken")],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mirror = edge.mirror.path().join(up.segment()).join("o/basic.git");
    assert_eq!(
        git(&mirror, &["rev-parse", "refs/heads/main"]).trim(),
        pushed,
        "SYNC_STALE_AFTER is an hour away at both tiers"
    );
}
