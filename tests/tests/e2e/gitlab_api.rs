//! Models and feature settings reach GitLab through its GraphQL API: real
//! daemon and agents against the GitLab simulator.

use crate::fresh_daemon;
use crate::{WAIT, wait_instance, wait_synced};
use duofleet_proto::v1::{
    CreateModelRequest, DeleteModelRequest, FeatureSetting, Model, Profile, Provider,
    SetFeatureSettingRequest, SyncState, UpdateModelRequest, UpdateProfileRequest,
};
use duofleet_tests::agent::{Agent, FakeCommand};
use duofleet_tests::gitlab_sim::{self, Shared};
use duofleet_tests::{Clients, Daemon, mk};
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
        .create_model(CreateModelRequest { model: Some(model) })
        .await
        .unwrap()
        .into_inner()
        .revision
}

fn model_named<'a>(sim: &'a gitlab_sim::Sim, name: &str) -> Option<&'a gitlab_sim::SimModel> {
    sim.models.values().find(|m| m.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_features_reach_gitlab_idempotently() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url, sim): (String, Shared) = gitlab_sim::start("17.9.0-ee", TOKEN).await;
    let by_hand = sim.lock().unwrap().add_model_by_hand("by-hand", "GPT");
    let mut agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, TOKEN);

    create(&mut c, mk::model("mixtral-prod")).await;
    create(
        &mut c,
        Model {
            family: "codestral".into(),
            ..mk::model("codestral-22b")
        },
    )
    .await;
    let revision = c
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: "https://aigw.example.com".into(),
                features: vec![
                    setting("duo_chat", Provider::SelfHosted, "mixtral-prod"),
                    setting("code_completions", Provider::SelfHosted, "codestral-22b"),
                    setting("code_generations", Provider::SelfHosted, "codestral-22b"),
                    setting("duo_chat_explain_code", Provider::Vendor, ""),
                    setting("summarize_review", Provider::Disabled, ""),
                ],
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    let synced = wait_synced(&mut c, "gitlab-a", revision).await;
    let status = synced.gitlab_sync.expect("sync status");
    assert!(status.enabled);
    assert_eq!(status.detail, "GitLab 17.9.0-ee");
    assert_eq!(status.unmanaged_models, ["by-hand"]);
    {
        let sim = sim.lock().unwrap();
        let mixtral = model_named(&sim, "mixtral-prod").expect("created");
        assert_eq!(
            (mixtral.model.as_str(), mixtral.api_token.as_str()),
            ("MIXTRAL", "sk-test-key-of-mixtral-prod")
        );
        assert_eq!(mixtral.endpoint, "https://vllm.example.internal:8000/v1");
        assert_eq!(
            mixtral.identifier,
            "custom_openai/Mixtral-8x7B-Instruct-v0.1"
        );
        let codestral = model_named(&sim, "codestral-22b").expect("created").id;
        assert_eq!(
            sim.features["DUO_CHAT"],
            ("SELF_HOSTED".to_string(), Some(mixtral.id))
        );
        assert_eq!(
            sim.features["CODE_COMPLETIONS"],
            ("SELF_HOSTED".to_string(), Some(codestral))
        );
        assert_eq!(
            sim.features["CODE_GENERATIONS"],
            ("SELF_HOSTED".to_string(), Some(codestral))
        );
        assert_eq!(
            sim.features["DUO_CHAT_EXPLAIN_CODE"],
            ("VENDORED".to_string(), None)
        );
        assert_eq!(
            sim.features["SUMMARIZE_REVIEW"],
            ("DISABLED".to_string(), None)
        );
        // One call per (provider, model): the two codestral features share one.
        assert_eq!(
            sim.mutations()
                .iter()
                .filter(|m| *m == "aiFeatureSettingUpdate")
                .count(),
            4
        );
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
    agent.kill9();
    let unrelated = create(
        &mut c,
        Model {
            family: "gpt".into(),
            ..mk::model("unused")
        },
    )
    .await;
    agent.restart();
    wait_synced(&mut c, "gitlab-a", unrelated).await;
    assert_eq!(
        sim.lock().unwrap().mutations().len(),
        mutations_before,
        "a sync with nothing to change must not mutate"
    );

    // Rotating the API key pushes the new key, once.
    let rotated = c
        .models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: "mixtral-prod".into(),
                api_key: "sk-rotated".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["api_key".into()],
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_synced(&mut c, "gitlab-a", rotated).await;
    {
        let sim = sim.lock().unwrap();
        assert_eq!(
            model_named(&sim, "mixtral-prod").unwrap().api_token,
            "sk-rotated"
        );
        assert_eq!(
            sim.mutations()[mutations_before..],
            ["aiSelfHostedModelUpdate"]
        );
    }

    // Dropping a model from duofleet deletes the one the agent created.
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::vendor("duo_chat")),
        })
        .await
        .unwrap();
    // No profile uses it now: the agent deletes it from GitLab, and
    // deleting it from duofleet is allowed.
    c.models
        .delete_model(DeleteModelRequest {
            name: "mixtral-prod".into(),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while model_named(&sim.lock().unwrap(), "mixtral-prod").is_some() {
        assert!(
            Instant::now() < deadline,
            "mixtral-prod was not deleted from GitLab"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sim = sim.lock().unwrap();
    assert_eq!(sim.features["DUO_CHAT"], ("VENDORED".to_string(), None));
    assert!(sim.models.contains_key(&by_hand));
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
    let (url, sim) = gitlab_sim::start("17.9.0-ee", TOKEN).await;
    // This GitLab accepts only Mistral for General Chat.
    sim.lock()
        .unwrap()
        .compatible
        .insert("DUO_CHAT".into(), vec!["MISTRAL".into()]);
    let _agent = agent_with_gitlab(&daemon, dir.path(), "gitlab-a", &url, TOKEN);
    create(&mut c, mk::model("mixtral-prod")).await;
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "mixtral-prod")),
        })
        .await
        .unwrap();
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert_eq!(
        failed.last_error,
        "GitLab API: applied created model mixtral-prod; not applied: duo_chat: Mixtral is incompatible with the General Chat feature"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_gitlabs_get_the_forms_they_understand() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (url_178, sim_178) = gitlab_sim::start("17.8.2-ee", TOKEN).await;
    let (url_172, sim_172) = gitlab_sim::start("17.2.0-ee", TOKEN).await;
    let _a = agent_with_gitlab(&daemon, dir.path(), "gitlab-178", &url_178, TOKEN);
    let _b = agent_with_gitlab(&daemon, dir.path(), "gitlab-172", &url_172, TOKEN);
    create(&mut c, mk::model("mixtral-prod")).await;
    let revision = c
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: "https://aigw.example.com".into(),
                features: vec![
                    setting("duo_chat", Provider::SelfHosted, "mixtral-prod"),
                    setting("duo_chat_fix_code", Provider::SelfHosted, "mixtral-prod"),
                ],
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_synced(&mut c, "gitlab-178", revision).await;
    wait_synced(&mut c, "gitlab-172", revision).await;
    for sim in [&sim_178, &sim_172] {
        let sim = sim.lock().unwrap();
        let id = model_named(&sim, "mixtral-prod").unwrap().id;
        assert_eq!(
            sim.features["DUO_CHAT"],
            ("SELF_HOSTED".to_string(), Some(id))
        );
        assert_eq!(
            sim.features["DUO_CHAT_FIX_CODE"],
            ("SELF_HOSTED".to_string(), Some(id))
        );
        // Before 17.9 the environment variable is the only gateway setting.
        assert!(!sim.mutations().contains(&"duoSettingsUpdate".to_string()));
        assert_eq!(sim.ai_gateway_url, None);
    }
    // 17.8 takes the list in one call; 17.2 refuses it and gets one call per feature.
    let features = |sim: &Shared| {
        sim.lock()
            .unwrap()
            .mutations()
            .iter()
            .filter(|m| *m == "aiFeatureSettingUpdate")
            .count()
    };
    assert_eq!(features(&sim_178), 1);
    assert_eq!(features(&sim_172), 3);
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
