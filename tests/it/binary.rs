//! The real binary, started as the README says, serves a clone.

use crate::common;

use std::process::Command;

use common::*;

#[test]
fn the_binary_serves_a_clone() {
    let (mirror, repo_dir) = seeded_mirror("basic");
    let running = Running::start(
        mirror.path(),
        &[("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")],
    );
    let addr = running.addr.clone();
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/127.0.0.1:9/basic");
    git(work.path(), &["clone", "-q", &url, "c"]);
    assert_fsck(&work.path().join("c/.git"));
    assert_eq!(
        git(&work.path().join("c"), &["rev-parse", "HEAD"]),
        git(&repo_dir, &["rev-parse", "main"])
    );
    drop(running);
}

/// The README's GitHub Actions example: `url.<proxy>.insteadOf` from the environment
/// (`GIT_CONFIG_COUNT`), no configuration file, routes a clone of the upstream's URL through
/// the proxy (here the upstream refuses connections: only the proxy's mirror can answer).
#[test]
fn insteadof_from_the_environment_routes_clones_through_the_proxy() {
    let (mirror, repo_dir) = seeded_mirror("basic");
    let running = Running::start(
        mirror.path(),
        &[("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")],
    );
    let work = tempfile::tempdir().unwrap();
    let key = format!("url.http://{}/127.0.0.1:9/.insteadOf", running.addr);
    let out = git_output(
        work.path(),
        &["clone", "-q", "http://127.0.0.1:9/basic", "c"],
        &[
            ("GIT_CONFIG_COUNT", "1"),
            ("GIT_CONFIG_KEY_0", &key),
            ("GIT_CONFIG_VALUE_0", "http://127.0.0.1:9/"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        git(&work.path().join("c"), &["rev-parse", "HEAD"]),
        git(&repo_dir, &["rev-parse", "main"])
    );
}

#[test]
fn an_invalid_configuration_exits_with_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("LISTEN_ADDR", "nowhere")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LISTEN_ADDR 'nowhere'"));
}

#[test]
fn maintain_consolidates_mirrors_and_reports_failures() {
    let (mirror, repo_dir) = seeded_mirror("basic");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", mirror.path())
            .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
            .args(args)
            .output()
            .unwrap()
    };
    let before = refs(&repo_dir);
    let out = run(&["maintain", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("127.0.0.1:9/basic.git: 2 packs -> 1"),
        "{stdout}"
    );
    assert_eq!(refs(&repo_dir), before);
    assert_fsck(&repo_dir);
    let out = run(&["maintain", "--repo", "127.0.0.1:9/basic"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["maintain", "--repo", "127.0.0.1:9/missing"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no mirror of 127.0.0.1:9/missing"));
}

#[test]
fn bad_settings_exit_with_usage_error_naming_the_variable() {
    let file = tempfile::NamedTempFile::new().unwrap();
    for (key, value, says) in [
        ("SYNC_STALE_AFTER", "banana", "<SYNC_STALE_AFTER>"),
        ("LOG_LEVEL", "verbose", "LOG_LEVEL 'verbose'"),
        ("ALLOWED_UPSTREAMS", "", "ALLOWED_UPSTREAMS is empty"),
        ("LFS_CACHE_MAX_SIZE", "lots", "<LFS_CACHE_MAX_SIZE>"),
        ("LFS_URL_KEY", " ", "LFS_URL_KEY is empty"),
        (
            "MIRROR_DIR",
            file.path().to_str().unwrap(),
            "not a directory",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env(key, value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}={value}: {stderr}");
        assert!(stderr.contains(says), "{key}={value}: {stderr}");
    }
}

/// Issue 21, item 4: `MIRROR_MAX_SIZE=80`, meant as `80%`, was 80 bytes. Every size setting
/// needs a unit, as `SYNC_STALE_AFTER` does; `0` needs none.
#[test]
fn a_size_without_a_unit_is_refused_naming_the_variable() {
    let mirror = tempfile::tempdir().unwrap();
    let sizes = [
        "MAX_REQUEST_BODY",
        "MAX_BUFFERED_BODIES",
        "MAX_BUFFERED_BODIES_PER_CLIENT",
        "PACK_CACHE_MAX_SIZE",
        "LFS_CACHE_MAX_SIZE",
        "MIRROR_MAX_SIZE",
        "PACK_MEMORY_BUDGET",
        "SNAPSHOT_MEMORY",
    ];
    // Every setting whose default is a size is in the list.
    let help = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for option in help.split("[env: ").skip(1) {
        let name: String = option
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        let default = option.split("[default: ").nth(1).unwrap_or("");
        let default = &default[..default.find(']').unwrap_or(0)];
        if default.ends_with("iB") {
            assert!(sizes.contains(&name.as_str()), "{name} is a size");
        }
    }
    for key in sizes {
        let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", mirror.path())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env(key, "80")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{key}=80: {stderr}");
        assert!(
            stderr.contains(&format!("<{key}>")) && stderr.contains("size unit needed"),
            "{key}=80: {stderr}"
        );
    }
}

#[test]
fn a_second_server_on_the_same_mirror_dir_refuses_to_start() {
    let (mirror, _) = seeded_mirror("basic");
    let first = Running::start(
        mirror.path(),
        &[("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror.path())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is already served by another smart-git-proxy")
            && stderr.contains(&format!("pid {}", first.child.id()))
            && stderr.contains(".smart-git-proxy.lock"),
        "{stderr}"
    );
    drop(first);
    // Once it is gone, the lock is free.
    let second = Running::start(
        mirror.path(),
        &[("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")],
    );
    drop(second);
}

#[test]
fn json_logs_are_json_and_each_request_is_a_line() {
    use std::io::{BufRead, BufReader};
    let (mirror, _) = seeded_mirror("basic");
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", mirror.path())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
            .env("LOG_FORMAT", "json")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stderr.take().unwrap()).lines();
    let mut next = || -> serde_json::Value {
        let line = lines.next().expect("a log line").unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    let addr = loop {
        let v = next();
        if v["fields"]["message"] == "listening" {
            break v["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };
    let work = tempfile::tempdir().unwrap();
    git(
        work.path(),
        &[
            "clone",
            "-q",
            &format!("http://{addr}/127.0.0.1:9/basic"),
            "c",
        ],
    );
    // The adopted mirror is synced first; its upstream (the discard port) refuses. Then each
    // request of the clone (v2: info/refs, ls-refs, fetch) logs one line, the pack's last.
    let mut sync_reason = None;
    let mut answered = Vec::new();
    loop {
        let v = next();
        if v["fields"]["message"] == "sync failed, serving the existing mirror" {
            sync_reason = Some(v["fields"]["reason"].clone());
        }
        if v["fields"]["message"] == "answered" {
            plain_fields(&v);
            answered.push(v);
            if answered.last().unwrap()["fields"]["outcome"]
                .as_str()
                .is_some_and(|o| o.ends_with("/pack"))
            {
                break;
            }
        }
    }
    assert_eq!(sync_reason, Some(serde_json::json!("stale")));
    let [refs, listing, pack] = &answered[..] else {
        panic!("one line per request: {answered:#?}");
    };
    for v in &answered {
        assert_eq!(v["fields"]["status"], 200, "{v}");
        assert!(v["fields"]["duration_ms"].is_u64(), "{v}");
        let span = &v["span"];
        assert_eq!(span["client"], "127.0.0.1", "{v}");
        assert!(span["agent"].as_str().unwrap().starts_with("git/"), "{v}");
        assert_eq!(span["repo"], "127.0.0.1:9/basic", "{v}");
    }
    assert_eq!(refs["fields"]["proxy_status"], "stale", "{refs}");
    assert_eq!(refs["fields"]["outcome"], "stale/capabilities", "{refs}");
    assert!(
        listing["fields"]["outcome"]
            .as_str()
            .is_some_and(|o| o.ends_with("/refs")),
        "{listing}"
    );
    assert!(listing["fields"]["refs"].as_u64() > Some(0), "{listing}");
    assert!(pack["fields"]["objects"].as_u64() > Some(0), "{pack}");
    assert!(pack["fields"]["bytes"].as_u64() > Some(0), "{pack}");

    // A 502 is one line, with its cause; tower_http does not log it again.
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let reply = request(
        addr,
        "GET",
        "/127.0.0.1:9/absent/info/refs?service=git-upload-pack",
        &[],
        b"",
    );
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(request(addr, "GET", "/healthz", &[], b"").status, 200);
    let mut lines_502 = Vec::new();
    loop {
        let v = next();
        assert_ne!(v["target"], "tower_http::trace::on_failure", "{v}");
        if v["fields"]["message"] == "answered" {
            plain_fields(&v);
            if v["span"]["path"] == "/healthz" {
                break;
            }
            lines_502.push(v);
        }
    }
    let [bad] = &lines_502[..] else {
        panic!("a 502 is logged once: {lines_502:#?}");
    };
    assert_eq!(bad["fields"]["status"], 502, "{bad}");
    assert_eq!(bad["level"], "WARN", "{bad}");
    assert_eq!(bad["fields"]["outcome"], "upstream", "{bad}");
    assert!(
        bad["fields"]["cause"]
            .as_str()
            .is_some_and(|c| c.contains("127.0.0.1:9")),
        "{bad}"
    );
    drop(child);
}

/// A request line's fields are plain values: numbers, or text without Rust debug output.
fn plain_fields(line: &serde_json::Value) {
    for (name, value) in line["fields"].as_object().unwrap() {
        if let Some(text) = value.as_str() {
            assert!(
                !text.contains(" { ") && !text.starts_with('['),
                "{name} is debug output: {line}"
            );
        }
    }
}

/// SIGTERM lets an answer in flight finish: the pack arrives whole, then the process exits 0.
#[test]
fn sigterm_lets_a_clone_in_flight_finish() {
    use std::io::Read;
    let (mirror, repo_dir) = seeded_mirror("large");
    let mut running = Running::start(
        mirror.path(),
        &[
            ("ALLOWED_UPSTREAMS", "http://127.0.0.1:9"),
            ("PACK_CACHE_MAX_SIZE", "0"),
        ],
    );
    let tip = git(&repo_dir, &["rev-parse", "main"]);
    let (mut s, mut answer) = running.answer_in_flight(&tip);
    running.terminate();
    s.read_to_end(&mut answer).unwrap();
    let status = running.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // The whole answer came: its last chunk ends with the flush packet after the pack, and the
    // chunked body is terminated (not cut off).
    let end = String::from_utf8_lossy(&answer[answer.len() - 12..]).into_owned();
    assert!(end.ends_with("0000\r\n0\r\n\r\n"), "{end:?}");
    let first = answer
        .windows(4)
        .position(|w| w == b"PACK")
        .expect("a pack");
    assert!(
        answer.len() - first > 1_000_000,
        "{} bytes",
        answer.len() - first
    );
}

/// At SIGTERM the listener closes: new connections are refused at once (a load balancer's
/// health check fails, so it routes elsewhere) while an answer in flight finishes; an idle
/// connection opened before is closed or answered `503 draining`, never `ready`.
#[test]
fn sigterm_closes_the_listener_while_answers_finish() {
    use std::io::{Read, Write};
    let (mirror, repo_dir) = seeded_mirror("large");
    let mut running = Running::start(
        mirror.path(),
        &[
            ("ALLOWED_UPSTREAMS", "http://127.0.0.1:9"),
            ("PACK_CACHE_MAX_SIZE", "0"),
        ],
    );
    let addr: std::net::SocketAddr = running.addr.parse().unwrap();
    assert_eq!(request(addr, "GET", "/readyz", &[], b"").status, 200);
    let tip = git(&repo_dir, &["rev-parse", "main"]);
    let (mut busy, mut answer) = running.answer_in_flight(&tip);
    // A keep-alive connection, idle when the signal comes.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");

    running.terminate();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the listener is still open after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The idle connection: closed, or told that the server is draining.
    let mut rest = Vec::new();
    let _ = idle.read(&mut vec![0u8; 4096]);
    let asked = write!(idle, "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n").is_ok();
    if asked {
        let _ = idle.read_to_end(&mut rest);
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || rest.starts_with("HTTP/1.1 503"),
        "{rest}"
    );
    // The answer in flight still arrives whole.
    busy.read_to_end(&mut answer).unwrap();
    assert!(running.child.wait().unwrap().success());
    let end = String::from_utf8_lossy(&answer[answer.len() - 12..]).into_owned();
    assert!(end.ends_with("0000\r\n0\r\n\r\n"), "{end:?}");
}

/// `GET /healthz` on the binary at `addr`: answered only once the server serves, after its
/// start-up clean-up.
fn healthz(addr: &str) -> u16 {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    request(addr, "GET", "/healthz", &[], b"").status
}

/// The files named `.tmp*` in the mirror's pack and info directories.
fn temporaries(repo_dir: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    for sub in ["objects/pack", "objects/info"] {
        if let Ok(entries) = std::fs::read_dir(repo_dir.join(sub)) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".tmp") {
                    found.push(format!("{sub}/{name}"));
                }
            }
        }
    }
    found.sort();
    found
}

/// Issue 19, defect 5: a server that starts while `smart-git-proxy maintain` works on a mirror
/// leaves maintenance's temporary pack alone (maintenance holds the mirror's lock, as here);
/// once nobody holds it, a start removes such files, which only a killed run leaves.
#[test]
fn a_server_started_during_maintenance_keeps_its_temporary_pack() {
    let (mirror, repo_dir) = seeded_mirror("basic");
    let pack = repo_dir.join("objects/pack/.tmp-maintenance-4242.pack");
    let maintenance = smart_git_proxy::mirror::maintain::lock(&repo_dir).unwrap();
    std::fs::write(&pack, vec![0u8; 1 << 20]).unwrap();
    let env = [("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")];
    let running = Running::start(mirror.path(), &env);
    assert_eq!(healthz(&running.addr), 200);
    assert!(pack.exists(), "the start removed maintenance's pack");
    drop(running);
    drop(maintenance);
    let running = Running::start(mirror.path(), &env);
    assert_eq!(healthz(&running.addr), 200);
    assert_eq!(temporaries(&repo_dir), Vec::<String>::new());
    assert_fsck(&repo_dir);
}

/// Issue 19: `maintain` killed with SIGKILL while it writes its pack leaves the temporary file
/// behind (as large as the pack); the next `maintain` of the mirror removes it under the
/// mirror's lock and succeeds.
#[test]
fn a_killed_maintain_leaves_temporaries_that_the_next_run_removes() {
    let (mirror, repo_dir) = seeded_mirror("large");
    let maintain = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"));
        command
            .env("MIRROR_DIR", mirror.path())
            .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
            .args(["maintain", "--repo", "127.0.0.1:9/large"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command
    };
    // The kill lands while a temporary exists; a run that ends first (a fast machine), or
    // removes its temporary between the look and the kill, is tried again.
    let mut left = Vec::new();
    for _ in 0..10 {
        let mut child = Killed(maintain().spawn().unwrap());
        loop {
            if !temporaries(&repo_dir).is_empty() {
                child.0.kill().unwrap();
                child.0.wait().unwrap();
                left = temporaries(&repo_dir);
                break;
            }
            if child.0.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if !left.is_empty() {
            break;
        }
    }
    assert!(!left.is_empty(), "no run was caught writing its pack");
    eprintln!("left by the killed run: {left:?}");
    let out = maintain().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(temporaries(&repo_dir), Vec::<String>::new());
    assert_fsck(&repo_dir);
}

/// The binary with `env` (and `args`), on an empty mirror directory, as a command.
fn binary(
    mirror_dir: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror_dir)
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

/// Issue 21, item 5: a setting that does nothing with the others is refused at start, with a
/// message that names both; an empty one (a line of the env file left empty) is as unset.
#[test]
fn settings_that_do_nothing_are_refused_naming_both() {
    let mirror = tempfile::tempdir().unwrap();
    let local = ("ALLOWED_UPSTREAMS", "http://127.0.0.1:9");
    // The settings, and what the refusal says.
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case] = &[
        (
            &[("STATIC_TOKEN", "t0ken")],
            &["STATIC_TOKEN does nothing with AUTH_MODE=none"],
        ),
        (
            &[
                ("STATIC_TOKEN_HOSTS", "github.com"),
                ("AUTH_MODE", "pass-through"),
            ],
            &["STATIC_TOKEN_HOSTS does nothing with AUTH_MODE=pass-through"],
        ),
        (
            &[("AUTH_CACHE_TTL", "5m")],
            &[
                "AUTH_CACHE_TTL does nothing with AUTH_MODE=none",
                "AUTH_MODE=pass-through",
            ],
        ),
        (
            &[local, ("AUTH_MODE", "static"), ("STATIC_TOKEN", "t0ken")],
            &[
                "STATIC_TOKEN_HOSTS entry 'github.com' (the default) does nothing with \
                 AUTH_MODE=static: github.com is not in ALLOWED_UPSTREAMS (127.0.0.1:9)",
            ],
        ),
        (
            &[
                local,
                ("AUTH_MODE", "static"),
                ("STATIC_TOKEN", "t0ken"),
                ("STATIC_TOKEN_HOSTS", "127.0.0.1:9"),
            ],
            &["only if the entry is written http://127.0.0.1:9"],
        ),
        (
            &[("PREWARM_REFS", "HEAD"), ("PACK_CACHE_MAX_SIZE", "0")],
            &["PREWARM_REFS does nothing with PACK_CACHE_MAX_SIZE=0"],
        ),
        (
            &[("BALANCER_URL", "http://127.0.0.1:9"), ("ADMIN_TOKEN", "a")],
            &["BALANCER_URL does nothing without WEBHOOK_SECRET"],
        ),
        (
            &[("MAX_CONCURRENT_SYNCS_PER_HOST", "9")],
            &["MAX_CONCURRENT_SYNCS_PER_HOST=9 does nothing beyond MAX_CONCURRENT_SYNCS=4"],
        ),
    ];
    for (env, says) in cases {
        let out = binary(mirror.path(), env, &["mirrors"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{env:?}: {stderr}");
        for said in *says {
            assert!(stderr.contains(said), "{env:?}: {stderr}");
        }
        assert!(!stderr.contains("t0ken"), "a secret printed: {stderr}");
    }
    // Accepted: the same settings where they act, and empty ones.
    let accepted: &[&[(&str, &str)]] = &[
        &[("STATIC_TOKEN", ""), ("STATIC_TOKEN_HOSTS", "")],
        &[("AUTH_MODE", "pass-through"), ("AUTH_CACHE_TTL", "5m")],
        &[
            local,
            ("AUTH_MODE", "static"),
            ("STATIC_TOKEN", "t0ken"),
            ("STATIC_TOKEN_HOSTS", "http://127.0.0.1:9"),
        ],
        &[("PREWARM_REFS", ""), ("PACK_CACHE_MAX_SIZE", "0")],
    ];
    for env in accepted {
        let out = binary(mirror.path(), env, &["mirrors"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{env:?}: {stderr}");
    }
}

/// Issue 21, item 5: the start-up line gives the configuration in effect, and no secret.
#[test]
fn the_listening_line_gives_the_configuration_in_effect() {
    use std::io::{BufRead, BufReader};
    let mirror = tempfile::tempdir().unwrap();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
            .env("MIRROR_DIR", mirror.path())
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ALLOWED_UPSTREAMS", "github.com, http://127.0.0.1:9")
            .env("AUTH_MODE", "static")
            .env("STATIC_TOKEN", "s3cret-static")
            .env("ADMIN_TOKEN", "s3cret-admin")
            .env("MIRROR_MAX_SIZE", "80%")
            .env("MAX_CONCURRENT_PACKS", "3")
            .env("LOG_FORMAT", "json")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = BufReader::new(child.0.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("\"listening\""))
        .expect("a listening line");
    drop(child);
    assert!(!line.contains("s3cret"), "{line}");
    let fields: serde_json::Value = serde_json::from_str(&line).unwrap();
    let fields = &fields["fields"];
    assert_eq!(fields["mirror_dir"], mirror.path().display().to_string());
    assert_eq!(fields["upstreams"], "https://github.com,http://127.0.0.1:9");
    assert_eq!(fields["auth_mode"], "static");
    assert_eq!(fields["static_token_to"], "github.com");
    assert_eq!(fields["admin_api"], true);
    assert_eq!(fields["webhooks"], false);
    assert_eq!(fields["parent_proxy"], "none");
    assert_eq!(fields["mirror_max_size"], "80%");
    assert_eq!(fields["pack_cache_max_size"], "10.0GiB");
    assert_eq!(fields["max_concurrent_packs"], 3);
    assert_eq!(fields["max_connections"], 4096);
    assert_eq!(fields["sync_stale_after"], "2s");
}

/// Issue 21, item 7: one convention for the commands — status 64 and `error: …` for what
/// cannot be used, nothing done; `--mirror-dir` as for the server; counted nouns in the
/// singular for one.
#[test]
fn the_commands_share_one_error_style_and_exit_codes() {
    let (mirror, _) = seeded_mirror("basic");
    let local = [("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")];
    let elsewhere = tempfile::tempdir().unwrap();
    let out = binary(elsewhere.path(), &local, &["maintain"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("--repo") && stderr.contains("--all"),
        "{stderr}"
    );

    // `--mirror-dir` after the command, as for the server; it wins over MIRROR_DIR.
    let dir = mirror.path().to_str().unwrap();
    let out = binary(elsewhere.path(), &local, &["mirrors", "--mirror-dir", dir]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("127.0.0.1:9/basic"), "{stdout}");
    assert!(stdout.contains("\n1 mirror, "), "{stdout}");

    let missing = elsewhere.path().join("nowhere");
    let missing = missing.to_str().unwrap();
    for args in [
        vec!["mirrors", "--mirror-dir", missing],
        vec!["maintain", "--all", "--mirror-dir", missing],
    ] {
        let out = binary(elsewhere.path(), &local, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("error: MIRROR_DIR ") && stderr.contains(missing),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing printed as a list");
    }

    let out = binary(
        mirror.path(),
        &local,
        &["maintain", "--repo", "127.0.0.1:9/missing"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("error: no mirror of 127.0.0.1:9/missing"),
        "{stderr}"
    );
    let out = binary(
        mirror.path(),
        &local,
        &["maintain", "--all", "--repo", "x/y"],
    );
    assert_eq!(out.status.code(), Some(64));
}

/// Issue 21, item 7: `--help` starts with the settings everyone sets.
#[test]
fn help_puts_the_main_settings_first() {
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let first: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .take(4)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect()
        })
        .collect();
    assert_eq!(
        first,
        [
            "ALLOWED_UPSTREAMS",
            "MIRROR_DIR",
            "LISTEN_ADDR",
            "AUTH_MODE"
        ],
        "{help}"
    );
    assert!(help.contains("Main settings:"), "{help}");
    assert!(help.contains("Exit status: 0"), "{help}");
}

/// Issue 21, item 9: SIGTERM during a first clone. The listener is closed, so the client that
/// waits for the mirror cannot come back for its pack: the creation is stopped, the client is
/// told the server is shutting down, and the log says what the server waits for, not that the
/// client went away.
#[test]
fn sigterm_stops_a_mirror_creation_no_client_can_use() {
    let up = upstream::Upstream::start();
    up.add_fixture("o/r", "basic");
    // Each upstream request waits: the creation is still listing when SIGTERM comes.
    up.set_mode(upstream::Mode::Slow(std::time::Duration::from_secs(2)));
    let segment = up.segment();
    let mut server = JsonLogged::start(&up);
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{}/{segment}/o/r", server.addr);
    let clone = std::thread::spawn({
        let dir = work.path().to_owned();
        move || git_output(&dir, &["clone", &url, "c"], &[])
    });
    wait_until("the creation reaches the upstream", || !up.log().is_empty());
    let pid = server.child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = server.child.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let out = clone.join().unwrap();
    assert!(!out.status.success(), "the clone cannot have a pack");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server is shutting down"), "{stderr}");
    let logged = server.lines();
    let messages: Vec<&str> = logged
        .iter()
        .filter_map(|v| v["fields"]["message"].as_str())
        .collect();
    assert!(
        messages.contains(&"shutting down: waiting for 1 request"),
        "{messages:?}"
    );
    assert!(
        messages.contains(&"shutting down: stopping mirror creations no request can use"),
        "{messages:?}"
    );
    let answered: Vec<_> = logged
        .iter()
        .filter(|v| v["fields"]["message"] == "answered")
        .collect();
    let [line] = &answered[..] else {
        panic!("{answered:#?}");
    };
    assert_eq!(line["fields"]["status"], 503, "{line}");
    assert_eq!(line["fields"]["outcome"], "shutting-down", "{line}");
    assert!(
        !logged
            .iter()
            .any(|v| v["fields"]["outcome"] == "client-gone"),
        "{logged:#?}"
    );
    // The creation left no mirror behind.
    assert!(
        !server.mirror.path().join(&segment).join("o/r.git").exists(),
        "the creation was finished"
    );
}

/// A `User-Agent` is the client's text: in the text log it is quoted, so that it cannot add
/// fields (`outcome=...`) or end the line's fields early.
#[test]
fn user_agents_cannot_forge_log_fields() {
    use std::io::{BufRead, BufReader};
    let mirror = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .env("MIRROR_DIR", mirror.path())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("ALLOWED_UPSTREAMS", "http://127.0.0.1:9")
        .env("LOG_FORMAT", "text")
        .env("LOG_LEVEL", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let addr = lines
        .by_ref()
        .find_map(|l| {
            l.split("addr=")
                .nth(1)
                .and_then(|a| a.split_whitespace().next())
                .map(str::to_owned)
        })
        .expect("the server logs its address");
    let forged = r#"evil" repo="victim/repo" outcome=ok x="#;
    let r = request(
        addr.parse().unwrap(),
        "GET",
        "/healthz",
        &[("User-Agent", forged)],
        b"",
    );
    assert_eq!(r.status, 200);
    let answered = lines
        .find(|l| l.contains("answered"))
        .expect("the request is logged");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        answered.contains(r#"agent="evil\" repo=\"victim/repo\" outcome=ok x=""#),
        "{answered}"
    );
}

/// Issue 21 (3): a mirror's creation is logged when it starts, and then what it received every
/// few seconds, at INFO.
#[test]
fn a_creation_logs_its_start_and_its_progress() {
    let up = upstream::Upstream::start();
    up.add_fixture("slow/r", "basic");
    // Over 10 s of pack: at least one progress line, 5 s apart.
    up.throttle("/slow/", 1024, std::time::Duration::from_millis(150));
    let server = JsonLogged::start(&up);
    let work = tempfile::tempdir().unwrap();
    let url = format!("http://{}/{}/slow/r", server.addr, up.segment());
    git(work.path(), &["clone", "-q", "--bare", &url, "c"]);
    let creating: Vec<serde_json::Value> = server
        .lines()
        .into_iter()
        .filter(|v| v["fields"]["message"] == "creating the mirror")
        .collect();
    assert!(
        creating.len() >= 2,
        "a start and a progress line: {creating:?}"
    );
    assert_eq!(creating[0]["level"], "INFO");
    assert!(creating[0]["fields"]["received"].is_null(), "{creating:?}");
    let received = creating[1]["fields"]["received"]
        .as_str()
        .unwrap_or_default();
    assert!(received.contains("objects, "), "{creating:?}");
}

/// The real binary, serving `up` from a fresh mirror directory with its JSON log in a file,
/// once it listens.
struct JsonLogged {
    child: Killed,
    log: tempfile::NamedTempFile,
    addr: String,
    mirror: tempfile::TempDir,
}

impl JsonLogged {
    fn start(up: &upstream::Upstream) -> Self {
        let mirror = tempfile::tempdir().unwrap();
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Killed(
            Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
                .env("MIRROR_DIR", mirror.path())
                .env("LISTEN_ADDR", "127.0.0.1:0")
                .env("ALLOWED_UPSTREAMS", up.allowed())
                .env("LOG_FORMAT", "json")
                .stderr(std::process::Stdio::from(log.reopen().unwrap()))
                .spawn()
                .unwrap(),
        );
        let mut server = JsonLogged {
            child,
            log,
            addr: String::new(),
            mirror,
        };
        wait_until("the server listens", || {
            server.addr = server
                .lines()
                .into_iter()
                .find(|v| v["fields"]["message"] == "listening")
                .and_then(|v| v["fields"]["addr"].as_str().map(str::to_owned))
                .unwrap_or_default();
            !server.addr.is_empty()
        });
        server
    }

    /// The log's lines so far.
    fn lines(&self) -> Vec<serde_json::Value> {
        use std::io::{BufRead, BufReader};
        BufReader::new(self.log.reopen().unwrap())
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}
