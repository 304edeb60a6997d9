//! What an operator installs: the systemd unit (checked by `systemd-analyze verify` where it is
//! installed) and the env file, which, like the README's table, names every setting.

use std::process::Command;

/// The settings the binary reads from the environment, from `--help`.
fn settings() -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_smart-git-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = help
        .split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect()
        })
        .collect();
    assert!(names.len() > 30, "{names:?}");
    names
}

#[test]
fn every_setting_is_documented_in_the_readme_and_the_env_file() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let env = std::fs::read_to_string(format!("{root}/scripts/env.example")).unwrap();
    for name in settings() {
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README table lacks {name}"
        );
        assert!(
            env.contains(&format!("\n#{name}=")),
            "env.example lacks {name}"
        );
    }
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

/// `cargo deb` is not run here (it would need a release build and cargo-deb in CI): its
/// metadata is checked instead — every asset but the built binary exists, and the unit and the
/// env file are among them.
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
}
