//! Every validation rule and error code of the README's error table, against the real
//! daemon: the exact code, a message naming the field and the rule, and no
//! revision for a refused request.

use crate::{create_model, fresh_daemon, revision_numbers};
use duofleet_proto::v1::{
    CreateModelRequest, CreateProfileRequest, DeleteModelRequest, DeleteProfileRequest,
    FeatureSetting, GetInstanceRequest, GetModelRequest, GetProfileRequest, GetRevisionRequest,
    Model, Profile, Provider, RollbackRequest, SetFeatureSettingRequest, UpdateModelRequest,
    UpdateProfileRequest,
};
use duofleet_tests::{Clients, mk};
use tonic::{Code, Status};

#[track_caller]
fn assert_refused<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, message: &str) {
    let status = result.expect_err("the daemon accepted a request it must refuse");
    assert_eq!(status.code(), code, "{}", status.message());
    assert_eq!(status.message(), message);
}

#[track_caller]
fn assert_refused_containing<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    parts: &[&str],
) {
    let status = result.expect_err("the daemon accepted a request it must refuse");
    assert_eq!(status.code(), code, "{}", status.message());
    for part in parts {
        assert!(
            status.message().contains(part),
            "{:?} lacks {part:?}",
            status.message()
        );
    }
}

async fn try_create(clients: &mut Clients, edit: impl FnOnce(&mut Model)) -> Result<Model, Status> {
    let mut model = mk::model("m");
    edit(&mut model);
    clients
        .models
        .create_model(CreateModelRequest {
            model: Some(model),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

async fn try_create_profile(
    clients: &mut Clients,
    edit: impl FnOnce(&mut Profile),
) -> Result<Profile, Status> {
    let mut profile = mk::profile("canary");
    edit(&mut profile);
    clients
        .profiles
        .create_profile(CreateProfileRequest {
            profile: Some(profile),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn model_field_rules() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let invalid = Code::InvalidArgument;

    assert_refused(
        try_create(&mut c, |m| m.name.clear()).await,
        invalid,
        "model.name: must be 1 to 255 characters (got 0)",
    );
    assert_refused(
        try_create(&mut c, |m| m.name = "n".repeat(256)).await,
        invalid,
        "model.name: must be 1 to 255 characters (got 256)",
    );
    assert_refused(
        try_create(&mut c, |m| m.name = "bad\u{1b}[31mname".into()).await,
        invalid,
        "model.name: must not contain control characters (found U+001B at position 3)",
    );
    assert_refused_containing(
        try_create(&mut c, |m| m.family = "llama2".into()).await,
        invalid,
        &["model.family: unknown family \"llama2\"; known families: mistral, mixtral, codestral"],
    );
    assert_refused(
        try_create(&mut c, |m| m.endpoint = "vllm:8000/v1".into()).await,
        invalid,
        "model.endpoint: scheme must be http or https (got \"vllm\")",
    );
    assert_refused_containing(
        try_create(&mut c, |m| m.endpoint = "/v1".into()).await,
        invalid,
        &["model.endpoint: must be an absolute http or https URL"],
    );
    assert_refused(
        try_create(&mut c, |m| {
            m.endpoint = format!("https://vllm/{}/v1", "p".repeat(2048))
        })
        .await,
        invalid,
        "model.endpoint: must be at most 2048 characters (got 2064)",
    );
    assert_refused(
        try_create(&mut c, |m| {
            m.endpoint = "https://admin:hunter2@vllm:8000/v1".into()
        })
        .await,
        invalid,
        "model.endpoint: must not contain a user:password part; put credentials in api_key",
    );
    assert_refused(
        try_create(&mut c, |m| m.endpoint = "https://vllm:8000".into()).await,
        invalid,
        "model.endpoint: must end with /v1 for custom_openai models (e.g. https://host:8000/v1)",
    );
    assert_refused_containing(
        try_create(&mut c, |m| m.identifier = "openai/gpt-4".into()).await,
        invalid,
        &[
            "model.identifier: must be custom_openai/<served model name>, bedrock/<model id>, azure/<deployment id> or vertex_ai/<model id>",
        ],
    );
    assert_refused(
        try_create(&mut c, |m| {
            m.identifier = format!("bedrock/{}", "x".repeat(250))
        })
        .await,
        invalid,
        "model.identifier: must be at most 255 characters (got 258)",
    );
    assert_refused(
        c.models
            .create_model(CreateModelRequest {
                model: None,
                ..Default::default()
            })
            .await,
        invalid,
        "model: required",
    );
    assert_refused(
        try_create(&mut c, |m| m.api_key = "sk-line\r\nX-Injected: 1".into()).await,
        invalid,
        "model.api_key: must not contain control characters (it is sent as an HTTP header)",
    );
    assert_refused(
        try_create(&mut c, |m| m.api_key = "k".repeat(8193)).await,
        invalid,
        "model.api_key: must be at most 8192 bytes",
    );
    assert_refused(
        c.models
            .update_model(UpdateModelRequest {
                model: Some(mk::model("ghost")),
                update_mask: None,
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "model \"ghost\" not found",
    );
    // Bedrock and Azure endpoints need no /v1.
    try_create(&mut c, |m| {
        m.name = "bedrock-mixtral".into();
        m.identifier = "bedrock/mistral.mixtral-8x7b-instruct-v0:1".into();
        m.endpoint = "https://bedrock-runtime.us-east-1.amazonaws.com".into();
    })
    .await
    .unwrap();
    assert_eq!(
        revision_numbers(&mut c).await,
        [1],
        "refusals must make no revision"
    );
}

#[tokio::test]
async fn profile_and_feature_rules() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let invalid = Code::InvalidArgument;

    assert_refused(
        try_create_profile(&mut c, |p| p.name = "Canary".into()).await,
        invalid,
        "profile.name: must contain only a-z, 0-9 and '-' (got \"Canary\")",
    );
    assert_refused(
        try_create_profile(&mut c, |p| p.name = "c".repeat(64)).await,
        invalid,
        "profile.name: must be 1 to 63 characters (got 64)",
    );
    assert_refused(
        try_create_profile(&mut c, |p| p.ai_gateway_url = "aigw:5052".into()).await,
        invalid,
        "profile.ai_gateway_url: scheme must be http or https (got \"aigw\")",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.ai_gateway_internal_url = "gopher://aigw".into()
        })
        .await,
        invalid,
        "profile.ai_gateway_internal_url: scheme must be http or https (got \"gopher\")",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.selector.insert("tier".into(), "gold star".into());
        })
        .await,
        invalid,
        "profile.selector[tier]: label value \"gold star\" must be at most 63 characters of A-Z a-z 0-9 . _ -",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.features = vec![mk::self_hosted("duo_chat_draw_pictures", "m")]
        })
        .await,
        invalid,
        "profile.features[0].feature: unknown feature \"duo_chat_draw_pictures\"; known features: code_generations, code_completions, duo_chat, duo_chat_explain_code, duo_chat_write_tests, duo_chat_refactor_code, duo_chat_fix_code, duo_chat_troubleshoot_job, duo_chat_explain_vulnerability, duo_chat_summarize_comments, generate_commit_message, summarize_new_merge_request, resolve_vulnerability, summarize_review, glab_ask_git_command, review_merge_request, duo_agent_platform, duo_agent_platform_agentic_chat, sast_vulnerability_fp_detection, sast_vulnerability_resolution, secret_vulnerability_fp_detection, review_merge_request_dap, security_review, resolve_dependency_bump, duo_developer, embeddings_code, feature_discovery_search",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.features = vec![FeatureSetting {
                model: "m".into(),
                ..mk::vendor("duo_chat")
            }]
        })
        .await,
        invalid,
        "profile.features[0].model: only allowed with PROVIDER_SELF_HOSTED (provider is PROVIDER_VENDOR)",
    );
    let set = |profile: &str, setting: FeatureSetting| SetFeatureSettingRequest {
        profile: profile.to_string(),
        setting: Some(setting),
        ..Default::default()
    };
    assert_refused(
        c.profiles
            .set_feature_setting(set("", mk::self_hosted("duo_chat", "")))
            .await,
        invalid,
        "setting.model: required with PROVIDER_SELF_HOSTED: name a model",
    );
    assert_refused(
        c.profiles
            .set_feature_setting(set(
                "",
                FeatureSetting {
                    model: "m".into(),
                    provider: Provider::Disabled as i32,
                    feature: "duo_chat".into(),
                },
            ))
            .await,
        invalid,
        "setting.model: only allowed with PROVIDER_SELF_HOSTED (provider is PROVIDER_DISABLED)",
    );
    assert_refused(
        c.profiles
            .update_profile(UpdateProfileRequest {
                profile: Some(Profile {
                    name: "default".into(),
                    selector: [("env".to_string(), "prod".to_string())].into(),
                    ..Default::default()
                }),
                update_mask: None,
                ..Default::default()
            })
            .await,
        invalid,
        "profile.selector: must be empty for the default profile, which matches every instance",
    );
    assert_refused(
        c.models
            .update_model(UpdateModelRequest {
                model: Some(mk::model("m")),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["revision".into()],
                }),
                ..Default::default()
            })
            .await,
        invalid,
        "update_mask: \"revision\" is output only",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.ai_gateway_url.clear();
            p.ai_gateway_internal_url = "http://ai-gateway.gitlab.svc.cluster.local:5052".into();
        })
        .await,
        invalid,
        "profile.ai_gateway_internal_url: needs ai_gateway_url to be set as well (or inherited from a parent)",
    );
    assert_refused(
        try_create_profile(&mut c, |p| p.ai_gateway_timeout_seconds = 30).await,
        invalid,
        "profile.ai_gateway_timeout_seconds: must be 60 to 600 seconds, as GitLab allows, or 0 to leave GitLab's own (got 30)",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.duo_agent_platform_service_url = "https://dap.example.com:50052".into()
        })
        .await,
        invalid,
        "profile.duo_agent_platform_service_url: must be host:port without a scheme, e.g. dap.example.com:50052; GitLab takes no scheme here",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.features = vec![mk::vendor("duo_chat"), mk::vendor("duo_chat")]
        })
        .await,
        invalid,
        "profile.features[1].feature: \"duo_chat\" is set more than once",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.features = vec![FeatureSetting {
                feature: "duo_chat".into(),
                ..Default::default()
            }]
        })
        .await,
        invalid,
        "profile.features[0].provider: must be PROVIDER_DISABLED, PROVIDER_VENDOR or PROVIDER_SELF_HOSTED",
    );
    assert_refused(
        try_create_profile(&mut c, |p| {
            p.selector.insert("ring canary".into(), "1".into());
        })
        .await,
        invalid,
        "profile.selector: label key \"ring canary\" must be 1 to 63 characters of A-Z a-z 0-9 . _ - /",
    );
    assert_refused(
        c.profiles
            .update_profile(UpdateProfileRequest {
                profile: Some(mk::profile("default")),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            })
            .await,
        invalid,
        "update_mask: name cannot be changed: it selects the resource",
    );
    assert_refused(
        c.profiles
            .update_profile(UpdateProfileRequest {
                profile: Some(mk::profile("default")),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["aiGatewayURL".into()],
                }),
                ..Default::default()
            })
            .await,
        invalid,
        "update_mask: unknown field \"aiGatewayURL\" for Profile; updatable fields: parent, reconfigure_window, ai_gateway_url, ai_gateway_internal_url, selector, priority, features, ai_gateway_timeout_seconds, duo_agent_platform_service_url",
    );
    assert!(
        revision_numbers(&mut c).await.is_empty(),
        "refusals must make no revision"
    );
}

#[tokio::test]
async fn exists_not_found_and_preconditions() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;

    create_model(&mut c, mk::model("mixtral-prod")).await;
    create_model(
        &mut c,
        Model {
            family: "codegemma".into(),
            ..mk::model("codegemma-7b")
        },
    )
    .await;
    assert_refused(
        c.models
            .create_model(CreateModelRequest {
                model: Some(mk::model("mixtral-prod")),
                ..Default::default()
            })
            .await,
        Code::AlreadyExists,
        "model \"mixtral-prod\" already exists",
    );
    try_create_profile(&mut c, |_| {}).await.unwrap();
    assert_refused(
        try_create_profile(&mut c, |_| {}).await,
        Code::AlreadyExists,
        "profile \"canary\" already exists",
    );
    let revisions_before = revision_numbers(&mut c).await;
    assert_eq!(revisions_before, [3, 2, 1]);

    assert_refused(
        c.models
            .get_model(GetModelRequest {
                name: "nope".into(),
            })
            .await,
        Code::NotFound,
        "model \"nope\" not found",
    );
    assert_refused(
        c.models
            .delete_model(DeleteModelRequest {
                name: "nope".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "model \"nope\" not found",
    );
    assert_refused(
        c.profiles
            .get_profile(GetProfileRequest {
                name: "nope".into(),
            })
            .await,
        Code::NotFound,
        "profile \"nope\" not found",
    );
    assert_refused(
        c.history
            .get_revision(GetRevisionRequest { revision: 99 })
            .await,
        Code::NotFound,
        "revision 99 not found",
    );
    assert_refused(
        c.history
            .rollback(RollbackRequest {
                revision: 99,
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "revision 99 not found",
    );
    assert_refused(
        c.fleet
            .get_instance(GetInstanceRequest {
                instance_id: "gitlab-01".into(),
            })
            .await,
        Code::NotFound,
        "instance \"gitlab-01\" not found",
    );
    let set = |profile: &str, setting: FeatureSetting| SetFeatureSettingRequest {
        profile: profile.to_string(),
        setting: Some(setting),
        ..Default::default()
    };
    assert_refused(
        c.profiles
            .set_feature_setting(set("nope", mk::vendor("duo_chat")))
            .await,
        Code::NotFound,
        "profile \"nope\" not found",
    );
    assert_refused(
        c.profiles
            .set_feature_setting(set("", mk::self_hosted("duo_chat", "ghost")))
            .await,
        Code::FailedPrecondition,
        "setting.model: model \"ghost\" does not exist; create it first",
    );
    assert_refused_containing(
        c.profiles
            .set_feature_setting(set("", mk::self_hosted("duo_chat", "codegemma-7b")))
            .await,
        Code::FailedPrecondition,
        &["Codegemma is incompatible with the General Chat feature"],
    );
    assert_refused_containing(
        try_create_profile(&mut c, |p| {
            p.name = "reviewers".into();
            p.features = vec![mk::self_hosted("review_merge_request", "codegemma-7b")];
        })
        .await,
        Code::FailedPrecondition,
        &[
            "profile.features[0].model: Codegemma is incompatible with the Non-Agentic Code Review feature",
        ],
    );
    // In use: cannot be deleted; the message names the profile and feature.
    c.profiles
        .set_feature_setting(set("canary", mk::self_hosted("duo_chat", "mixtral-prod")))
        .await
        .unwrap();
    assert_refused(
        c.models
            .delete_model(DeleteModelRequest {
                name: "mixtral-prod".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "model \"mixtral-prod\" is used by profile \"canary\" for feature duo_chat; point that feature at another model first",
    );
    assert_refused_containing(
        c.models
            .update_model(UpdateModelRequest {
                model: Some(Model {
                    name: "mixtral-prod".into(),
                    family: "codegemma".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["family".into()],
                }),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        &[
            "Codegemma is incompatible with the General Chat feature",
            "profile \"canary\"",
        ],
    );
    assert_refused(
        c.profiles
            .delete_profile(DeleteProfileRequest {
                name: "default".into(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "the default profile cannot be deleted: it is the fallback for every instance",
    );
    assert_eq!(revision_numbers(&mut c).await, [4, 3, 2, 1]);
    // Still intact after all the refusals.
    let model = c
        .models
        .get_model(GetModelRequest {
            name: "mixtral-prod".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(model.family, "mixtral");
}

/// `validate_only` on every mutating RPC: the full checks, the summary the
/// revision would carry, and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_only_checks_everything_and_writes_nothing() {
    use duofleet_proto::v1::{
        ApplyConfigRequest, CreateTokenRequest, DeleteInstanceRequest, ListModelsRequest,
        ListTokensRequest, RevokeTokenRequest, Role,
    };
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    create_model(&mut c, mk::model("m1")).await;
    let summary = |metadata: &tonic::metadata::MetadataMap| {
        metadata
            .get("duofleet-summary")
            .map(|v| v.to_str().unwrap().to_string())
    };

    let created = c
        .models
        .create_model(CreateModelRequest {
            model: Some(mk::model("m2")),
            validate_only: true,
        })
        .await
        .unwrap();
    assert_eq!(
        summary(created.metadata()).as_deref(),
        Some("create model m2")
    );
    assert_eq!(created.get_ref().name, "m2");
    assert!(created.get_ref().has_api_key);
    let mut bad = mk::model("m3");
    bad.endpoint = "ftp://x".into();
    assert_refused_containing(
        c.models
            .create_model(CreateModelRequest {
                model: Some(bad),
                validate_only: true,
            })
            .await,
        Code::InvalidArgument,
        &["model.endpoint"],
    );
    let updated = c
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(mk::profile("default")),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["ai_gateway_url".into()],
            }),
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        summary(updated.metadata()).as_deref(),
        Some("update profile default (ai_gateway_url)")
    );
    assert_eq!(
        updated.get_ref().ai_gateway_url,
        "https://aigw.example.internal:5052"
    );
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "m1")),
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap();
    c.models
        .delete_model(DeleteModelRequest {
            name: "m1".into(),
            validate_only: true,
        })
        .await
        .unwrap();
    assert_refused_containing(
        c.profiles
            .delete_profile(DeleteProfileRequest {
                name: "default".into(),
                validate_only: true,
            })
            .await,
        Code::FailedPrecondition,
        &["cannot be deleted"],
    );
    let rollback = c
        .history
        .rollback(RollbackRequest {
            revision: 1,
            validate_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rollback.summary, "rollback to revision 1");
    let applied = c
        .config
        .apply_config(ApplyConfigRequest {
            models: vec![mk::model("m4")],
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.revision.unwrap().summary, "apply: create model m4");
    assert_eq!(applied.current_revision, 1);
    assert_refused_containing(
        c.config
            .apply_config(ApplyConfigRequest {
                expected_revision: 7,
                validate_only: true,
                ..Default::default()
            })
            .await,
        Code::Aborted,
        &["the configuration is at revision 1, not 7"],
    );
    let token = c
        .tokens
        .create_token(CreateTokenRequest {
            name: "ci".into(),
            role: Role::Viewer as i32,
            validate_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(token.secret.is_empty());
    assert_refused_containing(
        c.tokens
            .revoke_token(RevokeTokenRequest {
                name: "nope".into(),
                validate_only: true,
            })
            .await,
        Code::NotFound,
        &["nope"],
    );
    assert_refused_containing(
        c.fleet
            .delete_instance(DeleteInstanceRequest {
                instance_id: "nope".into(),
                validate_only: true,
            })
            .await,
        Code::NotFound,
        &["nope"],
    );

    // Nothing was written.
    assert_eq!(revision_numbers(&mut c).await, [1]);
    let models = c
        .models
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.len(), 1);
    let tokens = c
        .tokens
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(tokens.iter().all(|t| t.name != "ci"));
    let default = c
        .profiles
        .get_profile(GetProfileRequest {
            name: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(default.ai_gateway_url.is_empty() && default.features.is_empty());
}
