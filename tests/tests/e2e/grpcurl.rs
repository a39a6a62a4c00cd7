//! The real grpcurl 1.8 (reflection v1alpha) against the real daemon.

use crate::fresh_daemon;
use duofleet_tests::{Daemon, grpcurl, http_get};

/// grpcurl exits with 64 + the gRPC status code.
const EXIT_UNAUTHENTICATED: i32 = 64 + 16;

#[test]
fn grpcurl_lists_services_and_describes_model_service() {
    let (_dir, daemon) = fresh_daemon();
    let list = grpcurl(&daemon.grpc_addr, &[], &["list"]);
    assert_eq!(list.exit_code, 0, "{list:?}");
    for service in [
        "duofleet.v1.ModelService",
        "duofleet.v1.ProfileService",
        "duofleet.v1.FleetService",
        "duofleet.v1.HistoryService",
        "duofleet.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.stdout.lines().any(|l| l == service),
            "{service} missing:\n{}",
            list.stdout
        );
    }
    let describe = grpcurl(
        &daemon.grpc_addr,
        &[],
        &["describe", "duofleet.v1.ModelService"],
    );
    assert_eq!(describe.exit_code, 0, "{describe:?}");
    for rpc in [
        "CreateModel",
        "GetModel",
        "ListModels",
        "UpdateModel",
        "DeleteModel",
    ] {
        assert!(
            describe.stdout.contains(&format!("rpc {rpc} (")),
            "{rpc}:\n{}",
            describe.stdout
        );
    }
}

#[test]
fn grpcurl_creates_a_model_from_json_and_needs_the_token() {
    let (_dir, daemon) = fresh_daemon();
    let auth = format!("authorization: Bearer {}", daemon.token());
    let body = r#"{"model": {"name": "mixtral-prod", "family": "mixtral",
        "endpoint": "https://vllm.internal:8000/v1", "apiKey": "sk-grpcurl-secret",
        "identifier": "custom_openai/Mixtral-8x7B-Instruct-v0.1"}}"#;

    let refused = grpcurl(
        &daemon.grpc_addr,
        &["-d", body],
        &["duofleet.v1.ModelService/CreateModel"],
    );
    assert_eq!(refused.exit_code, EXIT_UNAUTHENTICATED, "{refused:?}");
    assert!(
        refused.stderr.contains("Code: Unauthenticated"),
        "{refused:?}"
    );
    assert!(
        refused.stderr.contains("authorization: Bearer <token>"),
        "{refused:?}"
    );

    let wrong = grpcurl(
        &daemon.grpc_addr,
        &["-H", "authorization: Bearer duofleet_wrong", "-d", body],
        &["duofleet.v1.ModelService/CreateModel"],
    );
    assert_eq!(wrong.exit_code, EXIT_UNAUTHENTICATED, "{wrong:?}");
    assert!(wrong.stderr.contains("invalid token"), "{wrong:?}");

    let created = grpcurl(
        &daemon.grpc_addr,
        &["-H", &auth, "-d", body],
        &["duofleet.v1.ModelService/CreateModel"],
    );
    assert_eq!(created.exit_code, 0, "{created:?}");
    let model = created.json();
    assert_eq!(model["name"], "mixtral-prod");
    assert_eq!(model["hasApiKey"], true);
    assert_eq!(model["revision"], "1");
    assert!(model.get("apiKey").is_none(), "{model}");
    assert!(!created.stdout.contains("sk-grpcurl-secret"));

    let listed = grpcurl(
        &daemon.grpc_addr,
        &["-H", &auth],
        &["duofleet.v1.ModelService/ListModels"],
    );
    assert_eq!(listed.exit_code, 0, "{listed:?}");
    assert_eq!(
        listed.json()["models"][0]["endpoint"],
        "https://vllm.internal:8000/v1"
    );
}

#[test]
fn grpcurl_shows_the_catalog_by_gitlab_version() {
    let (_dir, daemon) = fresh_daemon();
    let auth = format!("authorization: Bearer {}", daemon.token());
    let catalog = grpcurl(
        &daemon.grpc_addr,
        &["-H", &auth],
        &["duofleet.v1.ProfileService/GetCatalog"],
    );
    assert_eq!(catalog.exit_code, 0, "{catalog:?}");
    let catalog = catalog.json();
    let find = |list: &str, key: &str| {
        catalog[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == key)
            .cloned()
    };
    let general = find("families", "general").expect("general");
    assert_eq!(general["sinceGitlabVersion"], "18.3");
    assert_eq!(general["releaseState"], "RELEASE_STATE_BETA");
    let qwen = find("families", "qwen").expect("qwen");
    assert_eq!(qwen["sinceGitlabVersion"], "19.2");
    let fix_code = find("features", "duo_chat_fix_code").expect("fix code");
    assert_eq!(
        fix_code["compatibleSince"],
        serde_json::json!([{"family": "qwen", "sinceGitlabVersion": "19.2"}])
    );
    let embeddings = find("features", "embeddings_code").expect("embeddings");
    assert!(
        embeddings["notSettable"]
            .as_str()
            .unwrap()
            .contains("Semantic Search"),
        "{embeddings}"
    );
    let review = find("features", "review_merge_request").expect("review");
    assert_eq!(review["releaseState"], "RELEASE_STATE_GA");
    assert_eq!(
        review["releaseStates"],
        serde_json::json!([
            {"sinceGitlabVersion": "18.3", "releaseState": "RELEASE_STATE_BETA"},
            {"sinceGitlabVersion": "18.4", "releaseState": "RELEASE_STATE_GA"}
        ])
    );
    let agentic = find("features", "duo_agent_platform_agentic_chat").expect("agentic chat");
    assert_eq!(agentic["sinceGitlabVersion"], "18.7");

    // GitLab has QWEN from 19.2, but no QWEN2: an unknown family is refused
    // with the list of known ones.
    let qwen = grpcurl(
        &daemon.grpc_addr,
        &[
            "-H",
            &auth,
            "-d",
            r#"{"model": {"name": "qwen", "family": "qwen2",
            "endpoint": "https://vllm.internal:8000/v1"}}"#,
        ],
        &["duofleet.v1.ModelService/CreateModel"],
    );
    assert_ne!(qwen.exit_code, 0, "{qwen:?}");
    assert!(
        qwen.stderr.contains("model.family: unknown family \"qwen2\"; known families: mistral, mixtral, codestral, claude_3, gpt, llama3, codegemma, codellama, deepseekcoder, general, gemini, embedding, qwen"),
        "{qwen:?}"
    );
}

#[test]
fn health_answers_serving_without_a_token() {
    let (_dir, daemon) = fresh_daemon();
    let check = grpcurl(&daemon.grpc_addr, &[], &["grpc.health.v1.Health/Check"]);
    assert_eq!(check.exit_code, 0, "{check:?}");
    assert_eq!(check.json()["status"], "SERVING");
    let (status, body) = http_get(&daemon.http_addr, "/healthz");
    assert_eq!((status, body.trim()), (200, "ok"));
    // Readiness: a durable write goes through.
    let (status, body) = http_get(&daemon.http_addr, "/readyz");
    assert_eq!((status, body.trim()), (200, "ready"));
    let (status, metrics) = http_get(&daemon.http_addr, "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("\nduofleet_config_revision 0\n"),
        "{metrics}"
    );
    assert!(metrics.contains("\nduofleet_profiles 1\n"), "{metrics}");
}

#[test]
fn plaintext_on_a_network_address_is_refused_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(duofleet_tests::bin("duofleetd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "0.0.0.0:0", "--http-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to serve plaintext gRPC on 0.0.0.0:0"),
        "{stderr}"
    );
    assert!(stderr.contains("--insecure"), "{stderr}");
}

#[test]
fn json_log_format_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let options = duofleet_tests::DaemonOptions {
        args: vec!["--log-format".into(), "json".into()],
        ..Default::default()
    };
    let daemon = Daemon::start_with(&dir.path().join("data"), options);
    let log = daemon.log();
    let ready = log
        .lines()
        .map(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{e}: {line}"))
        })
        .find(|entry| entry["fields"]["message"] == "duofleetd ready")
        .expect("ready line");
    assert_eq!(ready["level"], "INFO");
    assert_eq!(ready["fields"]["grpc_addr"], daemon.grpc_addr.as_str());
}
