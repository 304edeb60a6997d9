//! Credentials: pass-through (the client's own, checked against the upstream for every request
//! to a private mirror) and static (the proxy's token). The upstream is `git http-backend`
//! behind Basic auth.

use crate::common;

use std::time::Duration;

use base64::Engine as _;
use common::upstream::Upstream;
use common::*;
use smart_git_proxy::config::AuthMode;

/// Whether the mirror at `dir` is private, as its record says.
fn private_on_disk(dir: &std::path::Path) -> bool {
    let record = std::fs::read(dir.join("smart-git-proxy-state")).unwrap_or_default();
    serde_json::from_slice::<serde_json::Value>(&record)
        .is_ok_and(|record| record["private"] == serde_json::json!(true))
}

fn basic(user_password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

fn proxy(up: &Upstream, mode: AuthMode, token: Option<&str>) -> Server {
    let token = token.map(smart_git_proxy::config::Secret::from);
    // The test upstream is plain http on loopback: opt it in for the static token.
    let token_hosts = format!("http://{}", up.segment());
    Server::in_front_of(up, move |c| {
        c.static_token_hosts = token_hosts;
        c.auth_mode = mode;
        c.static_token = token;
        c.sync_stale_after = HOUR.into();
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
    Server::in_front_of(up, move |c| {
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
    let mirror = server
        .mirror
        .path()
        .join(up.segment())
        .join("public/repo.git");
    // Syncs with credentials: the creation, then a sync.
    for expected in ["clone", "sync"] {
        let (get, _) = both_endpoints(&server, &up, "public/repo", Some(&bogus));
        assert_eq!(get.header("x-git-proxy-status").as_deref(), Some(expected));
        assert!(!private_on_disk(&mirror), "after the {expected}");
    }
    // A failed sync with credentials.
    up.set_mode(common::upstream::Mode::Fail);
    let (get, _) = both_endpoints(&server, &up, "public/repo", Some(&bogus));
    assert_eq!(get.header("x-git-proxy-status").as_deref(), Some("stale"));
    assert!(!private_on_disk(&mirror), "after a failed sync");
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
    let mirror = server
        .mirror
        .path()
        .join(up.segment())
        .join("private/repo.git");
    assert!(private_on_disk(&mirror));
    let (get, _) = both_endpoints(&server, &up, "private/repo", None);
    assert_eq!(get.status, 401);
    // The upstream opens the repository: the next anonymous request finds it public, once the
    // refusal it remembered expired (AUTH_CACHE_TTL, 1 ms here).
    up.open_to_all();
    std::thread::sleep(Duration::from_millis(10));
    let (get, post) = both_endpoints(&server, &up, "private/repo", None);
    assert_eq!((get.status, post.status), (200, 200), "{}", get.text());
    assert!(!private_on_disk(&mirror));
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

/// A pass-through proxy with default verdict caching (`AUTH_CACHE_TTL` 60 s), adjusted.
fn pass_through(
    up: &Upstream,
    adjust: impl FnOnce(&mut smart_git_proxy::config::Config),
) -> Server {
    Server::in_front_of(up, move |c| {
        c.auth_mode = AuthMode::PassThrough;
        adjust(c);
    })
}

/// The refs the proxy lists for `name` to a client with `authorization`: the v0 advertisement
/// of `info/refs` and a v2 `ls-refs` answer, each asserted to be a 200.
fn listings(server: &Server, up: &Upstream, name: &str, authorization: Option<&str>) -> String {
    let mut headers = Vec::new();
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    let v0 = request(
        server.addr,
        "GET",
        &format!("/{}/{name}/info/refs?service=git-upload-pack", up.segment()),
        &headers,
        b"",
    );
    let (_, ls_refs) = both_endpoints(server, up, name, authorization);
    assert_eq!((v0.status, ls_refs.status), (200, 200), "{}", v0.text());
    v0.text() + &ls_refs.text()
}

/// A commit on top of `main` in the upstream repository at `dir`, on a branch of its own.
fn branch_with_own_commit(dir: &std::path::Path, branch: &str) -> String {
    let tree = git(dir, &["rev-parse", "main^{tree}"]);
    let sha = git(
        dir,
        &["commit-tree", tree.trim(), "-p", "main", "-m", branch],
    );
    let sha = sha.trim().to_owned();
    git(dir, &["update-ref", &format!("refs/heads/{branch}"), &sha]);
    sha
}

/// A v2 `fetch` of `want` (`want <sha>` or `want-ref <name>`), as git sends it.
fn v2_fetch(want: &str) -> Vec<u8> {
    pkt(&["command=fetch", "0001", "ofs-delta", want, "done", "0000"])
}

/// A v0 upload-pack request for `sha`, as git sends it.
fn v0_fetch(sha: &str) -> Vec<u8> {
    pkt(&[
        &format!("want {sha} multi_ack_detailed side-band-64k ofs-delta"),
        "0000",
        "done",
    ])
}

/// POST `body` to `name`'s upload-pack (`version` 2 or 0), with `authorization`.
fn upload_pack(
    server: &Server,
    up: &Upstream,
    name: &str,
    version: u8,
    authorization: Option<&str>,
    body: &[u8],
) -> Reply {
    let mut headers = vec![("Content-Type", "application/x-git-upload-pack-request")];
    if version == 2 {
        headers.push(("Git-Protocol", "version=2"));
    }
    if let Some(a) = authorization {
        headers.push(("Authorization", a));
    }
    request(
        server.addr,
        "POST",
        &format!("/{}/{name}/git-upload-pack", up.segment()),
        &headers,
        body,
    )
}

fn has_pack(r: &Reply) -> bool {
    r.body.windows(4).any(|w| w == b"PACK")
}

/// `git fetch <url> <sha>` into a new repository with protocol `version`, sending
/// `authorization` if given.
fn fetch_by_sha(
    url: &str,
    version: &str,
    sha: &str,
    authorization: Option<&str>,
) -> std::process::Output {
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q"]);
    let header = authorization.map(|a| format!("http.extraHeader=Authorization: {a}"));
    let mut args = vec!["-c".to_owned(), format!("protocol.version={version}")];
    if let Some(h) = header {
        args.extend(["-c".to_owned(), h]);
    }
    args.extend([
        "fetch".to_owned(),
        "-q".to_owned(),
        url.to_owned(),
        sha.to_owned(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    git_output(work.path(), &args, &[])
}

/// Whether the mirror at `dir` holds object `sha`.
fn mirror_has(dir: &std::path::Path, sha: &str) -> bool {
    git_output(dir, &["cat-file", "-e", sha], &[])
        .status
        .success()
}

/// #19 (1): a public repository whose upstream shows a branch to authenticated users only (as
/// Gerrit does with per-ref read rights). The mirror is synced anonymously whatever
/// credentials its clients carry: the branch is never listed to anonymous clients, its objects
/// never enter the mirror (so no SHA fetches them), and authenticated clients see the
/// repository as anonymous ones do.
#[test]
fn refs_the_upstream_hides_from_anonymous_users_never_reach_the_mirror() {
    let up = Upstream::start();
    let dir = up.add_fixture("public/repo", "basic");
    let secret = branch_with_own_commit(&dir, "secret");
    up.hide_from_anonymous("/public", "refs/heads/secret", "alice:secret");
    let alice = basic("alice:secret");
    let mirror_dir = |server: &Server| {
        server
            .mirror
            .path()
            .join(up.segment())
            .join("public/repo.git")
    };
    // The test upstream itself: the branch is Alice's only.
    let direct = format!("http://{}/public/repo.git", up.addr);
    let work = tempfile::tempdir().unwrap();
    let anonymous = git(work.path(), &["ls-remote", &direct]);
    assert!(!anonymous.contains("refs/heads/secret"), "{anonymous}");
    let with_alice = git_output(
        work.path(),
        &[
            "-c",
            &format!("http.extraHeader=Authorization: {alice}"),
            "ls-remote",
            &direct,
        ],
        &[],
    );
    assert!(String::from_utf8_lossy(&with_alice.stdout).contains("refs/heads/secret"));

    let server = proxy_syncing_always(&up);
    // Alice comes first: her requests create the mirror and sync it.
    for expected in ["clone", "sync"] {
        let (get, post) = both_endpoints(&server, &up, "public/repo", Some(&alice));
        assert_eq!(get.header("x-git-proxy-status").as_deref(), Some(expected));
        assert!(post.text().contains("refs/heads/main"), "{}", post.text());
        assert!(
            !post.text().contains("refs/heads/secret"),
            "{}",
            post.text()
        );
    }
    let listed = listings(&server, &up, "public/repo", Some(&alice));
    assert!(!listed.contains("refs/heads/secret"), "{listed}");
    // Her want-miss for the branch's commit, and for the branch by name.
    let r = upload_pack(
        &server,
        &up,
        "public/repo",
        2,
        Some(&alice),
        &v2_fetch(&format!("want {secret}")),
    );
    assert!(!has_pack(&r), "Alice's want-miss fetched the hidden commit");
    let r = upload_pack(
        &server,
        &up,
        "public/repo",
        2,
        Some(&alice),
        &v2_fetch("want-ref refs/heads/secret"),
    );
    assert!(!has_pack(&r), "Alice's want-ref fetched the hidden branch");
    assert!(
        !mirror_has(&mirror_dir(&server), &secret),
        "the hidden commit entered the mirror"
    );
    // Anonymous clients: not listed, not fetchable, with either protocol.
    let listed = listings(&server, &up, "public/repo", None);
    assert!(listed.contains("refs/heads/main"), "{listed}");
    assert!(!listed.contains("refs/heads/secret"), "{listed}");
    let url = server.url_for(&up.segment(), "public/repo");
    for version in PROTOCOLS {
        let out = fetch_by_sha(&url, version, &secret, None);
        assert!(
            !out.status.success(),
            "protocol {version}: the hidden commit was fetched"
        );
        let out = fetch_by_sha(&url, version, &secret, Some(&alice));
        assert!(
            !out.status.success(),
            "protocol {version}: Alice fetched the hidden commit through the public mirror"
        );
    }
    let r = upload_pack(&server, &up, "public/repo", 0, None, &v0_fetch(&secret));
    assert!(!has_pack(&r), "v0: {}", r.text());
    // A clone carries no trace of it either.
    let clone = tempfile::tempdir().unwrap();
    git(clone.path(), &["clone", "-q", "--mirror", &url, "m.git"]);
    assert!(!refs(&clone.path().join("m.git")).contains("secret"));
    assert_fsck(&clone.path().join("m.git"));
    assert!(!mirror_has(&mirror_dir(&server), &secret));
}

/// #19 (1): a private mirror holds what its clients' credentials fetched. When the upstream
/// opens the repository, the mirror is made again anonymously: what the credentials alone
/// could see (here a branch the upstream still hides from anonymous users) is gone, by name
/// and by SHA.
#[test]
fn a_private_mirror_that_turns_public_keeps_nothing_fetched_with_credentials() {
    let up = Upstream::start();
    let dir = up.add_fixture("private/repo", "basic");
    let secret = branch_with_own_commit(&dir, "secret");
    up.require_auth("/private", "alice:secret");
    up.hide_from_anonymous("/private", "refs/heads/secret", "alice:secret");
    let alice = basic("alice:secret");
    let server = proxy_syncing_always(&up);
    let mirror = server
        .mirror
        .path()
        .join(up.segment())
        .join("private/repo.git");
    let listed = listings(&server, &up, "private/repo", Some(&alice));
    assert!(
        listed.contains("refs/heads/secret"),
        "Alice sees her branch"
    );
    assert!(mirror_has(&mirror, &secret));

    up.open_to_all();
    // Once the remembered anonymous refusal expired (AUTH_CACHE_TTL, 1 ms here).
    std::thread::sleep(Duration::from_millis(10));
    let listed = listings(&server, &up, "private/repo", None);
    assert!(listed.contains("refs/heads/main"), "{listed}");
    assert!(!listed.contains("refs/heads/secret"), "{listed}");
    assert!(
        !mirror_has(&mirror, &secret),
        "the hidden commit stayed in the mirror"
    );
    let url = server.url_for(&up.segment(), "private/repo");
    for version in PROTOCOLS {
        let out = fetch_by_sha(&url, version, &secret, None);
        assert!(!out.status.success(), "protocol {version}");
    }
    let clone = tempfile::tempdir().unwrap();
    git(clone.path(), &["clone", "-q", "--mirror", &url, "m.git"]);
    assert_fsck(&clone.path().join("m.git"));
}

/// #19 (2): an anonymous client of a private mirror learns nothing from its wants: known and
/// unknown wants (by SHA, by name, v0 and v2) are refused alike, before any want-miss work,
/// so an unknown one costs no upstream request and takes no longer.
#[test]
fn a_private_mirror_refuses_anonymous_wants_before_looking_at_them() {
    let up = Upstream::start();
    let dir = up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let server = pass_through(&up, |c| {
        c.sync_stale_after = Duration::from_secs(3600).into();
    });
    let alice = basic("alice:secret");
    let (get, _) = both_endpoints(&server, &up, "private/repo", Some(&alice));
    assert_eq!(get.status, 200);
    let known = git(&dir, &["rev-parse", "main"]).trim().to_owned();
    let unknown = "1234567890abcdef1234567890abcdef12345678";
    let bodies = |sha: &str, name: &str| {
        vec![
            (2, v2_fetch(&format!("want {sha}"))),
            (2, v2_fetch(&format!("want-ref {name}"))),
            (0, v0_fetch(sha)),
        ]
    };
    let timed = |version: u8, body: &[u8]| {
        let started = std::time::Instant::now();
        let r = upload_pack(&server, &up, "private/repo", version, None, body);
        (r, started.elapsed())
    };
    let (mut known_times, mut unknown_times) = (Vec::new(), Vec::new());
    for round in 0..5 {
        for ((version, known_body), (_, unknown_body)) in bodies(&known, "refs/heads/main")
            .into_iter()
            .zip(bodies(unknown, "refs/heads/no-such-branch"))
        {
            let asked = up.log().len();
            let (r, t) = timed(version, &known_body);
            assert_challenged(&r, "a known want");
            known_times.push(t);
            let (r, t) = timed(version, &unknown_body);
            assert_challenged(&r, "an unknown want");
            unknown_times.push(t);
            assert_eq!(
                up.log().len(),
                asked,
                "round {round}, v{version}: an anonymous want reached the upstream"
            );
        }
    }
    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let (k, u) = (median(&mut known_times), median(&mut unknown_times));
    eprintln!("anonymous wants on a private mirror: known {k:?}, unknown {u:?} (median of 15)");
    // The issue's bound on the difference (#19): an oracle shows as the length of a sync.
    assert!(
        k.abs_diff(u) < Duration::from_millis(300),
        "known {k:?}, unknown {u:?}"
    );
}

/// #19 (3): once a private mirror is stale, requests without credentials are refused before
/// anything reaches the upstream: a flood of 100 (listings, ls-refs, fetches) costs at most 3
/// upstream requests.
#[test]
fn an_anonymous_flood_on_a_stale_private_mirror_costs_no_upstream_requests() {
    let up = Upstream::start();
    let dir = up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let server = pass_through(&up, |c| c.sync_stale_after = Duration::ZERO.into());
    let (get, _) = both_endpoints(&server, &up, "private/repo", Some(&basic("alice:secret")));
    assert_eq!(get.status, 200);
    let known = git(&dir, &["rev-parse", "main"]).trim().to_owned();
    let asked = up.log().len();
    let (addr, segment) = (server.addr, up.segment());
    let threads: Vec<_> = (0..10)
        .map(|t| {
            let known = known.clone();
            let segment = segment.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for i in 0..10 {
                    let info_refs =
                        format!("/{segment}/private/repo/info/refs?service=git-upload-pack");
                    let upload = format!("/{segment}/private/repo/git-upload-pack");
                    let v2 = [("Git-Protocol", "version=2")];
                    let r = match (t + i) % 5 {
                        0 => request(addr, "GET", &info_refs, &[], b""),
                        1 => request(addr, "GET", &info_refs, &v2, b""),
                        2 => request(addr, "POST", &upload, &v2, b"0014command=ls-refs\n0000"),
                        3 => request(
                            addr,
                            "POST",
                            &upload,
                            &v2,
                            &v2_fetch(&format!("want {known}")),
                        ),
                        _ => request(addr, "POST", &upload, &[], &v0_fetch(&known)),
                    };
                    statuses.push(r.status);
                }
                statuses
            })
        })
        .collect();
    for t in threads {
        assert!(t.join().unwrap().iter().all(|s| *s == 401));
    }
    let cost = up.log().len() - asked;
    eprintln!("100 anonymous requests on a stale private mirror: {cost} upstream requests");
    assert!(cost <= 3, "{cost} upstream requests");
}

/// #19 (3): 50 concurrent requests with the same wrong password share one upstream check (the
/// upstream is slow, so that they all arrive while it runs), and the refusal is remembered.
#[test]
fn concurrent_wrong_passwords_share_one_upstream_check() {
    let up = Upstream::start();
    up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let server = pass_through(&up, |c| c.sync_stale_after = Duration::ZERO.into());
    let (get, _) = both_endpoints(&server, &up, "private/repo", Some(&basic("alice:secret")));
    assert_eq!(get.status, 200);
    up.set_mode(common::upstream::Mode::Slow(Duration::from_millis(500)));
    let asked = up.log().len();
    let wrong = basic("alice:guess");
    let (addr, segment) = (server.addr, up.segment());
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let (wrong, segment) = (wrong.clone(), segment.clone());
            std::thread::spawn(move || {
                let headers = [
                    ("Authorization", wrong.as_str()),
                    ("Git-Protocol", "version=2"),
                ];
                if i % 2 == 0 {
                    let path = format!("/{segment}/private/repo/info/refs?service=git-upload-pack");
                    request(addr, "GET", &path, &headers, b"").status
                } else {
                    let path = format!("/{segment}/private/repo/git-upload-pack");
                    request(addr, "POST", &path, &headers, b"0014command=ls-refs\n0000").status
                }
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 401);
    }
    let cost = up.log().len() - asked;
    eprintln!("50 concurrent wrong-password requests: {cost} upstream requests");
    assert_eq!(cost, 1, "one shared check");
    let (get, post) = both_endpoints(&server, &up, "private/repo", Some(&wrong));
    assert_challenged(&get, "a remembered refusal");
    assert_challenged(&post, "a remembered refusal");
    assert_eq!(up.log().len() - asked, 1, "the refusal is remembered");
}

/// No upstream request follows a redirect to a host outside `ALLOWED_UPSTREAMS`: not the ref
/// listing, nor the fetch's handshake (whose redirect gix would follow).
#[test]
fn no_upstream_request_follows_a_redirect_outside_the_allowed_upstreams() {
    use common::upstream::Mode;
    let up = Upstream::start();
    up.add_fixture("o/repo", "basic");
    let elsewhere = Upstream::start();
    elsewhere.add_fixture("o/repo", "basic");
    for redirect in [
        Mode::RedirectTo(elsewhere.addr),
        Mode::RedirectGetsTo(elsewhere.addr),
    ] {
        up.set_mode(redirect);
        for mode in [AuthMode::None, AuthMode::PassThrough] {
            let server = proxy(&up, mode, None);
            for authorization in [None, Some(basic("alice:secret"))] {
                let (get, post) = both_endpoints(&server, &up, "o/repo", authorization.as_deref());
                assert_eq!(
                    (get.status, post.status),
                    (502, 502),
                    "{redirect:?}, {mode:?}: {}",
                    get.text()
                );
            }
        }
    }
    assert_eq!(
        elsewhere.log().len(),
        0,
        "a request went to a host not allowed"
    );
}

/// A redirect to another allowed upstream (a renamed repository, a moved host) is followed by
/// the listing, and the fetch goes where it led.
#[test]
fn redirects_within_the_allowed_upstreams_are_followed() {
    let up = Upstream::start();
    let moved = Upstream::start();
    moved.add_fixture("o/repo", "basic");
    up.set_mode(common::upstream::Mode::RedirectTo(moved.addr));
    let allowed = format!("{},{}", up.allowed(), moved.allowed());
    let server = Server::start_with(move |c| c.allowed_upstreams = allowed);
    let work = tempfile::tempdir().unwrap();
    for version in PROTOCOLS {
        let dest = format!("c{version}");
        git(
            work.path(),
            &[
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                "-q",
                &server.url_for(&up.segment(), "o/repo"),
                &dest,
            ],
        );
        assert_fsck(&work.path().join(dest).join(".git"));
    }
    assert!(moved.count("/o/repo.git") > 0);
}

/// The admin API's `Bearer` scheme is matched case-insensitively (RFC 9110, 11.1); the token
/// is not.
#[test]
fn the_admin_bearer_scheme_is_case_insensitive() {
    let server = Server::start_with(|c| c.admin_token = Some("t0ken".into()));
    let get = |authorization: &str| {
        request(
            server.addr,
            "GET",
            "/api/v1/mirrors",
            &[("Authorization", authorization)],
            b"",
        )
        .status
    };
    for accepted in [
        "Bearer t0ken",
        "bearer t0ken",
        "BEARER t0ken",
        "bEaReR   t0ken",
    ] {
        assert_eq!(get(accepted), 200, "{accepted}");
    }
    for refused in [
        "Bearer T0KEN",
        "Basic t0ken",
        "Bearert0ken",
        "t0ken",
        "Bearer",
    ] {
        assert_eq!(get(refused), 401, "{refused}");
    }
}

/// An upstream that refuses the proxy's own token once the mirror exists is an upstream
/// failure: the mirror is served as it is (`stale`), and the sync is retried after
/// `SYNC_STALE_AFTER`, not on every request.
#[test]
fn a_refused_static_token_serves_the_mirror_stale_and_backs_off() {
    let up = Upstream::start();
    up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "x-access-token:tok3n");
    let token_hosts = format!("http://{}", up.segment());
    let server = Server::in_front_of(&up, move |c| {
        c.static_token_hosts = token_hosts;
        c.auth_mode = AuthMode::Static;
        c.static_token = Some("tok3n".into());
        c.sync_stale_after = Duration::from_secs(1).into();
    });
    let (get, _) = both_endpoints(&server, &up, "private/repo", None);
    assert_eq!(get.header("x-git-proxy-status").as_deref(), Some("clone"));
    // The token is revoked.
    up.require_auth("/private", "x-access-token:other");
    std::thread::sleep(Duration::from_millis(1100));
    let asked = up.log().len();
    for _ in 0..5 {
        let (get, post) = both_endpoints(&server, &up, "private/repo", None);
        assert_eq!((get.status, post.status), (200, 200), "{}", get.text());
        assert_eq!(get.header("x-git-proxy-status").as_deref(), Some("stale"));
    }
    let cost = up.log().len() - asked;
    assert!(cost <= 2, "{cost} upstream requests for 10 requests");
}

/// In pass-through mode a warm-up carries no client's credentials: the sync of a private
/// mirror is refused before it reaches the upstream, and the mirror stays as it is.
#[test]
fn a_warm_up_of_a_private_mirror_costs_no_upstream_request_in_pass_through_mode() {
    let up = Upstream::start();
    up.add_fixture("private/repo", "basic");
    up.require_auth("/private", "alice:secret");
    let server = pass_through(&up, |c| c.admin_token = Some("t0ken".into()));
    let (get, _) = both_endpoints(&server, &up, "private/repo", Some(&basic("alice:secret")));
    assert_eq!(get.status, 200);
    let asked = up.log().len();
    for _ in 0..3 {
        let r = request(
            server.addr,
            "POST",
            &format!("/api/v1/mirrors/{}/private/repo/sync", up.segment()),
            &[("Authorization", "Bearer t0ken")],
            b"",
        );
        assert_eq!(r.status, 502, "{}", r.text());
        assert!(r.text().contains("authentication required"), "{}", r.text());
    }
    assert_eq!(up.log().len(), asked, "a warm-up reached the upstream");
}
