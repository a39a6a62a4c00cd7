//! The README's quick start is run as written, against a real daemon, so
//! the commands a newcomer copies keep working.

use crate::list_models;
use duofleet_proto::v1::GetProfileRequest;
use duofleet_tests::{Daemon, bin_dir, grpcurl_path};
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
    // grpcurl, and the duofleetctl the workspace built, on the PATH.
    let grpcurl_dir = grpcurl_path().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}:{}",
        bin_dir().display(),
        grpcurl_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .env("PATH", path)
        .env("DUOFLEET_README_ADDR", addr)
        .env_remove("DUOFLEET_TOKEN_FILE")
        .env_remove("DUOFLEET_TOKEN")
        .output()
        .expect("run bash")
}

fn run_ok(script: &str, dir: &std::path::Path, addr: &str) -> String {
    let output = bash(script, dir, addr);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn quick_start_runs_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("duofleet-data"));
    // The daemon listens on a free port instead of 7700; everything else is verbatim.
    let script = block_after("<!-- quickstart:", "```sh").replace(
        "export DUOFLEET_SERVER=127.0.0.1:7700",
        "export DUOFLEET_SERVER=$DUOFLEET_README_ADDR",
    );
    assert!(
        script.contains("$DUOFLEET_README_ADDR"),
        "the quick start no longer sets DUOFLEET_SERVER"
    );
    let stdout = run_ok(&script, dir.path(), &daemon.grpc_addr);
    assert!(
        stdout.contains("+  apiKey: (write-only, will be set)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("revision 1: apply: create model mixtral-prod; update profile default\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("~ profile default features.duo_chat: self_hosted mixtral-prod → vendor"),
        "{stdout}"
    );
    assert!(
        stdout.contains("revision 3: rollback to revision 1"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("sk-replace-me"),
        "the key was shown: {stdout}"
    );

    // Revision 3 is revision 1 again: the gateway, and chat on the model.
    let mut c = daemon.clients().await;
    let default = c
        .profiles
        .get_profile(GetProfileRequest {
            name: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.revision, 3);
    assert_eq!(default.ai_gateway_url, "https://aigw.example.com:5052");
    assert_eq!(default.features.len(), 1);
    assert_eq!(default.features[0].model, "mixtral-prod");
    let models = list_models(&mut c).await;
    assert_eq!(models.len(), 1);
    assert!(models[0].has_api_key);
    // The export it wrote applies as "no change".
    let again = run_ok(
        "export DUOFLEET_SERVER=$DUOFLEET_README_ADDR\nduofleetctl apply -f fleet-now.yaml",
        dir.path(),
        &daemon.grpc_addr,
    );
    assert_eq!(
        again,
        "no change: the configuration already matches (revision 3)\n"
    );

    // The refusal shown in the README is the one the daemon gives.
    let console = block_after("Refusals name the field", "```console");
    let (command, expected) = console.split_once("\nerror:").expect("console block shape");
    let command = command.trim_start_matches("$ ");
    let refused = bash(
        &format!("export DUOFLEET_SERVER=$DUOFLEET_README_ADDR\n{command}"),
        dir.path(),
        &daemon.grpc_addr,
    );
    assert_eq!(refused.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr).trim(),
        format!("error:{expected}").trim()
    );

    // The grpcurl section, on the same daemon.
    let script = block_after("<!-- quickstart-grpcurl", "```sh").replace(
        "export DUOFLEET=127.0.0.1:7700",
        "export DUOFLEET=$DUOFLEET_README_ADDR",
    );
    // The token reaches grpcurl through the environment, not its arguments.
    assert!(script.contains("-expand-headers") && !script.contains("Bearer $("));
    let stdout = run_ok(&script, dir.path(), &daemon.grpc_addr);
    assert!(stdout.contains("duofleet.v1.ConfigService"), "{stdout}");
    assert!(stdout.contains("\"hasApiKey\": true"), "{stdout}");
    assert!(
        stdout.contains("\"summary\": \"apply: update profile default\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"action\": \"CHANGE_ACTION_CREATED\""),
        "{stdout}"
    );
    // validateOnly wrote nothing: the model and the feature made 4 and 5.
    let revisions = crate::revision_numbers(&mut c).await;
    assert_eq!(revisions.iter().max(), Some(&5), "{revisions:?}");
}
