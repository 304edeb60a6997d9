//! What an operator installs: the systemd unit (checked by `systemd-analyze verify` where it is
//! installed) and the env file, which, like `docs/configuration.md`, names every setting.

use std::process::Command;

/// The name of an environment variable at the start of `text` (what follows `[env: ` in
/// `--help`).
fn env_name(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
        .collect()
}

/// The settings `--help` lists (their environment variables), under the heading it gives
/// them (`Main settings:` and the like), in its order.
fn help_groups() -> Vec<(String, Vec<String>)> {
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for line in help.lines() {
        // Headings start in the first column; options and their help are indented.
        if let Some(heading) = line.strip_suffix(':').filter(|_| !line.starts_with(' ')) {
            groups.push((heading.to_owned(), Vec::new()));
        }
        if let Some((_, rest)) = line.split_once("[env: ") {
            let (_, names) = groups.last_mut().expect("a heading above every option");
            names.push(env_name(rest));
        }
    }
    groups.retain(|(_, names)| !names.is_empty());
    groups
}

/// The settings the binary reads from the environment, from `--help`.
fn settings() -> Vec<String> {
    let names: Vec<String> = help_groups()
        .into_iter()
        .flat_map(|(_, names)| names)
        .collect();
    assert!(names.len() > 30, "{names:?}");
    names
}

/// The settings `docs/configuration.md` documents (the first cell of a table row,
/// `` | `NAME` | ``), under its `## ` headings, in its order.
fn documented_groups() -> Vec<(String, Vec<String>)> {
    let root = env!("CARGO_MANIFEST_DIR");
    let doc = std::fs::read_to_string(format!("{root}/docs/configuration.md")).unwrap();
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for line in doc.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            groups.push((heading.to_owned(), Vec::new()));
        } else if let Some(cell) = line.strip_prefix("| `") {
            let name = env_name(cell);
            if !name.is_empty() && cell[name.len()..].starts_with("` |") {
                let (_, names) = groups.last_mut().expect("a heading above every table");
                names.push(name);
            }
        }
    }
    groups.retain(|(_, names)| !names.is_empty());
    groups
}

/// Each setting of `--help` with its default (empty when it has none), in `--help`'s order.
fn help_defaults() -> Vec<(String, String)> {
    let mut help = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"));
    help.arg("--help");
    // `--help` shows the values set in the environment: none here.
    for name in settings() {
        help.env_remove(name);
    }
    let help = String::from_utf8(help.output().unwrap().stdout).unwrap();
    // An option is the text from its flag (`--listen-addr <LISTEN_ADDR>`) to the next one.
    let options: Vec<&str> = help.split("\n      --").skip(1).collect();
    let defaults: Vec<(String, String)> = options
        .iter()
        .filter_map(|option| {
            let name = env_name(option.split("[env: ").nth(1)?);
            let default = option
                .split("[default: ")
                .nth(1)
                .and_then(|d| d.split(']').next())
                .unwrap_or("");
            // An empty default is shown as `""`.
            Some((name, default.trim_matches('"').to_owned()))
        })
        .collect();
    assert_eq!(defaults.len(), settings().len(), "{help}");
    defaults
}

#[test]
fn every_setting_is_in_the_env_file() {
    let root = env!("CARGO_MANIFEST_DIR");
    let env = std::fs::read_to_string(format!("{root}/scripts/env.example")).unwrap();
    for name in settings() {
        assert!(
            env.contains(&format!("\n#{name}=")),
            "env.example lacks {name}"
        );
    }
}

/// Issue 20, item 6: the configuration reference and `--help` name the same settings, and the
/// reference groups them under `--help`'s headings, in its order.
#[test]
fn the_configuration_reference_documents_every_setting_under_its_help_heading() {
    let help = help_groups();
    let documented = documented_groups();
    let listed = |groups: &[(String, Vec<String>)]| -> Vec<String> {
        groups.iter().flat_map(|(_, names)| names.clone()).collect()
    };
    let (help_names, documented_names) = (listed(&help), listed(&documented));
    for name in &help_names {
        assert!(
            documented_names.contains(name),
            "docs/configuration.md lacks {name}"
        );
    }
    for name in &documented_names {
        assert!(
            help_names.contains(name),
            "docs/configuration.md documents {name}, which --help does not list"
        );
    }
    assert_eq!(
        documented, help,
        "docs/configuration.md's headings and order are --help's"
    );
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("skipped: systemd-analyze is not installed");
        return;
    };
    assert!(probe.status.success());
    let root = env!("CARGO_MANIFEST_DIR");
    let unit = std::fs::read_to_string(format!("{root}/scripts/smart-git-proxy.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=smart-git-proxy",
        "EnvironmentFile=-/etc/smart-git-proxy/env",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        // Issue 23: how a secret comes from a file only the service reads.
        "#LoadCredential=static-token:",
        "#Environment=STATIC_TOKEN_FILE=%d/static-token",
    ] {
        assert!(unit.contains(needed), "{needed}");
    }
    // Verified as installed, but with ExecStart pointing at the binary this build made.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smart-git-proxy.service");
    let unit = unit.replace(
        "ExecStart=/usr/bin/smart-git-proxy",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_smart-git-proxy")),
    );
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}

/// The package's metadata, checked without cargo-deb (which CI does not install; the test
/// below builds the package where it is): every asset but the built binary exists, and the
/// unit and the env file are among them.
#[test]
fn the_debian_package_metadata_names_existing_files() {
    let root = env!("CARGO_MANIFEST_DIR");
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    let deb = manifest
        .split("[package.metadata.deb]")
        .nth(1)
        .expect("deb metadata")
        .split("\n[")
        .next()
        .unwrap();
    let sources: Vec<&str> = deb
        .lines()
        .filter_map(|l| l.trim().strip_prefix("[\"")?.split('"').next())
        .collect();
    for needed in [
        "target/release/smart-git-proxy",
        "scripts/smart-git-proxy.service",
        "scripts/env.example",
        "LICENSE",
    ] {
        assert!(
            sources.contains(&needed),
            "{needed} not packaged: {sources:?}"
        );
    }
    for source in sources.iter().filter(|s| !s.starts_with("target/")) {
        assert!(
            std::path::Path::new(root).join(source).is_file(),
            "{source}"
        );
    }
    assert!(deb.contains("conf-files = [\"/etc/smart-git-proxy/env\"]"));
    assert!(deb.contains("maintainer-scripts = \"debian/\""));
    for script in ["postinst", "prerm", "postrm"] {
        let path = std::path::Path::new(root).join("debian").join(script);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o111 != 0,
            "{script} is executable"
        );
    }
}

/// What the `.deb`'s maintainer scripts ask of `systemctl` (a stand-in that logs its
/// arguments) when dpkg runs `script` with `args`, on a machine running systemd or not.
fn systemctl_calls(script: &str, args: &[&str], systemd: bool) -> (Vec<String>, String) {
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run-systemd-system");
    if systemd {
        std::fs::create_dir(&run_dir).unwrap();
    }
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let log = dir.path().join("calls");
    let fake = bin.join("systemctl");
    std::fs::write(
        &fake,
        format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // As installed, but with systemd's run directory in the temporary directory.
    let text = std::fs::read_to_string(format!("{root}/debian/{script}")).unwrap();
    assert!(text.contains("/run/systemd/system"));
    let copy = dir.path().join(script);
    std::fs::write(
        &copy,
        text.replace("/run/systemd/system", run_dir.to_str().unwrap()),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg(&copy)
        .args(args)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{script} {args:?}: {out:?}");
    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    (
        calls.lines().map(str::to_owned).collect(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Issue 21, item 10: installing the package makes systemd read its unit and says what to do
/// next; an upgrade restarts a running service; removing it stops the service and reloads.
#[test]
fn the_maintainer_scripts_reload_systemd() {
    let (calls, said) = systemctl_calls("postinst", &["configure", ""], true);
    assert_eq!(calls, ["daemon-reload"]);
    assert!(
        said.contains("/etc/smart-git-proxy/env") && said.contains("systemctl enable --now"),
        "{said}"
    );
    let (calls, said) = systemctl_calls("postinst", &["configure", "0.1.0-1"], true);
    assert_eq!(
        calls,
        ["daemon-reload", "try-restart smart-git-proxy.service"]
    );
    assert_eq!(said, "", "an upgrade says nothing");
    let (calls, _) = systemctl_calls("postinst", &["configure", ""], false);
    assert!(calls.is_empty(), "without systemd: {calls:?}");
    let (calls, _) = systemctl_calls("prerm", &["remove"], true);
    assert_eq!(calls, ["disable --now smart-git-proxy.service"]);
    let (calls, _) = systemctl_calls("prerm", &["upgrade", "0.2.0-1"], true);
    assert!(calls.is_empty(), "an upgrade keeps it running: {calls:?}");
    for how in ["remove", "purge"] {
        let (calls, _) = systemctl_calls("postrm", &[how], true);
        assert_eq!(calls, ["daemon-reload"]);
    }
}

/// Issue 21, item 10: the env file lists the settings in `--help`'s order, each commented out
/// with the default `--help` gives (empty where it gives none).
#[test]
fn the_env_file_defaults_agree_with_help() {
    let root = env!("CARGO_MANIFEST_DIR");
    let env = std::fs::read_to_string(format!("{root}/scripts/env.example")).unwrap();
    let listed: Vec<(String, String)> = env
        .lines()
        .filter_map(|l| {
            let (name, value) = l.strip_prefix('#')?.split_once('=')?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
                .then(|| (name.to_owned(), value.to_owned()))
        })
        .collect();
    assert_eq!(listed, help_defaults());
}

/// Issue 23, item 6: `cargo deb` builds the package (when cargo-deb is installed; it builds the
/// release binary first if needed), which holds the binary, the unit and the env file, and
/// whose `Depends` names no OpenSSL: TLS is rustls.
#[test]
fn the_debian_package_builds_without_an_openssl_dependency() {
    let installed = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if !installed {
        eprintln!("skipped: cargo-deb is not installed (cargo install cargo-deb)");
        return;
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new("cargo")
        .current_dir(root)
        .args(["deb", "--output"])
        .arg(out_dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = std::fs::read_dir(out_dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let field = |name: &str| {
        let out = Command::new("dpkg-deb")
            .arg("--field")
            .arg(&deb)
            .arg(name)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let depends = field("Depends");
    assert!(depends.contains("libc6"), "{depends}");
    assert!(!depends.contains("libssl"), "{depends}");
    let contents = Command::new("dpkg-deb")
        .arg("--contents")
        .arg(&deb)
        .output()
        .unwrap();
    let contents = String::from_utf8_lossy(&contents.stdout);
    for file in [
        "./usr/bin/smart-git-proxy",
        "./lib/systemd/system/smart-git-proxy.service",
        "./etc/smart-git-proxy/env",
        "./usr/share/doc/smart-git-proxy/README.md",
    ] {
        assert!(
            contents.contains(file),
            "{file} not in the package:\n{contents}"
        );
    }
}
