//! Endpoint health, probed by real agents from their host: the gateway and
//! every model of the profile, with the failures an operator must see.

use crate::fresh_daemon;
use crate::wait_instance;
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::{
    CreateModelRequest, EndpointHealth, GetFleetHealthRequest, HealthState, Instance, Model,
    Profile, TargetKind, UpdateProfileRequest,
};
use duofleet_tests::agent::Agent;
use duofleet_tests::endpoints::{Endpoint, TestCa};
use duofleet_tests::{Clients, Daemon, mk};
use std::path::Path;
use std::time::{Duration, Instant};

const KEY: &str = "sk-health-canary-5d1f";

pub(crate) fn start_agent(daemon: &Daemon, root: &Path, id: &str, extra: &[&str]) -> Agent {
    let rb = root.join(format!("{id}-gitlab.rb"));
    std::fs::write(&rb, "").unwrap();
    let mut args: Vec<String> = [
        "--gitlab-rb",
        &rb.display().to_string(),
        "--reconfigure-command",
        "true",
        "--probe-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start(daemon, id, root, &args)
}

/// Points the default profile at `gateway` and its features at `models`.
async fn configure(c: &mut Clients, gateway: &str, models: Vec<Model>) {
    let mut features = Vec::new();
    for (model, feature) in
        models
            .into_iter()
            .zip(["duo_chat", "code_completions", "code_generations"])
    {
        features.push(mk::self_hosted(feature, &model.name));
        c.models
            .create_model(CreateModelRequest {
                model: Some(model),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    c.profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: gateway.into(),
                features,
                ..Default::default()
            }),
            update_mask: None,
            ..Default::default()
        })
        .await
        .unwrap();
}

fn vllm(name: &str, endpoint: &str, served: &str) -> Model {
    Model {
        name: name.into(),
        family: "mixtral".into(),
        endpoint: format!("{endpoint}/v1"),
        api_key: KEY.into(),
        identifier: format!("custom_openai/{served}"),
        ..Default::default()
    }
}

fn target<'a>(instance: &'a Instance, name: &str) -> Option<&'a EndpointHealth> {
    instance.health.iter().find(|h| h.target == name)
}

fn state_of(instance: &Instance, name: &str) -> Option<HealthState> {
    target(instance, name).map(|h| h.state())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_endpoint_turns_unhealthy_with_the_error() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let gateway = Endpoint::start(&[]).await;
    let model = Endpoint::start(&["Mixtral-8x7B-Instruct-v0.1"]).await;
    let _agent = start_agent(&daemon, dir.path(), "gitlab-a", &[]);
    let bedrock = Model {
        name: "bedrock-mixtral".into(),
        family: "mixtral".into(),
        endpoint: model.base.clone(),
        identifier: "bedrock/mistral.mixtral-8x7b-instruct-v0:1".into(),
        ..Default::default()
    };
    configure(
        &mut c,
        &gateway.base,
        vec![
            vllm("mixtral-prod", &model.base, "Mixtral-8x7B-Instruct-v0.1"),
            bedrock,
        ],
    )
    .await;
    let mut events = crate::watch_fleet(&mut c).await;

    let healthy = wait_instance(&mut c, "gitlab-a", "healthy", |i| {
        i.health.len() == 3 && i.health.iter().all(|h| h.state() == HealthState::Healthy)
    })
    .await;
    assert_eq!(
        target(&healthy, &gateway.base).unwrap().kind(),
        TargetKind::AiGateway
    );
    assert_eq!(
        target(&healthy, "mixtral-prod").unwrap().kind(),
        TargetKind::Model
    );
    assert!(
        model
            .behaviour
            .lock()
            .unwrap()
            .authorizations
            .contains(&format!("Bearer {KEY}")),
        "the probe must present the model's API key"
    );

    model.stop();
    let failing = wait_instance(&mut c, "gitlab-a", "unhealthy", |i| {
        state_of(i, "mixtral-prod") == Some(HealthState::Unhealthy)
            && state_of(i, "bedrock-mixtral") == Some(HealthState::Unhealthy)
    })
    .await;
    let vllm_error = &target(&failing, "mixtral-prod").unwrap().error;
    assert!(
        vllm_error.starts_with(&format!("GET {}/v1/models failed:", model.base)),
        "{vllm_error}"
    );
    assert!(
        vllm_error.to_lowercase().contains("connect"),
        "{vllm_error}"
    );
    let bedrock_error = &target(&failing, "bedrock-mixtral").unwrap().error;
    assert!(
        bedrock_error.contains("is not reachable")
            && bedrock_error.ends_with("(credentials were not checked)"),
        "{bedrock_error}"
    );
    assert_eq!(
        state_of(&failing, &gateway.base),
        Some(HealthState::Healthy)
    );
    // Transitions: healthy, then unhealthy, for the model.
    let model_transitions: Vec<HealthState> = failing
        .health_transitions
        .iter()
        .filter(|h| h.target == "mixtral-prod")
        .map(|h| h.state())
        .collect();
    assert_eq!(
        model_transitions,
        [HealthState::Healthy, HealthState::Unhealthy]
    );

    let fleet = c
        .fleet
        .get_fleet_health(GetFleetHealthRequest::default())
        .await
        .unwrap()
        .into_inner();
    let of = |name: &str| {
        fleet
            .targets
            .iter()
            .find(|t| t.target == name)
            .unwrap()
            .clone()
    };
    let m = of("mixtral-prod");
    assert_eq!((m.healthy, m.unhealthy, m.unknown), (0, 1, 0));
    assert_eq!(m.failing[0].instance_id, "gitlab-a");
    assert_eq!(&m.failing[0].error, vllm_error);
    assert_eq!(of(&gateway.base).healthy, 1);

    let mut saw = false;
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_secs(5), events.message()).await
    {
        // The event names the target that changed, its new state and why.
        if let Some(Event::HealthChanged(e)) = &event.event
            && e.instance_id == "gitlab-a"
            && e.targets.iter().any(|t| {
                t.target == "mixtral-prod"
                    && t.state() == HealthState::Unhealthy
                    && &t.error == vllm_error
            })
        {
            saw = true;
            break;
        }
    }
    assert!(
        saw,
        "WatchFleet emitted no health-changed event naming mixtral-prod as unhealthy"
    );

    // No report, response or log carries the key.
    let log = daemon.log();
    assert!(log.contains("agent connected"));
    assert!(!log.contains(KEY), "API key in the daemon log");
    assert!(!format!("{failing:?} {fleet:?}").contains(KEY));
    assert!(!_agent.log().contains(KEY), "API key in the agent log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_identifier_names_the_served_models() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let gateway = Endpoint::start(&[]).await;
    let model = Endpoint::start(&["Mistral-7B-Instruct-v0.3", "Meta-Llama-3-8B"]).await;
    let _agent = start_agent(&daemon, dir.path(), "gitlab-a", &[]);
    configure(
        &mut c,
        &gateway.base,
        vec![vllm(
            "mixtral-prod",
            &model.base,
            "Mixtral-8x7B-Instruct-v0.1",
        )],
    )
    .await;
    let i = wait_instance(&mut c, "gitlab-a", "unhealthy", |i| {
        state_of(i, "mixtral-prod") == Some(HealthState::Unhealthy)
    })
    .await;
    assert_eq!(
        target(&i, "mixtral-prod").unwrap().error,
        format!(
            "{}/v1/models does not serve \"Mixtral-8x7B-Instruct-v0.1\" (identifier custom_openai/Mixtral-8x7B-Instruct-v0.1); it serves: Mistral-7B-Instruct-v0.3, Meta-Llama-3-8B",
            model.base
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_needs_the_ca_bundle() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let ca = TestCa::new();
    let bundle = dir.path().join("ca.pem");
    ca.write_ca(&bundle);
    let gateway = Endpoint::start_tls(&[], &ca).await;
    let model = Endpoint::start_tls(&["Mixtral-8x7B-Instruct-v0.1"], &ca).await;
    let _without = start_agent(&daemon, dir.path(), "no-bundle", &[]);
    let _with = start_agent(
        &daemon,
        dir.path(),
        "with-bundle",
        &["--ca-bundle", &bundle.display().to_string()],
    );
    configure(
        &mut c,
        &gateway.base,
        vec![vllm(
            "mixtral-prod",
            &model.base,
            "Mixtral-8x7B-Instruct-v0.1",
        )],
    )
    .await;

    let trusted = wait_instance(&mut c, "with-bundle", "healthy", |i| {
        i.health.len() == 2 && i.health.iter().all(|h| h.state() == HealthState::Healthy)
    })
    .await;
    assert_eq!(
        state_of(&trusted, "mixtral-prod"),
        Some(HealthState::Healthy)
    );
    let refused = wait_instance(&mut c, "no-bundle", "unhealthy", |i| {
        state_of(i, "mixtral-prod") == Some(HealthState::Unhealthy)
    })
    .await;
    let error = target(&refused, "mixtral-prod")
        .unwrap()
        .error
        .to_lowercase();
    assert!(error.contains("certificate"), "{error}");
    assert_eq!(
        state_of(&refused, &gateway.base),
        Some(HealthState::Unhealthy)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_are_honoured_and_no_proxy_bypasses_them() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let gateway = Endpoint::start(&[]).await;
    let model = Endpoint::start(&["Mixtral-8x7B-Instruct-v0.1"]).await;
    // A proxy that is not there: everything through it fails.
    let dead_proxy = "http://127.0.0.1:9";
    let args = |id: &str| -> Vec<String> {
        let rb = dir.path().join(format!("{id}.rb"));
        std::fs::write(&rb, "").unwrap();
        [
            "--gitlab-rb",
            &rb.display().to_string(),
            "--reconfigure-command",
            "true",
            "--probe-timeout",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let _proxied = Agent::start_with_env(
        &daemon,
        "proxied",
        dir.path(),
        &args("proxied"),
        &[("http_proxy", dead_proxy), ("no_proxy", "")],
    );
    let _bypass = Agent::start_with_env(
        &daemon,
        "bypass",
        dir.path(),
        &args("bypass"),
        &[("http_proxy", dead_proxy), ("no_proxy", "127.0.0.1")],
    );
    configure(
        &mut c,
        &gateway.base,
        vec![vllm(
            "mixtral-prod",
            &model.base,
            "Mixtral-8x7B-Instruct-v0.1",
        )],
    )
    .await;
    let proxied = wait_instance(&mut c, "proxied", "unhealthy", |i| {
        state_of(i, "mixtral-prod") == Some(HealthState::Unhealthy)
    })
    .await;
    let error = target(&proxied, "mixtral-prod").unwrap().error.clone();
    assert!(error.contains("/v1/models failed"), "{error}");
    wait_instance(&mut c, "bypass", "healthy", |i| {
        state_of(i, "mixtral-prod") == Some(HealthState::Healthy)
    })
    .await;
}

/// An agent of gitlab-a with `--health-heartbeat heartbeat`, once its
/// healthy gateway is reported.
struct HealthyAgent {
    _dir: tempfile::TempDir,
    daemon: Daemon,
    c: Clients,
    gateway: Endpoint,
    _agent: Agent,
}

async fn healthy_agent(heartbeat: &str) -> HealthyAgent {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let gateway = Endpoint::start(&[]).await;
    let agent = start_agent(
        &daemon,
        dir.path(),
        "gitlab-a",
        &["--health-heartbeat", heartbeat],
    );
    configure(&mut c, &gateway.base, vec![]).await;
    wait_instance(&mut c, "gitlab-a", "healthy", |i| {
        state_of(i, &gateway.base) == Some(HealthState::Healthy)
    })
    .await;
    HealthyAgent {
        _dir: dir,
        daemon,
        c,
        gateway,
        _agent: agent,
    }
}

/// The health-changed events WatchFleet sends in the next 1.5 s.
async fn health_changed_events(c: &mut Clients) -> usize {
    let mut events = crate::watch_fleet(c).await;
    let mut changed = 0;
    let deadline = Instant::now() + Duration::from_millis(1500);
    while let Ok(Ok(Some(event))) = tokio::time::timeout(
        deadline.saturating_duration_since(Instant::now()),
        events.message(),
    )
    .await
    {
        if matches!(event.event, Some(Event::HealthChanged(_))) {
            changed += 1;
        }
    }
    changed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_results_are_not_resent_before_the_heartbeat() {
    let mut a = healthy_agent("1h").await;
    let gateway = &a.gateway;
    // Several probe intervals (300 ms) pass with the same result: no report.
    assert_eq!(health_changed_events(&mut a.c).await, 0);
    // A change goes at once.
    gateway.behaviour.lock().unwrap().status = 503;
    let i = wait_instance(&mut a.c, "gitlab-a", "unhealthy", |i| {
        state_of(i, &gateway.base) == Some(HealthState::Unhealthy)
    })
    .await;
    assert_eq!(
        target(&i, &gateway.base).unwrap().error,
        format!("GET {}/monitoring/healthz answered HTTP 503", gateway.base)
    );
    // /metrics counts the fleet's targets by their latest state.
    let (_, metrics) = duofleet_tests::http_get(&a.daemon.http_addr, "/metrics");
    for (state, label) in [
        (HealthState::Healthy, "healthy"),
        (HealthState::Unhealthy, "unhealthy"),
    ] {
        let want = i.health.iter().filter(|h| h.state() == state).count() as f64;
        let series = format!("duofleet_endpoint_targets{{state=\"{label}\"}}");
        assert_eq!(
            duofleet_tests::metric(&metrics, &series),
            Some(want),
            "{series}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_are_counted_but_raise_no_health_changed_event() {
    let mut a = healthy_agent("200ms").await;
    let addr = a.daemon.http_addr.clone();
    let reports = || {
        let (_, metrics) = duofleet_tests::http_get(&addr, "/metrics");
        duofleet_tests::metric(&metrics, "duofleet_health_reports_total")
            .expect("duofleet_health_reports_total in /metrics")
    };
    let before = reports();
    let changed = health_changed_events(&mut a.c).await;
    // Heartbeats arrived (every 200 ms), and none of them is an event.
    assert!(reports() >= before + 3.0, "too few heartbeats counted");
    assert_eq!(changed, 0);
}

/// A leaked key is rotated, then an unrelated change is rolled back: the
/// rollback restores configuration, never the revoked key. The model
/// endpoint itself shows which key the GitLab host presents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_a_key_rotation_keeps_the_new_key() {
    use duofleet_proto::v1::{RollbackRequest, SetFeatureSettingRequest, UpdateModelRequest};
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let gateway = Endpoint::start(&[]).await;
    let model = Endpoint::start(&["Mixtral-8x7B-Instruct-v0.1"]).await;
    let _agent = start_agent(&daemon, dir.path(), "gitlab-a", &[]);
    configure(
        &mut c,
        &gateway.base,
        vec![vllm(
            "mixtral-prod",
            &model.base,
            "Mixtral-8x7B-Instruct-v0.1",
        )],
    )
    .await; // 1: model, 2: profile
    let presented = |key: &str| {
        model
            .behaviour
            .lock()
            .unwrap()
            .authorizations
            .contains(&format!("Bearer {key}"))
    };
    duofleet_tests::wait_for(Duration::from_secs(30), || presented(KEY).then_some(())).await;

    c.models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: "mixtral-prod".into(),
                api_key: "sk-rotated-after-the-leak".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["api_key".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap(); // 3
    duofleet_tests::wait_for(Duration::from_secs(30), || {
        presented("sk-rotated-after-the-leak").then_some(())
    })
    .await;
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::vendor("code_generations")),
            ..Default::default()
        })
        .await
        .unwrap(); // 4: the unrelated change
    let rollback = c
        .history
        .rollback(RollbackRequest {
            revision: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rollback.summary, "rollback to revision 2");
    crate::wait_synced(&mut c, "gitlab-a", rollback.revision).await;
    model.behaviour.lock().unwrap().authorizations.clear();
    duofleet_tests::wait_for(Duration::from_secs(30), || {
        (model.behaviour.lock().unwrap().authorizations.len() >= 3).then_some(())
    })
    .await;
    let seen = model.behaviour.lock().unwrap().authorizations.clone();
    assert!(
        seen.iter().all(|a| a == "Bearer sk-rotated-after-the-leak"),
        "the revoked key came back: {seen:?}"
    );
}
