//! deploy/: the systemd units pass the real systemd-analyze, and the
//! example environment files name only variables the binaries read.

use duofleet_tests::bin;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The unit with ExecStart pointing at the freshly built binary.
fn unit_for_test(dir: &Path, unit: &str, binary: &str) -> PathBuf {
    let text = std::fs::read_to_string(deploy_dir().join("systemd").join(unit)).unwrap();
    let installed = format!("/usr/local/bin/{binary}");
    assert!(
        text.contains(&format!("ExecStart={installed}")),
        "{unit} must start {installed}"
    );
    let path = dir.join(unit);
    std::fs::write(
        &path,
        text.replace(&installed, &bin(binary).display().to_string()),
    )
    .unwrap();
    path
}

#[test]
fn systemd_units_verify_and_the_control_plane_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = unit_for_test(dir.path(), "duofleetd.service", "duofleetd");
    let agent = unit_for_test(dir.path(), "duofleet-agent.service", "duofleet-agent");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args([&daemon, &agent])
        .output()
        .expect("systemd-analyze is required (Debian package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        !stderr.contains("duofleet"),
        "warnings about our units:\n{stderr}"
    );

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes"])
        .arg(&daemon)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout).into_owned();
    let level: f64 = report
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for duofleetd.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{report}"));
    assert!(
        level <= 2.5,
        "duofleetd.service exposure {level} is above 2.5:\n{report}"
    );
}

#[test]
fn example_environment_files_use_real_variables() {
    for (example, binary) in [
        ("duofleetd.env.example", "duofleetd"),
        ("duofleet-agent.env.example", "duofleet-agent"),
    ] {
        let help = Command::new(bin(binary)).arg("--help").output().unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let text = std::fs::read_to_string(deploy_dir().join("systemd").join(example)).unwrap();
        for line in text.lines().map(|l| l.trim_start_matches("# ")) {
            let Some((name, _)) = line.split_once('=') else {
                continue;
            };
            if !name.starts_with("DUOFLEET_") || name.contains(' ') {
                continue;
            }
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{example}: {binary} does not read {name}"
            );
        }
    }
}
