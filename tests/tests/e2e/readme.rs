//! The README's quick start is run as written, against a real daemon, so
//! the commands a newcomer copies keep working.

use crate::list_models;
use duofleet_proto::v1::GetProfileRequest;
use duofleet_tests::{Daemon, grpcurl_path};
use std::process::Command;

const README: &str = include_str!("../../../README.md");

/// The fenced block that follows the first line containing `marker`.
fn block_after(marker: &str, fence: &str) -> String {
    let start = README
        .find(marker)
        .unwrap_or_else(|| panic!("README lacks {marker}"));
    let rest = &README[start..];
    let open = rest.find(fence).expect("opening fence") + fence.len();
    let body = &rest[open..];
    let close = body.find("\n```").expect("closing fence");
    body[..close].trim_start_matches('\n').to_string()
}

fn bash(script: &str, dir: &std::path::Path, addr: &str) -> std::process::Output {
    let grpcurl_dir = grpcurl_path().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        grpcurl_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("DUOFLEET_README_ADDR", addr)
        .output()
        .expect("run bash")
}

#[tokio::test]
async fn quick_start_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("duofleet-data"));
    // The daemon listens on a free port instead of 7700; everything else is verbatim.
    let script = block_after("<!-- quickstart", "```sh").replace(
        "export DUOFLEET=127.0.0.1:7700",
        "export DUOFLEET=$DUOFLEET_README_ADDR",
    );
    assert!(
        script.contains("$DUOFLEET_README_ADDR"),
        "the quick start no longer sets DUOFLEET"
    );
    let output = bash(&script, dir.path(), &daemon.grpc_addr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("duofleet.v1.ModelService"));
    assert!(
        stdout.contains("\"summary\": \"rollback to revision 2\""),
        "{stdout}"
    );

    // Revision 4 is revision 2 again: gateway set, no feature setting.
    let mut c = daemon.clients().await;
    let default = c
        .profiles
        .get_profile(GetProfileRequest {
            name: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.revision, 4);
    assert_eq!(default.ai_gateway_url, "https://aigw.example.com:5052");
    assert!(default.features.is_empty());
    let models = list_models(&mut c).await;
    assert_eq!(models.len(), 1);
    assert!(models[0].has_api_key);

    // The refusal shown in the README is the one the daemon gives.
    let console = block_after("Refusals name the field", "```console");
    let (command, expected) = console.split_once("\nERROR:").expect("console block shape");
    let command = command.trim_start_matches("$ ");
    let setup = "export DUOFLEET=$DUOFLEET_README_ADDR\nexport AUTH=\"authorization: Bearer $(cat duofleet-data/admin.token)\"\n";
    let refused = bash(&format!("{setup}{command}"), dir.path(), &daemon.grpc_addr);
    assert!(!refused.status.success());
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        format!("ERROR:{expected}").trim()
    );
}
