//! API keys are sealed at rest: the raw sled files never hold one, and a
//! documented key rotation re-seals the whole history.

use crate::{contains, create_model, raw_files};
use duofleet_proto::v1::{
    GetRevisionRequest, Model, Profile, RollbackRequest, UpdateModelRequest, UpdateProfileRequest,
};
use duofleet_tests::agent::Agent;
use duofleet_tests::endpoints::Endpoint;
use duofleet_tests::{Daemon, DaemonOptions, mk};
use std::time::{Duration, Instant};

const FIRST_KEY: &str = "sk-at-rest-first-0c4e7a";
const SECOND_KEY: &str = "sk-at-rest-second-91bd3f";

fn with_args(args: &[&str]) -> DaemonOptions {
    DaemonOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_are_sealed_on_disk_and_survive_a_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let endpoint = Endpoint::start(&["Mixtral-8x7B-Instruct-v0.1"]).await;
    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    let model = Model {
        endpoint: format!("{}/v1", endpoint.base),
        api_key: FIRST_KEY.into(),
        identifier: "custom_openai/Mixtral-8x7B-Instruct-v0.1".into(),
        ..mk::model("mixtral-prod")
    };
    create_model(&mut c, model).await; // 1
    c.profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                features: vec![mk::self_hosted("duo_chat", "mixtral-prod")],
                ..Default::default()
            }),
            update_mask: None,
            ..Default::default()
        })
        .await
        .unwrap(); // 2
    c.models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: "mixtral-prod".into(),
                api_key: SECOND_KEY.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["api_key".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap(); // 3
    let tokens = [
        daemon.token(),
        std::fs::read_to_string(data.join("enroll.token"))
            .unwrap()
            .trim()
            .to_string(),
    ];
    assert!(daemon.stop("TERM").success());

    let db_files = raw_files(&data.join("db"));
    assert!(!db_files.is_empty());
    for (path, bytes) in &db_files {
        for secret in [FIRST_KEY, SECOND_KEY, &tokens[0], &tokens[1]] {
            assert!(!contains(bytes, secret), "{path} holds a secret in clear");
        }
    }

    // Rotation: a new key, with the old one given once to re-seal everything.
    let new_key = dir.path().join("new.key");
    std::fs::write(&new_key, format!("{}\n", "ab".repeat(32))).unwrap();
    let old_key = data.join("secret.key").display().to_string();
    let new_key_arg = new_key.display().to_string();
    let rotating = Daemon::start_with(
        &data,
        with_args(&[
            "--secret-key-file",
            &new_key_arg,
            "--previous-secret-key-file",
            &old_key,
        ]),
    );
    assert!(
        rotating
            .log()
            .contains("API keys sealed under the current secret key"),
        "{}",
        rotating.log()
    );
    assert!(rotating.stop("TERM").success());

    // The old key alone no longer opens anything: duofleetd refuses to start.
    let stderr = duofleet_tests::start_refused(&data);
    assert!(
        stderr.contains("cannot be opened with the secret key (wrong --secret-key-file?)"),
        "{stderr}"
    );

    // The new key alone: the current key and the historical one both come back.
    let daemon = Daemon::start_with(&data, with_args(&["--secret-key-file", &new_key_arg]));
    let rb = dir.path().join("gitlab.rb");
    std::fs::write(&rb, "").unwrap();
    let args: Vec<String> = [
        "--gitlab-rb",
        &rb.display().to_string(),
        "--reconfigure-command",
        "true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _agent = Agent::start(&daemon, "gitlab-a", dir.path(), &args);
    wait_for_bearer(&endpoint, SECOND_KEY).await;
    // History re-sealed under the new key still opens (GetRevision rebuilds
    // the configuration at revision 1, unsealing its key) ...
    let mut c = daemon.clients().await;
    let first = c
        .history
        .get_revision(GetRevisionRequest { revision: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(first.models[0].has_api_key);
    // ... but a rollback never brings the first key back.
    let rollback = c
        .history
        .rollback(RollbackRequest {
            revision: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rollback.revision, 4);
    endpoint.behaviour.lock().unwrap().authorizations.clear();
    let deadline = Instant::now() + Duration::from_secs(30);
    while endpoint.behaviour.lock().unwrap().authorizations.len() < 3 {
        assert!(Instant::now() < deadline, "the model is no longer probed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = endpoint.behaviour.lock().unwrap().authorizations.clone();
    assert!(
        !seen.contains(&format!("Bearer {FIRST_KEY}")),
        "a rollback restored the old key: {seen:?}"
    );
}

async fn wait_for_bearer(endpoint: &Endpoint, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = format!("Bearer {key}");
    while !endpoint
        .behaviour
        .lock()
        .unwrap()
        .authorizations
        .contains(&wanted)
    {
        assert!(
            Instant::now() < deadline,
            "the model was never probed with the expected key"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
