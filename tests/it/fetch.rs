//! Fetches into existing clones through the server: incremental updates, multi-round
//! negotiation, single branches and tags. Protocol v2 and v0.

use crate::common;

use std::path::Path;

use common::*;

/// Add `n` commits on `branch` of the bare repository `served` (through a scratch clone and a
/// push, as an upstream would receive them).
fn add_upstream_commits(served: &Path, branch: &str, n: usize, tag: Option<&str>) {
    let work = tempfile::tempdir().unwrap();
    let src = format!("file://{}", served.display());
    git(work.path(), &["clone", "-q", "--branch", branch, &src, "w"]);
    let w = work.path().join("w");
    for i in 0..n {
        std::fs::write(
            w.join(format!("upstream-{branch}-{i}.txt").replace('/', "-")),
            format!("{i}\n"),
        )
        .unwrap();
        git(&w, &["add", "-A"]);
        git(&w, &["commit", "-q", "-m", &format!("upstream {i}")]);
    }
    if let Some(tag) = tag {
        git(&w, &["tag", "-a", "-m", "new tag", tag]);
        git(&w, &["push", "-q", "origin", tag]);
    }
    git(&w, &["push", "-q", "origin", &format!("HEAD:{branch}")]);
}

/// A fresh, writable copy of the `basic` fixture served by a new server.
fn writable_basic() -> (Server, tempfile::TempDir, std::path::PathBuf, String) {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let served = dir.path().join("basic.git");
    build_fixture("basic", &served);
    let url = server.link("basic", &served);
    (server, dir, served, url)
}

fn remote_refs_match(clone: &Path, served: &Path) {
    let ours = git(
        clone,
        &[
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            "refs/remotes/origin/",
            "refs/tags/",
        ],
    )
    .replace("refs/remotes/origin/", "refs/heads/");
    let ours: Vec<&str> = ours
        .lines()
        .filter(|l| !l.ends_with(" refs/heads/HEAD"))
        .collect();
    let theirs = git(
        served,
        &[
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            "refs/heads/",
            "refs/tags/",
        ],
    );
    assert_eq!(ours, theirs.lines().collect::<Vec<_>>());
}

/// How many requests the client made, from its packet trace.
fn rounds(trace: &str, version: &str) -> usize {
    if version == "2" {
        trace.matches("> command=fetch").count()
    } else {
        // remote-curl traces each stateless POST body it forwards as one `git< …want…` line.
        trace
            .lines()
            .filter(|l| l.contains("git< ") && l.contains("want ") && l.contains("multi_ack"))
            .count()
    }
}

#[test]
fn incremental_fetch_after_upstream_commits() {
    for v in PROTOCOLS {
        let (_server, _dir, served, url) = writable_basic();
        let p = proto(v);
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &args(&["clone", "-q", &url, "c"], &p));
        let c = work.path().join("c");
        add_upstream_commits(&served, "main", 3, Some("v3.0"));
        add_upstream_commits(&served, "feature/a", 2, None);
        git(&c, &args(&["fetch", "-q", "origin"], &p));
        assert_fsck(&c.join(".git"));
        remote_refs_match(&c, &served);
        // And once more with nothing new: negotiation only, no error.
        git(&c, &args(&["fetch", "-q", "origin"], &p));
        remote_refs_match(&c, &served);
    }
}

#[test]
fn negotiation_over_many_rounds_when_the_client_has_commits_we_lack() {
    for v in PROTOCOLS {
        let (_server, _dir, served, url) = writable_basic();
        let p = proto(v);
        let work = tempfile::tempdir().unwrap();
        git(work.path(), &args(&["clone", "-q", &url, "c"], &p));
        let c = work.path().join("c");
        // Hundreds of local commits the server has never seen; they are the newest, so the
        // client offers them first and the server must NAK its way down to common history.
        git(&c, &["checkout", "-q", "-b", "local-side"]);
        let mut fast_import = String::new();
        for i in 0..300 {
            fast_import.push_str(&format!(
                "commit refs/heads/local-side\ncommitter T <t@example.com> {} +0000\ndata 6\nlocal\n{}M 644 inline local.txt\ndata {}\n{}\n\n",
                2_000_000_000 + i,
                if i == 0 { "from refs/heads/main\n".to_string() } else { String::new() },
                format!("{i}").len() + 1,
                i
            ));
        }
        let out = std::process::Command::new("git")
            .current_dir(&c)
            .args(["fast-import", "--quiet"])
            .envs(git_env())
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(fast_import.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(out.status.success());
        add_upstream_commits(&served, "main", 2, None);
        let trace = work.path().join("trace");
        let out = git_output(
            &c,
            &args(&["fetch", "origin"], &p),
            &[("GIT_TRACE_PACKET", trace.to_str().unwrap())],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let trace = std::fs::read_to_string(&trace).unwrap();
        assert!(
            rounds(&trace, v) >= 2,
            "v{v}: expected several negotiation rounds, got {}",
            rounds(&trace, v)
        );
        assert!(trace.contains("ACK "), "v{v}: common commits acknowledged");
        assert_fsck(&c.join(".git"));
        remote_refs_match(&c, &served);
    }
}

#[test]
fn fetch_of_a_single_branch_into_a_single_branch_clone() {
    for v in PROTOCOLS {
        let (_server, _dir, served, url) = writable_basic();
        let p = proto(v);
        let work = tempfile::tempdir().unwrap();
        git(
            work.path(),
            &args(
                &[
                    "clone",
                    "-q",
                    "--single-branch",
                    "--branch",
                    "main",
                    &url,
                    "c",
                ],
                &p,
            ),
        );
        let c = work.path().join("c");
        add_upstream_commits(&served, "feature/b", 1, None);
        git(
            &c,
            &args(
                &[
                    "fetch",
                    "-q",
                    "origin",
                    "feature/b:refs/remotes/origin/feature/b",
                ],
                &p,
            ),
        );
        assert_fsck(&c.join(".git"));
        assert_eq!(
            git(&c, &["rev-parse", "refs/remotes/origin/feature/b"]),
            git(&served, &["rev-parse", "refs/heads/feature/b"])
        );
        // Fetching a tag by name brings the tag object.
        git(
            &c,
            &args(&["fetch", "-q", "origin", "tag", "v2.0-signed-off"], &p),
        );
        assert_eq!(
            git(&c, &["rev-parse", "v2.0-signed-off"]),
            git(&served, &["rev-parse", "v2.0-signed-off"])
        );
        assert_fsck(&c.join(".git"));
    }
}

#[test]
fn fetch_with_and_without_tags() {
    for v in PROTOCOLS {
        let (_server, _dir, served, url) = writable_basic();
        let p = proto(v);
        let work = tempfile::tempdir().unwrap();
        git(
            work.path(),
            &args(&["clone", "-q", "--no-tags", &url, "c"], &p),
        );
        let c = work.path().join("c");
        add_upstream_commits(&served, "main", 1, Some("v9.0"));
        git(&c, &args(&["fetch", "-q", "--no-tags", "origin"], &p));
        assert_eq!(git(&c, &["tag", "--list"]), "", "v{v}: --no-tags");
        git(&c, &args(&["fetch", "-q", "--tags", "origin"], &p));
        assert_eq!(
            git(&c, &["for-each-ref", "refs/tags/"]),
            git(&served, &["for-each-ref", "refs/tags/"]),
            "v{v}: --tags"
        );
        assert_fsck(&c.join(".git"));
    }
}

#[test]
fn v2_clients_fetch_named_refs_with_want_ref() {
    let (_server, _dir, served, url) = writable_basic();
    let work = tempfile::tempdir().unwrap();
    git(work.path(), &["init", "-q", "c"]);
    let c = work.path().join("c");
    let trace = work.path().join("trace");
    let out = git_output(
        &c,
        &[
            "-c",
            "protocol.version=2",
            "fetch",
            &url,
            "refs/heads/feature/a:refs/remotes/x/a",
        ],
        &[("GIT_TRACE_PACKET", trace.to_str().unwrap())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trace = std::fs::read_to_string(&trace).unwrap();
    assert!(
        trace.contains("fetch> want-ref refs/heads/feature/a"),
        "ref-in-want is used"
    );
    assert!(
        trace.contains("fetch< wanted-refs"),
        "and answered in wanted-refs"
    );
    assert_eq!(
        git(&c, &["rev-parse", "refs/remotes/x/a"]),
        git(&served, &["rev-parse", "refs/heads/feature/a"])
    );
    assert_fsck(&c.join(".git"));

    let out = git_output(
        &c,
        &[
            "-c",
            "protocol.version=2",
            "fetch",
            &url,
            "refs/heads/no-such-branch",
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-branch"));
}

/// The pack of a v2 fetch answer: band 1 of the `packfile` section.
fn packfile(answer: &[u8]) -> Vec<u8> {
    let lines = pkt_payloads(answer);
    let start = lines
        .iter()
        .position(|l| *l == b"packfile\n")
        .expect("packfile section");
    lines[start + 1..]
        .iter()
        .filter(|l| l.first() == Some(&1))
        .flat_map(|l| l[1..].to_vec())
        .collect()
}

/// A client with part of the history fetches the rest: with `thin-pack` it receives deltas
/// against objects it has (and only those: `index-pack --fix-thin` completes the pack from its
/// own objects, and the result is whole), a smaller pack than without.
#[test]
fn thin_packs_hold_deltas_against_what_the_client_has() {
    let server = Server::start_with(|c| c.pack_cache_max_size = bytesize::ByteSize::b(0));
    let url = server.serve_fixture("large");
    let served = fixture("large");
    let (tip, old) = (
        git(&served, &["rev-parse", "main"]).trim().to_owned(),
        git(&served, &["rev-parse", "main~50"]).trim().to_owned(),
    );
    // The client: the history up to main~50, nothing else.
    let work = tempfile::tempdir().unwrap();
    let client = work.path();
    git(client, &["init", "-q", "--bare"]);
    git(
        client,
        &["fetch", "-q", &url, &format!("{old}:refs/heads/main")],
    );
    let fetch = |thin: bool| {
        let mut lines = vec!["command=fetch", "0001", "ofs-delta", "no-progress"];
        if thin {
            lines.push("thin-pack");
        }
        let (want, have) = (format!("want {tip}"), format!("have {old}"));
        lines.extend([want.as_str(), have.as_str(), "done", "0000"]);
        let reply = request(
            server.addr,
            "POST",
            &format!("/{HOST}/large/git-upload-pack"),
            &[("Git-Protocol", "version=2")],
            &pkt(&lines),
        );
        assert_eq!(reply.status, 200);
        packfile(&reply.body)
    };
    let (thin, whole) = (fetch(true), fetch(false));
    eprintln!(
        "50 commits behind: thin pack {} bytes, whole {} bytes",
        thin.len(),
        whole.len()
    );
    assert!(
        thin.len() < whole.len(),
        "{} vs {}",
        thin.len(),
        whole.len()
    );
    for (pack, fix_thin) in [(&whole, false), (&thin, true)] {
        let mut args = vec!["index-pack", "--stdin", "-v"];
        if fix_thin {
            args.push("--fix-thin");
        }
        let mut child = std::process::Command::new("git")
            .current_dir(client)
            .args(&args)
            .envs(git_env())
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(pack).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stderr.contains("completed with"), fix_thin, "{stderr}");
    }
    git(client, &["update-ref", "refs/heads/main", &tip]);
    assert_fsck(client);
}

/// The ids of the objects in the pack whose index is `idx` (`git show-index`).
fn pack_objects(git_dir: &Path, idx: &Path) -> std::collections::BTreeSet<String> {
    let out = std::process::Command::new("git")
        .current_dir(git_dir)
        .arg("show-index")
        .envs(git_env())
        .stdin(std::fs::File::open(idx).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_owned))
        .collect()
}

fn idx_files(git_dir: &Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    std::fs::read_dir(git_dir.join("objects/pack"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "idx"))
        .collect()
}

/// On the walk path — a mirror the proxy created from its upstream and never maintained, so
/// without a bitmap — a fetch 50 commits behind gets a thin pack, with either protocol: deltas
/// against the client's version of each path, also for the objects the mirror holds whole (an
/// upstream repacked by git keeps the newest version of a file whole). git's client completes
/// it (`index-pack --fix-thin` appends the bases, objects the client had) and `fsck --strict`
/// passes. The pack is smaller than the same answer without `thin-pack`, and no larger than
/// 1.2x what git's own upload-pack sends.
#[test]
fn walk_path_fetches_get_thin_packs_against_the_clients_versions() {
    let up = upstream::Upstream::start();
    let upstream_dir = up.add_fixture("o/large", "large");
    git(&upstream_dir, &["repack", "-a", "-d", "-f", "-q"]);
    let server = Server::in_front_of(&up, move |c| {
        c.sync_stale_after = std::time::Duration::from_secs(3600).into();
        c.pack_cache_max_size = bytesize::ByteSize::b(0);
        c.maintenance_pack_threshold = 0;
    });
    let url = server.url_for(&up.segment(), "o/large");
    let (tip, old) = (
        git(&upstream_dir, &["rev-parse", "main"]).trim().to_owned(),
        git(&upstream_dir, &["rev-parse", "main~50"])
            .trim()
            .to_owned(),
    );
    for v in PROTOCOLS {
        let work = tempfile::tempdir().unwrap();
        let client = work.path();
        git(client, &["init", "-q", "--bare"]);
        // The first request creates the mirror.
        git(
            client,
            &["fetch", "-q", &url, &format!("{old}:refs/heads/main")],
        );
        let before = idx_files(client);
        let had: std::collections::BTreeSet<String> = before
            .iter()
            .flat_map(|idx| pack_objects(client, idx))
            .collect();
        // Kept as a pack, however few the objects.
        git(
            client,
            &args(
                &[
                    "-c",
                    "fetch.unpackLimit=1",
                    "fetch",
                    "-q",
                    &url,
                    "+main:refs/heads/main",
                ],
                &proto(v),
            ),
        );
        assert_eq!(git(client, &["rev-parse", "main"]).trim(), tip, "v{v}");
        assert_fsck(client);
        let fetched: Vec<_> = idx_files(client).difference(&before).cloned().collect();
        assert_eq!(fetched.len(), 1, "v{v}: one pack kept");
        let appended = pack_objects(client, &fetched[0]).intersection(&had).count();
        eprintln!("v{v}: index-pack --fix-thin appended {appended} bases");
        assert!(appended > 0, "v{v}: the pack was not thin");
    }
    let mirror = server
        .mirror
        .path()
        .join(up.segment())
        .join("o/large.git/objects/pack");
    assert!(
        !std::fs::read_dir(&mirror).unwrap().any(|e| e
            .unwrap()
            .path()
            .extension()
            .is_some_and(|x| x == "bitmap")),
        "the walk path: no bitmap"
    );

    let body = |thin: bool| {
        let mut lines = vec!["command=fetch", "0001", "ofs-delta", "no-progress"];
        if thin {
            lines.push("thin-pack");
        }
        let (want, have) = (format!("want {tip}"), format!("have {old}"));
        lines.extend([want.as_str(), have.as_str(), "done", "0000"]);
        pkt(&lines)
    };
    let ours = |thin: bool| {
        let reply = request(
            server.addr,
            "POST",
            &format!("/{}/o/large/git-upload-pack", up.segment()),
            &[("Git-Protocol", "version=2")],
            &body(thin),
        );
        assert_eq!(reply.status, 200);
        packfile(&reply.body).len()
    };
    let mut upload_pack = std::process::Command::new("git")
        .args(["upload-pack", "--stateless-rpc"])
        .arg(&upstream_dir)
        .envs(git_env())
        .env("GIT_PROTOCOL", "version=2")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    upload_pack
        .stdin
        .take()
        .unwrap()
        .write_all(&body(true))
        .unwrap();
    let out = upload_pack.wait_with_output().unwrap();
    assert!(out.status.success());
    let (thin, whole, gits) = (ours(true), ours(false), packfile(&out.stdout).len());
    eprintln!("50 commits behind: thin {thin} bytes, without thin-pack {whole}, git {gits}");
    assert!(thin < whole, "{thin} vs {whole}");
    assert!(thin * 10 <= gits * 12, "{thin} vs git's {gits}");
}
