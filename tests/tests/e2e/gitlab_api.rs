//! Models, feature settings and Duo settings reach GitLab through its
//! GraphQL API: real daemon and agents against the GitLab simulator, which
//! follows real GitLab version by version.

use crate::fresh_daemon;
use crate::{WAIT, wait_instance, wait_synced};
use duofleet_proto::v1::{
    CreateModelRequest, DeleteModelRequest, FeatureSetting, HealthState, Instance, Model, Profile,
    Provider, SetFeatureSettingRequest, SyncItemState, SyncState, TargetKind, UpdateModelRequest,
    UpdateProfileRequest,
};
use duofleet_tests::agent::{Agent, FakeCommand};
use duofleet_tests::gitlab_sim::{self, Shared};
use duofleet_tests::{Clients, Daemon, mk};
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const TOKEN: &str = "glpat-simulated-admin-token";

fn agent_with_gitlab(
    daemon: &Daemon,
    root: &Path,
    id: &str,
    gitlab_url: &str,
    token: &str,
) -> Agent {
    agent_with_gitlab_and(daemon, root, id, gitlab_url, token, &[])
}

fn agent_with_gitlab_and(
    daemon: &Daemon,
    root: &Path,
    id: &str,
    gitlab_url: &str,
    token: &str,
    extra: &[&str],
) -> Agent {
    let ctl = FakeCommand::new(&root.join(format!("{id}-ctl")));
    let rb = root.join(format!("{id}-gitlab.rb"));
    std::fs::write(&rb, "external_url 'https://gitlab.example.com'\n").unwrap();
    let token_file = root.join(format!("{id}.token"));
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let args: Vec<String> = [
        "--gitlab-rb",
        &rb.display().to_string(),
        "--reconfigure-command",
        &ctl.command("reconfigure"),
        "--gitlab-url",
        gitlab_url,
        "--gitlab-token-file",
        &token_file.display().to_string(),
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Agent::start(daemon, id, root, &args)
}

fn setting(feature: &str, provider: Provider, model: &str) -> FeatureSetting {
    FeatureSetting {
        feature: feature.into(),
        provider: provider as i32,
        model: model.into(),
    }
}

async fn create(c: &mut Clients, model: Model) -> u64 {
    c.models
        .create_model(CreateModelRequest {
            model: Some(model),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// An item of the instance's API layer: (state, detail).
fn item(instance: &Instance, kind: &str, key: &str) -> (SyncItemState, String) {
    let sync = instance.gitlab_sync.as_ref().expect("sync status");
    sync.items
        .iter()
        .find(|i| i.kind == kind && i.key == key)
        .map(|i| (i.state(), i.detail.clone()))
        .unwrap_or_else(|| panic!("no {kind} {key} in {:?}", sync.items))
}

/// Creates mixtral-prod and codestral-22b.
async fn mixtral_and_codestral(c: &mut Clients) {
    create(c, mk::model("mixtral-prod")).await;
    create(
        c,
        Model {
            family: "codestral".into(),
            ..mk::model("codestral-22b")
        },
    )
    .await;
}

/// Updates one field of mixtral-prod; returns the revision.
async fn update_model(c: &mut Clients, patch: Model, field: &str) -> u64 {
    c.models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: "mixtral-prod".into(),
                ..patch
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec![field.into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

async fn set_default_profile(c: &mut Clients, profile: Profile) -> u64 {
    c.profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ..profile
            }),
            update_mask: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// The default profile: General Chat on `model`, `other` on the vendor.
async fn chat_and_vendor(c: &mut Clients, model: &str, other: &str) -> u64 {
    set_default_profile(
        c,
        Profile {
            features: vec![
                setting("duo_chat", Provider::SelfHosted, model),
                setting(other, Provider::Vendor, ""),
            ],
            ..Default::default()
        },
    )
    .await
}

/// GitLab has `feature` on the self-hosted model called `model`.
fn assert_on_model(sim: &Shared, feature: &str, model: &str) {
    let sim = sim.lock().unwrap();
    let id = sim.model_named(model).expect("created").id;
    assert_eq!(sim.feature(feature), ("self_hosted".into(), Some(id)));
}

/// The instance shows `feature` as hidden by GitLab, `because`.
fn assert_hidden(instance: &Instance, feature: &str, because: &str) {
    let (state, detail) = item(instance, "feature", feature);
    assert_eq!(state, SyncItemState::Hidden);
    assert!(detail.contains(because), "{detail}");
}

/// Makes the agent sync again with nothing changed for it: it is stopped,
/// an unrelated revision is made, and on restart it is sent its config at
/// the new revision. An agent that says what it applied is sent nothing
/// when the content is the same (`an_agent_restart_with_nothing_new_reconfigures_nothing`):
/// these agents' state forgets the digest, as an agent's from before
/// digests were kept would, so the control plane sends the config again.
async fn resync_unchanged(c: &mut Clients, agents: &mut [(&str, &mut Agent)], n: &str) -> u64 {
    for (_, agent) in agents.iter_mut() {
        agent.kill9();
        let path = agent.state_dir.join("state.json");
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        state["applied_digest"] = "".into();
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    }
    let unrelated = create(
        c,
        Model {
            family: "gpt".into(),
            ..mk::model(&format!("unused-{n}"))
        },
    )
    .await;
    for (id, agent) in agents.iter_mut() {
        agent.restart();
        wait_synced(c, id, unrelated).await;
    }
    unrelated
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_features_reach_gitlab_idempotently() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim): (String, Shared) = gitlab_sim::start("17.9.0-ee", TOKEN).await;
    sim.lock().unwrap().testing_terms_accepted = true;
    let by_hand = sim.lock().unwrap().add_model_by_hand("by-hand", "GPT");
    let mut agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, TOKEN);

    mixtral_and_codestral(&mut c).await;
    let revision = set_default_profile(
        &mut c,
        Profile {
            ai_gateway_url: "https://aigw.example.com".into(),
            features: vec![
                setting("duo_chat", Provider::SelfHosted, "mixtral-prod"),
                setting("code_completions", Provider::SelfHosted, "codestral-22b"),
                setting("code_generations", Provider::SelfHosted, "codestral-22b"),
                setting("duo_chat_explain_code", Provider::Vendor, ""),
                setting("duo_chat_fix_code", Provider::Disabled, ""),
            ],
            ..Default::default()
        },
    )
    .await;
    let synced = wait_synced(&mut c, "gitlab-a", revision).await;
    let status = synced.gitlab_sync.clone().expect("sync status");
    assert!(status.enabled);
    assert_eq!(status.detail, "GitLab 17.9.0-ee");
    assert_eq!(status.unmanaged_models, ["by-hand"]);
    assert_eq!(status.applied_revision, revision);
    assert_eq!(
        item(&synced, "feature", "duo_chat"),
        (SyncItemState::Applied, "duo_chat -> SELF_HOSTED".into())
    );
    let host = synced.host_sync.clone().expect("host layer");
    assert_eq!(host.applied_revision, revision);
    assert!(
        host.detail.contains("GitLab 17.9 takes the gateway from its database setting when set, else from AI_GATEWAY_URL"),
        "{}",
        host.detail
    );
    {
        let sim = sim.lock().unwrap();
        let mixtral = sim.model_named("mixtral-prod").expect("created");
        // GitLab keeps the family in lower case.
        assert_eq!(
            (mixtral.model.as_str(), mixtral.api_token.as_str()),
            ("mixtral", "sk-test-key-of-mixtral-prod")
        );
        assert_eq!(mixtral.endpoint, "https://vllm.example.internal:8000/v1");
        assert_eq!(
            mixtral.identifier,
            "custom_openai/Mixtral-8x7B-Instruct-v0.1"
        );
        let codestral = sim.model_named("codestral-22b").expect("created").id;
        assert_eq!(
            sim.feature("duo_chat"),
            ("self_hosted".to_string(), Some(mixtral.id))
        );
        assert_eq!(
            sim.feature("code_completions"),
            ("self_hosted".to_string(), Some(codestral))
        );
        assert_eq!(
            sim.feature("code_generations"),
            ("self_hosted".to_string(), Some(codestral))
        );
        assert_eq!(
            sim.feature("duo_chat_fix_code"),
            ("disabled".to_string(), None)
        );
        // explain_code already had GitLab's 17.x default, the vendor model.
        assert_eq!(
            sim.feature("duo_chat_explain_code"),
            ("vendored".to_string(), None)
        );
        assert!(!sim.features.contains_key("duo_chat_explain_code"));
        // 17.9 takes one `feature:` per call: four features differed.
        let forms: Vec<bool> = sim
            .mutation_log()
            .iter()
            .filter(|l| l.field == "aiFeatureSettingUpdate")
            .map(|l| l.input.get("feature").is_some() && l.input.get("features").is_none())
            .collect();
        assert_eq!(forms, [true; 4]);
        assert_eq!(
            sim.ai_gateway_url.as_deref(),
            Some("https://aigw.example.com")
        );
        assert_eq!(
            sim.models[&by_hand].name, "by-hand",
            "an unmanaged model is left alone"
        );
    }

    // Idempotent: the agent comes back behind by a revision that changes
    // nothing for it; the sync sends queries only.
    let mutations_before = sim.lock().unwrap().mutations().len();
    resync_unchanged(&mut c, &mut [("gitlab-a", &mut agent)], "a").await;
    assert_eq!(
        sim.lock().unwrap().mutations().len(),
        mutations_before,
        "a sync with nothing to change must not mutate"
    );

    // Rotating the API key pushes the new key, once.
    let rotated = update_model(
        &mut c,
        Model {
            api_key: "sk-rotated".into(),
            ..Default::default()
        },
        "api_key",
    )
    .await;
    wait_synced(&mut c, "gitlab-a", rotated).await;
    {
        let sim = sim.lock().unwrap();
        assert_eq!(
            sim.model_named("mixtral-prod").unwrap().api_token,
            "sk-rotated"
        );
        assert_eq!(
            sim.mutations()[mutations_before..],
            ["aiSelfHostedModelUpdate"]
        );
    }

    // An endpoint change leaves the key out: GitLab keeps it.
    let moved = update_model(
        &mut c,
        Model {
            endpoint: "https://vllm-2.example.internal:8000/v1".into(),
            ..Default::default()
        },
        "endpoint",
    )
    .await;
    wait_synced(&mut c, "gitlab-a", moved).await;
    {
        let sim = sim.lock().unwrap();
        let last = sim.mutation_log().last().cloned().cloned().unwrap();
        assert_eq!(last.field, "aiSelfHostedModelUpdate");
        assert!(last.input.get("apiToken").is_none(), "{:?}", last.input);
        let mixtral = sim.model_named("mixtral-prod").unwrap();
        assert_eq!(mixtral.endpoint, "https://vllm-2.example.internal:8000/v1");
        assert_eq!(mixtral.api_token, "sk-rotated");
    }

    // Dropping a model from duofleet deletes the one the agent created.
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::vendor("duo_chat")),
            ..Default::default()
        })
        .await
        .unwrap();
    c.models
        .delete_model(DeleteModelRequest {
            name: "mixtral-prod".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while sim.lock().unwrap().model_named("mixtral-prod").is_some() {
        assert!(
            Instant::now() < deadline,
            "mixtral-prod was not deleted from GitLab"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sim = sim.lock().unwrap();
    assert_eq!(sim.feature("duo_chat"), ("vendored".to_string(), None));
    assert!(sim.models.contains_key(&by_hand));
}

/// The versions the issue names: each gets its own forms, skips what it
/// lacks with the reason, and a second sync of the same config sends no
/// mutation at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gitlab_version_gets_its_forms_and_a_second_sync_is_silent() {
    const VERSIONS: &[&str] = &[
        "17.4.2-ee",
        "17.8.1-ee",
        "17.11.0-ee",
        "18.3.2-ee",
        "18.9.0-ee",
        "18.11.0-ee",
        "19.0.1-ee",
        "19.2.0-ee",
        "19.3.0-ee",
    ];
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let mut sims = Vec::new();
    let mut agents = Vec::new();
    for version in VERSIONS {
        let (url, sim) = gitlab_sim::start(version, TOKEN).await;
        sim.lock().unwrap().testing_terms_accepted = true;
        let id = format!("gitlab-{}", version.replace('.', "-"));
        agents.push((
            id.clone(),
            agent_with_gitlab(&daemon, dir.path(), &id, &url, TOKEN),
        ));
        sims.push(sim);
    }
    create(&mut c, mk::model("mixtral-prod")).await;
    create(
        &mut c,
        Model {
            family: "general".into(),
            identifier: "custom_openai/Qwen2.5-Coder-32B".into(),
            ..mk::model("qwen-coder")
        },
    )
    .await;
    // A Bedrock model has no endpoint (GitLab 19.0+); a Qwen model is of a
    // family GitLab has from 19.2.
    create(
        &mut c,
        Model {
            family: "claude_3".into(),
            endpoint: String::new(),
            api_key: String::new(),
            identifier: "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0".into(),
            ..mk::model("claude-bedrock")
        },
    )
    .await;
    create(
        &mut c,
        Model {
            family: "qwen".into(),
            identifier: "custom_openai/Qwen3-32B".into(),
            ..mk::model("qwen-native")
        },
    )
    .await;
    let revision = set_default_profile(
        &mut c,
        Profile {
            // GitLab trims the trailing "/": the agent must not resend it.
            ai_gateway_url: "https://aigw.example.com/".into(),
            ai_gateway_timeout_seconds: 120,
            duo_agent_platform_service_url: "dap.example.com:50052".into(),
            features: vec![
                setting("duo_chat", Provider::SelfHosted, "mixtral-prod"),
                setting("duo_chat_fix_code", Provider::SelfHosted, "mixtral-prod"),
                setting("code_completions", Provider::SelfHosted, "qwen-coder"),
                setting("duo_agent_platform", Provider::SelfHosted, "qwen-coder"),
                setting("review_merge_request", Provider::Disabled, ""),
                setting(
                    "duo_chat_explain_code",
                    Provider::SelfHosted,
                    "claude-bedrock",
                ),
                setting("duo_chat_write_tests", Provider::SelfHosted, "qwen-native"),
                setting("duo_chat_troubleshoot_job", Provider::Vendor, ""),
            ],
            ..Default::default()
        },
    )
    .await;
    for ((id, _), (version, sim)) in agents.iter().zip(VERSIONS.iter().zip(&sims)) {
        let i = wait_synced(&mut c, id, revision).await;
        let v = duofleet_proto::GitLabVersion::parse(version).unwrap();
        let at = |major, minor| v >= duofleet_proto::GitLabVersion::new(major, minor);
        let sim = sim.lock().unwrap();
        let mixtral = sim
            .model_named("mixtral-prod")
            .expect("mixtral everywhere")
            .id;
        assert_eq!(
            sim.feature("duo_chat"),
            ("self_hosted".into(), Some(mixtral)),
            "{version}"
        );
        // Features are sent only where GitLab's enum has them: Code Review
        // came in 18.3, Root Cause Analysis in 17.10.
        if at(18, 3) {
            assert_eq!(
                sim.feature("review_merge_request"),
                ("disabled".into(), None),
                "{version}"
            );
        } else {
            assert_eq!(
                item(&i, "feature", "review_merge_request"),
                (
                    SyncItemState::Skipped,
                    format!("not supported by GitLab {v} (it came in 18.3)")
                ),
                "{version}"
            );
        }
        if !at(17, 10) {
            assert_eq!(
                item(&i, "feature", "duo_chat_troubleshoot_job"),
                (
                    SyncItemState::Skipped,
                    format!("not supported by GitLab {v} (it came in 17.10)")
                ),
                "{version}"
            );
        }
        // The model's provider is sent from 18.11 (inferred from the
        // identifier), never before; 19.3 refuses a model without one.
        let model_inputs: Vec<&Value> = sim
            .mutation_log()
            .into_iter()
            .filter(|l| l.field.starts_with("aiSelfHostedModel"))
            .map(|l| &l.input)
            .collect();
        assert!(!model_inputs.is_empty(), "{version}");
        for input in &model_inputs {
            assert_eq!(
                input.get("provider").is_some(),
                at(18, 11),
                "{version}: {input}"
            );
        }
        if at(18, 11) {
            assert_eq!(sim.model_named("mixtral-prod").unwrap().provider, "API");
        }
        // A model without an endpoint needs 19.0.
        if at(19, 0) {
            let bedrock = sim.model_named("claude-bedrock").expect("bedrock model");
            assert_eq!(
                (bedrock.provider.as_str(), bedrock.endpoint.as_str()),
                ("BEDROCK", "")
            );
            assert_eq!(
                sim.feature("duo_chat_explain_code"),
                ("self_hosted".into(), Some(bedrock.id)),
                "{version}"
            );
        } else {
            assert!(sim.model_named("claude-bedrock").is_none(), "{version}");
            let (state, detail) = item(&i, "model", "claude-bedrock");
            assert_eq!(state, SyncItemState::Skipped, "{version}");
            assert_eq!(
                detail,
                format!(
                    "no endpoint: not supported by GitLab {v} (a bedrock model without one came in 19.0)"
                )
            );
            assert_eq!(
                item(&i, "feature", "duo_chat_explain_code").0,
                SyncItemState::Skipped,
                "{version}"
            );
        }
        // QWEN joined GitLab's families in 19.2.
        if at(19, 2) {
            let qwen = sim.model_named("qwen-native").expect("qwen model");
            assert_eq!(qwen.model, "qwen");
            assert_eq!(
                sim.feature("duo_chat_write_tests"),
                ("self_hosted".into(), Some(qwen.id)),
                "{version}"
            );
        } else {
            assert!(sim.model_named("qwen-native").is_none(), "{version}");
            assert_eq!(
                item(&i, "model", "qwen-native"),
                (
                    SyncItemState::Skipped,
                    format!("family qwen: not supported by GitLab {v} (it came in 19.2)")
                ),
                "{version}"
            );
        }
        // The feature form follows the version: `feature:` before 17.11.
        let updates: Vec<&Value> = sim
            .mutation_log()
            .into_iter()
            .filter(|l| l.field == "aiFeatureSettingUpdate")
            .map(|l| &l.input)
            .collect();
        assert!(!updates.is_empty(), "{version}");
        for input in &updates {
            assert_eq!(
                input.get("features").is_some(),
                at(17, 11),
                "{version}: {input}"
            );
            assert_eq!(
                input.get("feature").is_some(),
                !at(17, 11),
                "{version}: {input}"
            );
        }
        // GENERAL came in 18.3; before it the model and its features are skipped.
        if at(18, 3) {
            let qwen = sim.model_named("qwen-coder").expect("general model").id;
            assert_eq!(sim.model_named("qwen-coder").unwrap().model, "general");
            assert_eq!(
                sim.feature("code_completions"),
                ("self_hosted".into(), Some(qwen))
            );
        } else {
            assert!(sim.model_named("qwen-coder").is_none(), "{version}");
            let (state, detail) = item(&i, "model", "qwen-coder");
            assert_eq!(state, SyncItemState::Skipped, "{version}");
            assert_eq!(
                detail,
                format!("family general: not supported by GitLab {v} (it came in 18.3)")
            );
            assert_eq!(
                item(&i, "feature", "code_completions").0,
                SyncItemState::Skipped
            );
        }
        if at(18, 4) {
            let qwen = sim.model_named("qwen-coder").unwrap().id;
            assert_eq!(
                sim.feature("duo_agent_platform"),
                ("self_hosted".into(), Some(qwen))
            );
            assert_eq!(
                sim.duo_agent_platform_service_url.as_deref(),
                Some("dap.example.com:50052")
            );
        } else {
            let (state, detail) = item(&i, "feature", "duo_agent_platform");
            assert_eq!(state, SyncItemState::Skipped, "{version}");
            assert!(
                detail.contains(&format!("not supported by GitLab {v}")),
                "{detail}"
            );
        }
        if at(17, 9) {
            assert_eq!(
                sim.ai_gateway_url.as_deref(),
                Some("https://aigw.example.com"),
                "{version}"
            );
        } else {
            assert!(
                !sim.mutations().contains(&"duoSettingsUpdate".to_string()),
                "{version}"
            );
        }
        if at(18, 7) {
            assert_eq!(sim.ai_gateway_timeout_seconds, 120);
        } else if at(17, 9) {
            assert_eq!(
                item(&i, "setting", "aiGatewayTimeoutSeconds").0,
                SyncItemState::Skipped
            );
            assert_eq!(sim.ai_gateway_timeout_seconds, 60);
        }
        let host = i.host_sync.clone().expect("host layer");
        let expected = if at(18, 0) {
            "takes the gateway only from its database setting"
        } else if at(17, 9) {
            "takes the gateway from its database setting when set"
        } else {
            "takes the gateway from AI_GATEWAY_URL"
        };
        assert!(host.detail.contains(expected), "{version}: {}", host.detail);
    }

    // A second sync of the same configuration: queries only, on every version.
    let before: Vec<usize> = sims
        .iter()
        .map(|s| s.lock().unwrap().mutations().len())
        .collect();
    let mut handles: Vec<(&str, &mut Agent)> =
        agents.iter_mut().map(|(id, a)| (id.as_str(), a)).collect();
    resync_unchanged(&mut c, &mut handles, "b").await;
    for ((version, sim), before) in VERSIONS.iter().zip(&sims).zip(before) {
        let sim = sim.lock().unwrap();
        assert_eq!(
            sim.mutations()[before..],
            [] as [String; 0],
            "GitLab {version} got mutations on an unchanged sync"
        );
        assert!(sim.log.iter().any(|l| l.kind == "query"), "{version}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_item_fails_alone_and_the_host_layer_still_shows() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    sim.lock()
        .unwrap()
        .fail
        .insert("codestral-22b".into(), "Internal server error".into());
    let mut agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, TOKEN);
    mixtral_and_codestral(&mut c).await;
    let revision = set_default_profile(
        &mut c,
        Profile {
            ai_gateway_url: "https://aigw.example.com".into(),
            features: vec![
                setting("duo_chat", Provider::SelfHosted, "mixtral-prod"),
                setting("code_completions", Provider::SelfHosted, "codestral-22b"),
                setting("code_generations", Provider::Vendor, ""),
            ],
            ..Default::default()
        },
    )
    .await;
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed.last_error.contains("not applied: codestral-22b: Internal server error; code_completions: model codestral-22b is not in GitLab"),
        "{}",
        failed.last_error
    );
    // gitlab.rb and reconfigure landed: the instance says so.
    let host = failed.host_sync.clone().expect("host layer");
    assert_eq!((host.applied_revision, host.error.as_str()), (revision, ""));
    assert_eq!(failed.applied_revision, revision);
    assert_eq!(failed.gitlab_sync.as_ref().unwrap().applied_revision, 0);
    assert_eq!(
        item(&failed, "model", "mixtral-prod").0,
        SyncItemState::Applied
    );
    assert_eq!(
        item(&failed, "feature", "duo_chat").0,
        SyncItemState::Applied
    );
    assert_eq!(
        item(&failed, "model", "codestral-22b").0,
        SyncItemState::Failed
    );
    {
        let sim = sim.lock().unwrap();
        let mixtral = sim.model_named("mixtral-prod").unwrap().id;
        assert_eq!(
            sim.feature("duo_chat"),
            ("self_hosted".into(), Some(mixtral))
        );
        assert_eq!(sim.feature("code_generations"), ("vendored".into(), None));
        assert_eq!(sim.feature("code_completions"), ("unassigned".into(), None));
        assert_eq!(
            sim.ai_gateway_url.as_deref(),
            Some("https://aigw.example.com")
        );
    }
    // GitLab recovers; the next sync brings the rest.
    sim.lock().unwrap().fail.clear();
    let next = resync_unchanged(&mut c, &mut [("gitlab-a", &mut agent)], "c").await;
    let synced = wait_synced(&mut c, "gitlab-a", next).await;
    assert_eq!(synced.gitlab_sync.unwrap().applied_revision, next);
    let sim = sim.lock().unwrap();
    let codestral = sim.model_named("codestral-22b").expect("created").id;
    assert_eq!(
        sim.feature("code_completions"),
        ("self_hosted".into(), Some(codestral))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_beta_items_are_named_and_never_lost() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    let mut agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, TOKEN);
    create(
        &mut c,
        Model {
            family: "llama3".into(),
            ..mk::model("llama-70b")
        },
    )
    .await;
    let revision = chat_and_vendor(&mut c, "llama-70b", "duo_chat_troubleshoot_job").await;
    // Hidden items are not failures: the rest is in place.
    let synced = wait_synced(&mut c, "gitlab-a", revision).await;
    assert_hidden(
        &synced,
        "duo_chat_troubleshoot_job",
        "until an administrator accepts the testing terms",
    );
    assert_on_model(&sim, "duo_chat", "llama-70b");

    // GitLab does not list the llama3 model; the agent still knows it.
    let before = sim.lock().unwrap().mutations().len();
    let next = resync_unchanged(&mut c, &mut [("gitlab-a", &mut agent)], "d").await;
    let i = wait_synced(&mut c, "gitlab-a", next).await;
    let (state, detail) = item(&i, "model", "llama-70b");
    assert_eq!(state, SyncItemState::Hidden);
    assert!(detail.contains("created by duofleet"), "{detail}");
    assert_eq!(
        sim.lock().unwrap().mutations().len(),
        before,
        "no mutation for hidden items"
    );
    assert_eq!(sim.lock().unwrap().models.len(), 1, "no second model");

    // An agent that lost its state meets the hidden name: it says why, once,
    // and does not try again until something changes.
    agent.kill9();
    let mut other = agent_with_gitlab(&daemon, dir.path(), "gitlab-b", &url, TOKEN);
    let failed = wait_instance(&mut c, "gitlab-b", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed
            .last_error
            .contains("GitLab already has a model named llama-70b that it does not list"),
        "{}",
        failed.last_error
    );
    let creates = |sim: &Shared| {
        sim.lock()
            .unwrap()
            .mutations()
            .iter()
            .filter(|m| *m == "aiSelfHostedModelCreate")
            .count()
    };
    let tried = creates(&sim);
    other.kill9();
    create(
        &mut c,
        Model {
            family: "gpt".into(),
            ..mk::model("unused-e")
        },
    )
    .await;
    other.restart();
    wait_instance(&mut c, "gitlab-b", "failed again", |i| {
        i.connected
            && i.sync_state() == SyncState::Failed
            && i.desired_revision > failed.desired_revision
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(creates(&sim), tried, "the refused create is not repeated");
    assert_eq!(sim.lock().unwrap().models.len(), 1);
}

/// GitLab's own connection check, as health targets of their own: at most
/// once per interval, and named "not supported" before 17.7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_connection_checks_are_rate_limited_health_targets() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    let (old_url, _old_sim) = gitlab_sim::start("17.6.0-ee", TOKEN).await;
    sim.lock().unwrap().unreachable.insert(
        "https://vllm-down.example.internal:8000/v1".into(),
        "AI gateway: 503 from the model endpoint".into(),
    );
    let check = ["--connection-check-interval", "1h"];
    let _a = agent_with_gitlab_and(&daemon, dir.path(), "gitlab-189", &url, TOKEN, &check);
    let _b = agent_with_gitlab_and(&daemon, dir.path(), "gitlab-176", &old_url, TOKEN, &check);
    create(&mut c, mk::model("up")).await;
    create(
        &mut c,
        Model {
            endpoint: "https://vllm-down.example.internal:8000/v1".into(),
            ..mk::model("down")
        },
    )
    .await;
    set_default_profile(
        &mut c,
        Profile {
            features: vec![
                setting("duo_chat", Provider::SelfHosted, "up"),
                setting("code_completions", Provider::SelfHosted, "down"),
            ],
            ..Default::default()
        },
    )
    .await;
    let check_of = |i: &Instance, model: &str| {
        i.health
            .iter()
            .find(|h| h.kind() == TargetKind::GitlabConnectionCheck && h.target == model)
            .map(|h| (h.state(), h.error.clone()))
    };
    let i = wait_instance(&mut c, "gitlab-189", "connection checks", |i| {
        check_of(i, "up").is_some() && check_of(i, "down").is_some()
    })
    .await;
    assert_eq!(
        check_of(&i, "up"),
        Some((HealthState::Healthy, String::new()))
    );
    assert_eq!(
        check_of(&i, "down"),
        Some((
            HealthState::Unhealthy,
            "AI gateway: 503 from the model endpoint".into()
        ))
    );
    let old = wait_instance(&mut c, "gitlab-176", "connection checks", |i| {
        check_of(i, "up").is_some()
    })
    .await;
    assert_eq!(
        check_of(&old, "up"),
        Some((
            HealthState::Unknown,
            "not supported by GitLab 17.6 (it came in 17.7)".into()
        ))
    );
    // Many health ticks later, still one check per model: it calls the model.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checks = sim
        .lock()
        .unwrap()
        .mutations()
        .iter()
        .filter(|m| *m == "aiSelfHostedModelConnectionCheck")
        .count();
    assert_eq!(checks, 2);
    // The API key went to GitLab's check, never into the result.
    assert!(!format!("{:?}", i.health).contains("sk-test-key"));
}

/// Puma restarts during a reconfigure: GitLab answers 502 for a while. The
/// agent tries the API sync again by itself, with no new revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_gitlab_is_tried_again_by_itself() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    sim.lock().unwrap().down = true;
    let _agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, TOKEN);
    create(&mut c, mk::model("mixtral-prod")).await;
    let revision = set_default_profile(
        &mut c,
        Profile {
            ai_gateway_url: "https://aigw.example.com".into(),
            features: vec![setting("duo_chat", Provider::SelfHosted, "mixtral-prod")],
            ..Default::default()
        },
    )
    .await;
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed.last_error.contains("HTTP 502"),
        "{}",
        failed.last_error
    );
    assert_eq!(failed.host_sync.unwrap().applied_revision, revision);
    sim.lock().unwrap().down = false;
    let synced = wait_synced(&mut c, "gitlab-a", revision).await;
    assert_eq!(synced.gitlab_sync.unwrap().applied_revision, revision);
    assert!(sim.lock().unwrap().model_named("mixtral-prod").is_some());
}

/// A Premium license lacks the vulnerability features; a token of a user
/// who is not an administrator gets nothing listed. Both are named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn license_and_permission_limits_are_named() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (premium_url, premium) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    {
        let mut sim = premium.lock().unwrap();
        sim.premium = true;
        sim.testing_terms_accepted = true;
    }
    let (user_url, user) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    user.lock().unwrap().not_admin = true;
    let _a = agent_with_gitlab(&daemon, dir.path(), "premium", &premium_url, TOKEN);
    let _b = agent_with_gitlab(&daemon, dir.path(), "not-admin", &user_url, TOKEN);
    create(&mut c, mk::model("mixtral-prod")).await;
    let revision = chat_and_vendor(&mut c, "mixtral-prod", "resolve_vulnerability").await;
    let i = wait_synced(&mut c, "premium", revision).await;
    assert_hidden(&i, "resolve_vulnerability", "license tier lacks it");
    assert_on_model(&premium, "duo_chat", "mixtral-prod");

    let failed = wait_instance(&mut c, "not-admin", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed.last_error.contains("mixtral-prod: GitLab answered nothing: the user of --gitlab-token-file may not manage self-hosted models"),
        "{}",
        failed.last_error
    );
    assert!(
        user.lock().unwrap().mutations().is_empty(),
        "nothing is created blind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_a_token_problem_and_not_retried_in_a_loop() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim) = gitlab_sim::start("17.9.0-ee", TOKEN).await;
    let _agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, "glpat-wrong");
    create(&mut c, mk::model("m")).await;
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "m")),
            ..Default::default()
        })
        .await
        .unwrap();
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed.last_error.contains("GitLab refused the token in --gitlab-token-file (HTTP 401: {\"message\":\"Invalid token\"})"),
        "{}",
        failed.last_error
    );
    let attempts = sim.lock().unwrap().log.len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sim.lock().unwrap().log.len(),
        attempts,
        "a 401 must not be retried in a loop"
    );
    assert!(attempts <= 3, "{attempts} attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_refusals_are_surfaced_verbatim() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    // GitLab refuses the endpoint of a model that duofleet accepted.
    sim.lock().unwrap().fail.insert(
        "mixtral-prod".into(),
        "Endpoint is blocked: Requests to the local network are not allowed".into(),
    );
    let _agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, TOKEN);
    create(&mut c, mk::model("mixtral-prod")).await;
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "mixtral-prod")),
            ..Default::default()
        })
        .await
        .unwrap();
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert_eq!(
        failed.last_error,
        "GitLab API: applied nothing; not applied: mixtral-prod: Endpoint is blocked: Requests to the local network are not allowed; duo_chat: model mixtral-prod is not in GitLab"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_file_the_sync_is_off_and_says_so() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let rb = dir.path().join("gitlab.rb");
    std::fs::write(&rb, "").unwrap();
    let agent = Agent::start(
        &daemon,
        "gitlab-a",
        dir.path(),
        &["--gitlab-rb".to_string(), rb.display().to_string()],
    );
    let i = wait_instance(&mut c, "gitlab-a", "connected", |i| i.connected).await;
    let status = i.gitlab_sync.expect("sync status");
    assert!(!status.enabled);
    assert_eq!(status.detail, "off: no --gitlab-token-file");
    assert_eq!(agent.log().matches("GitLab API sync is off").count(), 1);
}

/// Without the self-hosted agent-platform add-on GitLab refuses a
/// self-hosted model for the agent platform with a top-level error: the
/// other features still apply, the refusal reads as the license's, and it
/// is not sent again on the next sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_platform_license_gate_is_named_and_not_resent() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim) = gitlab_sim::start("19.0.0-ee", TOKEN).await;
    sim.lock().unwrap().no_dap_add_on = true;
    let mut agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-dap", &url, TOKEN);
    create(
        &mut c,
        Model {
            family: "claude_3".into(),
            ..mk::model("claude-prod")
        },
    )
    .await;
    let revision = set_default_profile(
        &mut c,
        Profile {
            features: vec![
                setting("duo_chat", Provider::SelfHosted, "claude-prod"),
                setting("duo_agent_platform", Provider::SelfHosted, "claude-prod"),
            ],
            ..Default::default()
        },
    )
    .await;
    let i = wait_synced(&mut c, "gitlab-dap", revision).await;
    assert_on_model(&sim, "duo_chat", "claude-prod");
    assert_eq!(
        sim.lock().unwrap().feature("duo_agent_platform").0,
        "unassigned"
    );
    let (state, detail) = item(&i, "feature", "duo_agent_platform");
    assert_eq!(state, SyncItemState::Hidden);
    assert!(
        detail.starts_with("not permitted by this instance's license")
            && detail.contains(
                "You don't have permission to update the setting ai_self_hosted_model_id."
            ),
        "{detail}"
    );
    let before = sim.lock().unwrap().mutations().len();
    resync_unchanged(&mut c, &mut [("gitlab-dap", &mut agent)], "dap").await;
    let sim = sim.lock().unwrap();
    assert_eq!(
        sim.mutations()[before..],
        [] as [String; 0],
        "the refused setting was sent again"
    );
}

/// A family GitLab accepts for a feature only from a later version is
/// refused on an older instance without a call, in that version's words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatibility_follows_each_instance_version() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (old_url, old) = gitlab_sim::start("18.9.0-ee", TOKEN).await;
    let (new_url, new) = gitlab_sim::start("19.0.0-ee", TOKEN).await;
    let _old_agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-189", &old_url, TOKEN);
    let _new_agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-190", &new_url, TOKEN);
    create(
        &mut c,
        Model {
            family: "mistral".into(),
            ..mk::model("mistral-prod")
        },
    )
    .await;
    let revision = set_default_profile(
        &mut c,
        Profile {
            features: vec![setting(
                "duo_agent_platform",
                Provider::SelfHosted,
                "mistral-prod",
            )],
            ..Default::default()
        },
    )
    .await;
    wait_synced(&mut c, "gitlab-190", revision).await;
    assert_on_model(&new, "duo_agent_platform", "mistral-prod");
    let i = wait_instance(&mut c, "gitlab-189", "FAILED", |i| {
        i.sync_state() == SyncState::Failed && i.desired_revision == revision
    })
    .await;
    assert_eq!(
        item(&i, "feature", "duo_agent_platform"),
        (
            SyncItemState::Failed,
            "Mistral is incompatible with the All agents, except Agentic Chat feature on GitLab 18.9 (GitLab accepts it from 19.0)".into()
        )
    );
    assert!(
        !old.lock()
            .unwrap()
            .mutations()
            .contains(&"aiFeatureSettingUpdate".to_string()),
        "the refused setting was sent"
    );
}
