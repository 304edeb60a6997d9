//! Credentials: pass-through (the client's own, checked against the upstream for every request
//! to a private mirror) and static (the proxy's token). The upstream is `git http-backend`
//! behind Basic auth.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::upstream::Upstream;
use common::*;
use smart_git_proxy::config::AuthMode;

fn basic(user_password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

fn proxy(up: &Upstream, mode: AuthMode, token: Option<&str>) -> Server {
    let allowed = up.allowed();
    let token = token.map(smart_git_proxy::config::Secret::from);
    // The test upstream is plain http on loopback: opt it in for the static token.
    let token_hosts = format!("http://{}", up.segment());
    Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.static_token_hosts = token_hosts;
        c.auth_mode = mode;
        c.static_token = token;
        c.sync_stale_after = Duration::from_secs(3600).into();
        c.auth_cache_ttl = Duration::from_millis(1).into();
    })
}

/// `GET info/refs` and a v2 `ls-refs` POST for `name`, with `authorization`.
fn both_endpoints(
    server: &Server,
    up: &Upstream,
    name: &str,
    authorization: Option<&str>,
) -> (Reply, Reply) {
    let mut headers = vec![("Git-Protocol", "version=2")];
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let get = request(
        server.addr,
        "GET",
        &format!("/{}/{name}/info/refs?service=git-upload-pack", up.segment()),
        &headers,
        b"",
    );
    let post = request(
        server.addr,
        "POST",
        &format!("/{}/{name}/git-upload-pack", up.segment()),
        &headers,
        b"0014command=ls-refs\n0000",
    );
    (get, post)
}

fn assert_challenged(r: &Reply, what: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    assert_eq!(
        r.header("www-authenticate").as_deref(),
        Some("Basic realm=\"smart-git-proxy\""),
        "{what}"
    );
}

#[test]
fn pass_through_serves_private_mirrors_only_to_accepted_credentials() {
    let up = Upstream::start();
    up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let server = proxy(&up, AuthMode::PassThrough, None);
    let right = basic("alice:secret");
    let wrong = basic("alice:guess");

    // Cold: the upstream's refusal becomes a challenge, so git asks for credentials.
    let (get, _) = both_endpoints(&server, &up, "private/repo", None);
    assert_challenged(&get, "no credentials, no mirror");
    let (get, _) = both_endpoints(&server, &up, "private/repo", Some(&wrong));
    assert_challenged(&get, "wrong credentials, no mirror");

    // The client's credentials create the mirror.
    let work = tempfile::tempdir().unwrap();
    let with_creds = server.url_for(&up.segment(), "private/repo").replacen(
        "http://",
        "http://alice:secret@",
        1,
    );
    git(work.path(), &["clone", "-q", &with_creds, "c"]);
    assert_fsck(&work.path().join("c/.git"));

    // Now the mirror exists: both endpoints still require credentials the upstream accepts.
    for (auth, ok) in [
        (None, false),
        (Some(wrong.as_str()), false),
        (Some(right.as_str()), true),
    ] {
        let (get, post) = both_endpoints(&server, &up, "private/repo", auth);
        if ok {
            assert_eq!((get.status, post.status), (200, 200), "{}", post.text());
            assert!(post.text().contains("refs/heads/main"));
        } else {
            assert_challenged(&get, "GET of a private mirror");
            assert_challenged(&post, "POST of a private mirror");
        }
    }
    let out = git_output(
        work.path(),
        &[
            "clone",
            &server.url_for(&up.segment(), "private/repo"),
            "anon",
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "an anonymous clone of a private mirror fails"
    );

    // Secrets are never written to the mirror.
    let mirror = server
        .mirror
        .path()
        .join(up.segment())
        .join("private/repo.git");
    for file in ["config", "packed-refs", "HEAD"] {
        let text = std::fs::read_to_string(mirror.join(file)).unwrap_or_default();
        assert!(
            !text.contains("secret") && !text.contains(&right[6..]),
            "{file}"
        );
    }
}

#[test]
fn pass_through_needs_no_credentials_for_public_repositories() {
    let up = Upstream::start();
    up.add_fixture("public/repo", "basic");
    let server = proxy(&up, AuthMode::PassThrough, None);
    let (get, post) = both_endpoints(&server, &up, "public/repo", None);
    assert_eq!((get.status, post.status), (200, 200));
    assert_eq!(get.header("x-git-proxy-status").as_deref(), Some("clone"));
}

#[test]
fn static_mode_sends_the_proxy_token() {
    let up = Upstream::start();
    up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "x-access-token:tok3n");
    let server = proxy(&up, AuthMode::Static, Some("tok3n"));
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &server.url_for(&up.segment(), "private/repo"),
            "c",
        ],
    );
    assert_fsck(&work.path().join("c/.git"));
    let sent = up
        .log()
        .iter()
        .filter_map(|l| {
            l.headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .collect::<Vec<_>>();
    assert!(sent.contains(&basic("x-access-token:tok3n")), "{sent:?}");

    let bad = proxy(&up, AuthMode::Static, Some("wrong"));
    let out = git_output(
        work.path(),
        &["clone", &bad.url_for(&up.segment(), "private/repo"), "d"],
        &[],
    );
    assert!(!out.status.success());
}

#[test]
fn the_static_token_is_lent_to_git_lfs_downloads_only() {
    let up = Upstream::start();
    up.add_fixture("o/repo", "basic");
    let server = proxy(&up, AuthMode::Static, Some("tok3n"));
    let token = basic("x-access-token:tok3n");
    let lfs = |body: &[u8]| {
        request(
            server.addr,
            "POST",
            &format!("/{}/o/repo.git/info/lfs/objects/batch", up.segment()),
            &[("Content-Type", "application/vnd.git-lfs+json")],
            body,
        )
    };
    let sent_auth = |up: &Upstream| {
        up.log()
            .iter()
            .rev()
            .find(|l| l.path.contains("/info/lfs/"))
            .and_then(|l| {
                l.headers
                    .get("authorization")
                    .map(|v| v.to_str().unwrap_or_default().to_owned())
            })
    };
    assert_eq!(
        lfs(br#"{ "operation": "download", "objects": [] }"#).status,
        200
    );
    assert_eq!(
        sent_auth(&up),
        Some(token.clone()),
        "downloads may use the proxy's token"
    );
    assert_eq!(lfs(br#"{"operation":"upload","objects":[]}"#).status, 200);
    assert_eq!(sent_auth(&up), None, "uploads never do");
    let r = request(
        server.addr,
        "POST",
        &format!("/{}/o/repo.git/info/lfs/locks", up.segment()),
        &[],
        b"{}",
    );
    assert_eq!(r.status, 200);
    assert_eq!(sent_auth(&up), None, "nor do lock requests");
    let r = request(
        server.addr,
        "GET",
        &format!("/{}/o/repo.git/info/lfs/locks", up.segment()),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(sent_auth(&up), None, "not even listing locks");
    // Uploads dressed up as downloads: nested, duplicated, escaped.
    for disguised in [
        br#"{"operation":"upload","objects":[{"oid":"x","operation":"download"}]}"#.as_slice(),
        br#"{"operation":"upload","operation":"download","objects":[]}"#,
        br#"{"ref":{"name":""operation":"download""},"operation":"upload"}"#,
    ] {
        assert_eq!(lfs(disguised).status, 200);
        assert_eq!(
            sent_auth(&up),
            None,
            "{}",
            String::from_utf8_lossy(disguised)
        );
    }
    // And nothing climbs out of info/lfs.
    let r = request(
        server.addr,
        "GET",
        &format!(
            "/{}/o/repo.git/info/lfs/../../../x/y.git/info/refs",
            up.segment()
        ),
        &[],
        b"",
    );
    assert_eq!(r.status, 400);
}

/// A pass-through proxy that syncs on every `info/refs`.
fn proxy_syncing_always(up: &Upstream) -> Server {
    let allowed = up.allowed();
    Server::start_with(move |c| {
        c.allowed_upstreams = allowed;
        c.auth_mode = AuthMode::PassThrough;
        c.sync_stale_after = Duration::ZERO.into();
        c.auth_cache_ttl = Duration::from_millis(1).into();
    })
}

#[test]
fn credentials_never_make_a_public_mirror_private() {
    let up = Upstream::start();
    up.add_fixture("public/repo", "basic");
    // The upstream ignores credentials on public repositories, as GitHub does.
    let server = proxy_syncing_always(&up);
    let bogus = basic("mallory:whatever");
    let marker = server
        .mirror
        .path()
        .join(up.segment())
        .join("public/repo.git/smart-git-proxy-private");
    // Syncs with credentials: the creation, then a sync.
    for expected in ["clone", "sync"] {
        let (get, _) = both_endpoints(&server, &up, "public/repo", Some(&bogus));
        assert_eq!(get.header("x-git-proxy-status").as_deref(), Some(expected));
        assert!(!marker.exists(), "after the {expected}");
    }
    // A failed sync with credentials.
    up.set_mode(common::upstream::Mode::Fail);
    let (get, _) = both_endpoints(&server, &up, "public/repo", Some(&bogus));
    assert_eq!(get.header("x-git-proxy-status").as_deref(), Some("stale"));
    assert!(!marker.exists(), "after a failed sync");
    up.set_mode(common::upstream::Mode::Normal);
    // Anonymous clients are still served.
    let (get, post) = both_endpoints(&server, &up, "public/repo", None);
    assert_eq!((get.status, post.status), (200, 200), "{}", get.text());
}

#[test]
fn a_mirror_is_private_while_its_upstream_refuses_anonymous_access() {
    let up = Upstream::start();
    up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let server = proxy_syncing_always(&up);
    let right = basic("alice:secret");
    let (get, _) = both_endpoints(&server, &up, "private/repo", Some(&right));
    assert_eq!(get.status, 200);
    let marker = server
        .mirror
        .path()
        .join(up.segment())
        .join("private/repo.git/smart-git-proxy-private");
    assert!(marker.exists());
    let (get, _) = both_endpoints(&server, &up, "private/repo", None);
    assert_eq!(get.status, 401);
    // The upstream opens the repository: the next sync finds it public.
    up.open_to_all();
    let (get, post) = both_endpoints(&server, &up, "private/repo", None);
    assert_eq!((get.status, post.status), (200, 200), "{}", get.text());
    assert!(!marker.exists());
}

#[test]
fn the_static_token_goes_only_to_its_hosts_and_over_http_only_by_opt_in() {
    let up = Upstream::start();
    up.add_fixture("o/repo", "basic");
    let allowed = up.allowed();
    for hosts in ["github.com".to_owned(), up.segment()] {
        let (allowed, token_hosts) = (allowed.clone(), hosts.clone());
        let server = Server::start_with(move |c| {
            c.allowed_upstreams = allowed;
            c.auth_mode = AuthMode::Static;
            c.static_token = Some("tok3n".into());
            c.static_token_hosts = token_hosts;
        });
        let (get, _) = both_endpoints(&server, &up, "o/repo", None);
        assert_eq!(get.status, 200, "a public repository needs no token");
        let lfs = request(
            server.addr,
            "POST",
            &format!("/{}/o/repo.git/info/lfs/objects/batch", up.segment()),
            &[],
            br#"{"operation":"download","objects":[]}"#,
        );
        assert_eq!(lfs.status, 200);
        let sent = up
            .log()
            .iter()
            .filter(|l| l.headers.contains_key("authorization"))
            .count();
        assert_eq!(sent, 0, "STATIC_TOKEN_HOSTS={hosts}: the token never left");
    }
}
