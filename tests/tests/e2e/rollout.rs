//! Staged rollouts, maintenance windows and profile inheritance, with real
//! agents (a fake gitlab-ctl each) and the fake endpoints.

use crate::agents::{ENV_HASH_RB, linux_agent, set_gateway};
use crate::{WAIT, fresh_daemon, instance, wait_instance, wait_synced};
use duofleet_proto::v1::{
    AbortRolloutRequest, CreateModelRequest, CreateProfileRequest, DeleteProfileRequest, Gate,
    GetRolloutRequest, HealthState, Model, Profile, ReconfigureWindow, ResumeRolloutRequest,
    Rollout, RolloutSpec, RolloutState, SyncState, UpdateProfileRequest, Wave, WaveState,
};
use duofleet_tests::agent::{Agent, FakeCommand};
use duofleet_tests::endpoints::Endpoint;
use duofleet_tests::{Clients, Daemon, http_get, mk};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::Code;

pub(crate) fn spec(waves: Vec<Wave>, bake_secs: i64) -> RolloutSpec {
    RolloutSpec {
        waves,
        gate: Some(Gate {
            bake: Some(prost_types::Duration {
                seconds: bake_secs,
                nanos: 0,
            }),
            max_failed: 0,
            ..Default::default()
        }),
    }
}

fn selector(key: &str, value: &str) -> Wave {
    Wave {
        selector: [(key.to_string(), value.to_string())].into(),
        ..Default::default()
    }
}

pub(crate) fn percent(p: u32) -> Wave {
    Wave {
        percent: p,
        ..Default::default()
    }
}

pub(crate) fn count(n: u32) -> Wave {
    Wave {
        count: n,
        ..Default::default()
    }
}

/// Sets the default profile's gateway as a staged change: (revision, rollout id).
pub(crate) async fn staged_gateway(
    c: &mut Clients,
    url: &str,
    rollout: RolloutSpec,
) -> (u64, String) {
    let response = c
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: url.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["ai_gateway_url".into()],
            }),
            rollout: Some(rollout),
            ..Default::default()
        })
        .await
        .unwrap();
    let id = response
        .metadata()
        .get("duofleet-rollout")
        .expect("the rollout id header")
        .to_str()
        .unwrap()
        .to_string();
    (response.into_inner().revision, id)
}

pub(crate) async fn rollout(c: &mut Clients, id: &str) -> Rollout {
    c.rollouts
        .get_rollout(GetRolloutRequest { id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn wait_rollout(
    c: &mut Clients,
    id: &str,
    what: &str,
    check: impl Fn(&Rollout) -> bool,
) -> Rollout {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = rollout(c, id).await;
        if check(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "rollout {id} never {what}: {r:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn gateway_in(rb: &Path) -> String {
    let text = std::fs::read_to_string(rb).unwrap();
    duofleet_agent::gitlab_rb::read_gateway_url(&text)
        .unwrap()
        .unwrap_or_default()
}

struct Fleet {
    agents: Vec<(Agent, FakeCommand, PathBuf)>,
}

impl Fleet {
    fn start(daemon: &Daemon, root: &Path, n: usize, canaries: usize) -> Fleet {
        let agents = (0..n)
            .map(|i| {
                let id = format!("gitlab-{i:02}");
                let label = if i < canaries { "canary" } else { "main" };
                let labels = format!("ring={label}");
                linux_agent(daemon, root, &id, ENV_HASH_RB, &["--label", &labels])
            })
            .collect();
        Fleet { agents }
    }

    fn ids(&self) -> Vec<String> {
        self.agents
            .iter()
            .map(|(a, _, _)| a.instance_id.clone())
            .collect()
    }

    fn rb(&self, id: &str) -> &Path {
        &self
            .agents
            .iter()
            .find(|(a, _, _)| a.instance_id == id)
            .unwrap()
            .2
    }
}

/// A daemon on `data`, `agents` agents on gateway a, and a staged change to
/// gateway b whose first wave (one instance) is baking for `bake_secs`.
struct Baking {
    daemon: Daemon,
    listen: String,
    c: Clients,
    fleet: Fleet,
    /// The change's revision, and its rollout.
    revision: u64,
    id: String,
    rollout: Rollout,
}

async fn baking_first_wave(root: &Path, data: &Path, agents: usize, bake_secs: i64) -> Baking {
    let daemon = Daemon::start(data);
    let listen = daemon.grpc_addr.clone();
    let mut c = daemon.clients().await;
    let fleet = Fleet::start(&daemon, root, agents, 0);
    let before = set_gateway(&mut c, "default", "https://aigw-a.example.com").await;
    for id in fleet.ids() {
        wait_synced(&mut c, &id, before).await;
    }
    let (revision, id) = staged_gateway(
        &mut c,
        "https://aigw-b.example.com",
        spec(vec![count(1), percent(100)], bake_secs),
    )
    .await;
    let rollout = wait_rollout(&mut c, &id, "baking wave 1", |r| {
        r.waves[0].state() == WaveState::Baking
    })
    .await;
    Baking {
        daemon,
        listen,
        c,
        fleet,
        revision,
        id,
        rollout,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_agents_in_three_waves_converge_wave_by_wave() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let fleet = Fleet::start(&daemon, dir.path(), 10, 2);
    let before = set_gateway(&mut c, "default", "https://aigw-a.example.com").await;
    for id in fleet.ids() {
        wait_synced(&mut c, &id, before).await;
    }
    let (revision, id) = staged_gateway(
        &mut c,
        "https://aigw-b.example.com",
        spec(
            vec![selector("ring", "canary"), percent(50), percent(100)],
            1,
        ),
    )
    .await;
    assert_eq!(id, format!("r-{revision}"));
    let started = rollout(&mut c, &id).await;
    assert_eq!(started.base_revision, before);
    assert_eq!(started.profiles, ["default"]);
    let waves: Vec<Vec<String>> = started.waves.iter().map(|w| w.instances.clone()).collect();
    assert_eq!(waves[0], ["gitlab-00", "gitlab-01"], "the canaries first");
    assert_eq!((waves[1].len(), waves[2].len()), (4, 4));
    let metrics = http_get(&daemon.http_addr, "/metrics").1;
    assert!(
        metrics.contains(&format!(
            "duofleet_rollout_instances{{rollout=\"{id}\",state=\"waiting\"}} 8"
        )),
        "{metrics}"
    );

    // Wave by wave: whenever a wave is open, the later waves still have
    // the old gateway, and have not been told otherwise.
    let mut seen_open = Vec::new();
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let r = rollout(&mut c, &id).await;
        if let Some(open) = r.waves.iter().position(|w| w.state() != WaveState::Passed) {
            if !seen_open.contains(&open) {
                seen_open.push(open);
            }
            let mut seen = Vec::new();
            for later in &r.waves[open + 1..] {
                for instance_id in &later.instances {
                    let i = instance(&mut c, instance_id).await.unwrap();
                    seen.push((
                        instance_id.clone(),
                        gateway_in(fleet.rb(instance_id)),
                        i.desired_revision,
                    ));
                }
            }
            // What was seen counts only if the wave was still open after:
            // the gate may open the next one between the reads.
            let still = rollout(&mut c, &id).await;
            if still.waves[open].state() != WaveState::Passed {
                for (instance_id, gateway, desired) in seen {
                    assert_eq!(gateway, "https://aigw-a.example.com", "{instance_id}");
                    assert_eq!(desired, before, "{instance_id} was sent the change early");
                }
            }
        }
        if r.state() == RolloutState::Succeeded {
            break;
        }
        assert_eq!(r.state(), RolloutState::Progressing, "{r:#?}");
        assert!(Instant::now() < deadline, "{r:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen_open, [0, 1, 2]);
    for id in fleet.ids() {
        wait_synced(&mut c, &id, revision).await;
        assert_eq!(gateway_in(fleet.rb(&id)), "https://aigw-b.example.com");
    }
    // One reconfigure each for the rollout.
    for (agent, ctl, _) in &fleet.agents {
        assert_eq!(ctl.calls().len(), 2, "{}", agent.instance_id);
    }
}

/// Three agents on gateway a, two of them canaries; the second canary's
/// host goes away (OFFLINE).
async fn an_offline_canary(daemon: &Daemon, root: &Path) -> (Clients, Fleet) {
    let mut c = daemon.clients().await;
    let mut fleet = Fleet::start(daemon, root, 3, 2);
    let before = set_gateway(&mut c, "default", "https://aigw-a.example.com").await;
    for id in fleet.ids() {
        wait_synced(&mut c, &id, before).await;
    }
    fleet.agents[1].0.kill9();
    wait_instance(&mut c, "gitlab-01", "offline", |i| {
        i.sync_state() == SyncState::Offline
    })
    .await;
    (c, fleet)
}

/// An OFFLINE instance holds its wave, however long the bake, and the
/// rollout's status names it (the API's and duofleetctl's); once deleted,
/// it no longer counts and the rollout goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_instance_holds_its_wave_and_the_status_names_it() {
    let (dir, daemon) = fresh_daemon();
    let (mut c, _fleet) = an_offline_canary(&daemon, dir.path()).await;
    let (_, id) = staged_gateway(
        &mut c,
        "https://aigw-b.example.com",
        spec(vec![selector("ring", "canary"), percent(100)], 1),
    )
    .await;
    let waiting = wait_rollout(&mut c, &id, "waiting for the offline canary", |r| {
        r.waves[0].applied == 1
    })
    .await;
    assert_eq!(waiting.waves[0].waiting, ["gitlab-01 (OFFLINE)"]);
    assert_eq!(waiting.waves[0].waiting_count, 1);
    // Well past the 1 s bake, the wave still waits for it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held = rollout(&mut c, &id).await;
    assert_eq!(held.state(), RolloutState::Progressing);
    assert_eq!(
        (held.waves[0].state(), held.waves[1].state()),
        (WaveState::Applying, WaveState::Waiting)
    );
    let status = crate::ctl::ok(&daemon, dir.path(), &["rollout", "status", &id], &[]);
    assert!(status.contains("waits for 1"), "{status}");
    assert!(
        status.contains("wave 1 waits for: gitlab-01 (OFFLINE)"),
        "{status}"
    );

    // Deleted, it no longer counts.
    crate::delete_instance(&mut c, "gitlab-01").await.unwrap();
    let done = wait_rollout(&mut c, &id, "succeeded", |r| {
        r.state() == RolloutState::Succeeded
    })
    .await;
    assert!(done.waves.iter().all(|w| w.waiting.is_empty()), "{done:#?}");
}

/// With `offlineAfter`, an instance OFFLINE that long counts as FAILED:
/// with `maxFailed: 0` the gate pauses the rollout and says why, instead
/// of waiting for the host. The waves file's `offlineAfter` reaches the
/// gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_offline_past_offline_after_counts_as_failed() {
    let (dir, daemon) = fresh_daemon();
    let (mut c, _fleet) = an_offline_canary(&daemon, dir.path()).await;
    std::fs::write(
        dir.path().join("gateway.yaml"),
        "apiVersion: duofleet/v1\nprofiles:\n  - name: default\n    aiGatewayUrl: https://aigw-b.example.com\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("waves.yaml"),
        "waves:\n  - selector: {ring: canary}\n  - percent: 100\ngate:\n  bake: 1s\n  maxFailed: 0\n  offlineAfter: 1s\n",
    )
    .unwrap();
    let started = crate::ctl::ok(
        &daemon,
        dir.path(),
        &["apply", "-f", "gateway.yaml", "--rollout", "waves.yaml"],
        &[],
    );
    let id = started
        .split_whitespace()
        .find(|w| w.starts_with("r-"))
        .map(|w| w.trim_end_matches(':').to_string())
        .unwrap_or_else(|| panic!("no rollout id in {started:?}"));
    let paused = wait_rollout(&mut c, &id, "paused", |r| r.state() == RolloutState::Paused).await;
    assert_eq!(paused.waves[0].failed, 1, "{paused:#?}");
    assert!(
        paused.reason.starts_with(
            "wave 1 gate: 1 instances FAILED, more than max_failed 0: gitlab-01 (OFFLINE for "
        ),
        "{}",
        paused.reason
    );
    assert_eq!(paused.waves[1].state(), WaveState::Waiting);
}

/// A held profile refuses other changes; a model endpoint that goes down
/// in wave 1 pauses the rollout before wave 2; an abort puts wave 1 back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regression_in_wave_one_pauses_and_an_abort_restores() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let gateway_a = Endpoint::start(&[]).await;
    let gateway_b = Endpoint::start(&[]).await;
    let model = Endpoint::start(&["Mixtral-8x7B-Instruct-v0.1"]).await;
    let fleet = Fleet::start(&daemon, dir.path(), 4, 0);
    c.models
        .create_model(CreateModelRequest {
            model: Some(Model {
                endpoint: format!("{}/v1", model.base),
                ..mk::model("m")
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    c.profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: gateway_a.base.clone(),
                features: vec![mk::self_hosted("duo_chat", "m")],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = crate::revision_numbers(&mut c).await[0];
    for id in fleet.ids() {
        wait_instance(&mut c, &id, "synced and healthy", |i| {
            i.sync_state() == SyncState::Synced
                && i.applied_revision == before
                && i.health
                    .iter()
                    .any(|h| h.target == "m" && h.state() == HealthState::Healthy)
        })
        .await;
    }
    let (revision, id) = staged_gateway(
        &mut c,
        &gateway_b.base,
        spec(vec![count(2), percent(100)], 600),
    )
    .await;
    let r = wait_rollout(&mut c, &id, "baking wave 1", |r| {
        r.waves[0].state() == WaveState::Baking
    })
    .await;
    let wave1 = r.waves[0].instances.clone();
    let wave2 = r.waves[1].instances.clone();

    // While it runs, the profile is held.
    let held = c
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: "https://elsewhere.example.com".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["ai_gateway_url".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(held.code(), Code::FailedPrecondition);
    assert!(
        held.message().contains(&format!("rollout {id}")),
        "{}",
        held.message()
    );

    // The model goes down: the gate pauses before wave 2, saying why.
    model.stop();
    let paused = wait_rollout(&mut c, &id, "paused", |r| r.state() == RolloutState::Paused).await;
    assert!(
        paused.reason.starts_with("wave 1 gate: health got worse:")
            && paused.reason.contains(" m healthy -> unhealthy"),
        "{}",
        paused.reason
    );
    assert_eq!(paused.waves[1].state(), WaveState::Waiting);
    for instance_id in &wave2 {
        assert_eq!(gateway_in(fleet.rb(instance_id)), gateway_a.base);
    }
    for instance_id in &wave1 {
        assert_eq!(gateway_in(fleet.rb(instance_id)), gateway_b.base);
    }

    // Abort: a new revision; wave 1 goes back, wave 2 never moved.
    let aborted = c
        .rollouts
        .abort_rollout(AbortRolloutRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(aborted.state(), RolloutState::Aborted);
    assert_eq!(aborted.abort_revision, revision + 1);
    // Wave 1 gets the abort's revision; wave 2 receives the same as
    // before, so nothing is sent to it.
    for instance_id in &wave1 {
        wait_synced(&mut c, instance_id, aborted.abort_revision).await;
    }
    for instance_id in fleet.ids() {
        let i = instance(&mut c, &instance_id).await.unwrap();
        assert_eq!(i.sync_state(), SyncState::Synced, "{instance_id}");
        assert_eq!(gateway_in(fleet.rb(&instance_id)), gateway_a.base);
    }
    for (agent, ctl, _) in &fleet.agents {
        let expected = if wave1.contains(&agent.instance_id) {
            3
        } else {
            1
        };
        assert_eq!(ctl.calls().len(), expected, "{}", agent.instance_id);
    }
    // Ended: the profile is free again, and it cannot be resumed.
    set_gateway(&mut c, "default", &gateway_b.base).await;
    let resumed = c
        .rollouts
        .resume_rollout(ResumeRolloutRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(resumed.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_of_duofleetd_mid_rollout_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Baking {
        daemon,
        listen,
        fleet,
        revision,
        id,
        rollout: baking,
        ..
    } = baking_first_wave(dir.path(), &data, 3, 3).await;
    let wave2 = baking.waves[1].instances.clone();
    daemon.kill9();

    let daemon = crate::restart_daemon(&data, listen);
    assert!(
        daemon
            .log()
            .contains(&format!("resuming rollout rollout={id}")),
        "{}",
        daemon.log()
    );
    let mut c = daemon.clients().await;
    // Where it was: wave 1 open (its gate starts over while the agents
    // reconnect), wave 2 still waiting.
    let resumed = rollout(&mut c, &id).await;
    assert_eq!(resumed.state(), RolloutState::Progressing);
    assert!(matches!(
        resumed.waves[0].state(),
        WaveState::Applying | WaveState::Baking
    ));
    assert_eq!(resumed.waves[1].state(), WaveState::Waiting);
    // Until wave 2 opens, its instances keep the old gateway.
    for instance_id in &wave2 {
        assert_eq!(
            gateway_in(fleet.rb(instance_id)),
            "https://aigw-a.example.com"
        );
    }
    wait_rollout(&mut c, &id, "succeeded", |r| {
        r.state() == RolloutState::Succeeded
    })
    .await;
    for id in fleet.ids() {
        wait_synced(&mut c, &id, revision).await;
        assert_eq!(gateway_in(fleet.rb(&id)), "https://aigw-b.example.com");
    }
}

/// A graceful shutdown mid-rollout ends a WatchRollout stream with
/// UNAVAILABLE (watch again later) instead of cutting it off, and the
/// rollout is where it was after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_ends_rollout_watches_with_unavailable() {
    use duofleet_proto::v1::WatchRolloutRequest;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Baking {
        daemon,
        listen,
        mut c,
        fleet: _fleet,
        id,
        ..
    } = baking_first_wave(dir.path(), &data, 2, 3600).await;
    let mut watch = c
        .rollouts
        .watch_rollout(WatchRolloutRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().id, id);

    assert!(daemon.stop("TERM").success());
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch did not end");
    let status = ended.expect_err("the watch ended without a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");

    let daemon = crate::restart_daemon(&data, listen);
    let mut c = daemon.clients().await;
    let resumed = rollout(&mut c, &id).await;
    assert_eq!(resumed.state(), RolloutState::Progressing);
    assert_eq!(resumed.waves[1].state(), WaveState::Waiting);
}

/// A window that is closed now: the gateway change waits (no reconfigure,
/// gitlab.rb untouched, WAITING_FOR_WINDOW with the opening), and so does
/// drift repair; once the window is open, it applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_keeps_reconfigure_out_of_its_hours() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    let first = set_gateway(&mut c, "default", "https://aigw-a.example.com").await;
    wait_synced(&mut c, "gitlab-a", first).await;
    // Open for one hour, starting two hours from now (UTC).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hour = |offset: u64| format!("{:02}:00", (now / 3600 + offset) % 24);
    let closed = ReconfigureWindow {
        days: vec![],
        start: hour(2),
        end: hour(3),
        time_zone: "UTC".into(),
    };
    let update = |window: ReconfigureWindow, url: &str| UpdateProfileRequest {
        profile: Some(Profile {
            name: "default".into(),
            ai_gateway_url: url.into(),
            reconfigure_window: Some(window),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["ai_gateway_url".into(), "reconfigure_window".into()],
        }),
        ..Default::default()
    };
    let revision = c
        .profiles
        .update_profile(update(closed.clone(), "https://aigw-b.example.com"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let waiting = wait_instance(&mut c, "gitlab-a", "waiting for the window", |i| {
        i.sync_state() == SyncState::WaitingForWindow
    })
    .await;
    let host = waiting.host_sync.unwrap();
    let opens = host.waiting_until.expect("the next opening");
    let expected_open = (now / 3600 + 2) * 3600;
    assert_eq!(opens.seconds as u64, expected_open, "{host:?}");
    assert!(
        host.detail.contains("waits for the reconfigure window"),
        "{}",
        host.detail
    );
    assert_eq!(waiting.applied_revision, first);
    assert_eq!(waiting.desired_revision, revision);
    assert_eq!(gateway_in(&rb), "https://aigw-a.example.com");
    assert_eq!(ctl.calls().len(), 1);

    // Open now: the waiting change applies, with one reconfigure.
    let open = ReconfigureWindow {
        days: vec![],
        start: hour(0),
        end: hour(2),
        time_zone: "UTC".into(),
    };
    let revision = c
        .profiles
        .update_profile(update(open, "https://aigw-b.example.com"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_synced(&mut c, "gitlab-a", revision).await;
    assert_eq!(gateway_in(&rb), "https://aigw-b.example.com");
    assert_eq!(ctl.calls().len(), 2);

    // Closed again, then a hand edit: drift is reported, not repaired.
    let revision = c
        .profiles
        .update_profile(update(closed, "https://aigw-b.example.com"))
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_synced(&mut c, "gitlab-a", revision).await;
    let text = std::fs::read_to_string(&rb).unwrap();
    std::fs::write(
        &rb,
        text.replace("https://aigw-b.example.com", "https://by-hand.example.com"),
    )
    .unwrap();
    let drifted = wait_instance(&mut c, "gitlab-a", "drifted", |i| {
        i.sync_state() == SyncState::Drifted
    })
    .await;
    assert!(
        drifted
            .last_error
            .contains("the repair waits for the reconfigure window"),
        "{}",
        drifted.last_error
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gateway_in(&rb), "https://by-hand.example.com");
    assert_eq!(ctl.calls().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_profile_follows_its_parent() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_agent, ctl, rb) = linux_agent(
        &daemon,
        dir.path(),
        "gitlab-c",
        ENV_HASH_RB,
        &["--label", "ring=canary"],
    );
    set_gateway(&mut c, "default", "https://aigw-a.example.com").await;
    c.profiles
        .create_profile(CreateProfileRequest {
            profile: Some(Profile {
                name: "canary".into(),
                parent: "default".into(),
                selector: [("ring".to_string(), "canary".to_string())].into(),
                priority: 10,
                features: vec![mk::vendor("duo_chat")],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let revision = crate::revision_numbers(&mut c).await[0];
    let i = wait_synced(&mut c, "gitlab-c", revision).await;
    assert_eq!(i.profile, "canary");
    assert_eq!(gateway_in(&rb), "https://aigw-a.example.com");
    // A change to the parent reaches the child's instances.
    let revision = set_gateway(&mut c, "default", "https://aigw-b.example.com").await;
    wait_synced(&mut c, "gitlab-c", revision).await;
    assert_eq!(gateway_in(&rb), "https://aigw-b.example.com");
    assert_eq!(ctl.calls().len(), 2);
    // Where each value comes from.
    let effective = instance(&mut c, "gitlab-c")
        .await
        .unwrap()
        .effective
        .unwrap();
    assert_eq!(effective.sources["ai_gateway_url"], "default");
    assert_eq!(effective.sources["features.duo_chat"], "canary");
    // No cycles, at most 4 levels, and a parent in use stays.
    for (name, parent) in [("p1", "canary"), ("p2", "p1"), ("p3", "p2")] {
        let result = c
            .profiles
            .create_profile(CreateProfileRequest {
                profile: Some(Profile {
                    name: name.into(),
                    parent: parent.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        if name == "p3" {
            let err = result.unwrap_err();
            assert_eq!(err.code(), Code::FailedPrecondition);
            assert!(
                err.message().contains(
                    "the chain p3 -> p2 -> p1 -> canary -> default is longer than 4 profiles"
                ),
                "{}",
                err.message()
            );
        } else {
            result.unwrap();
        }
    }
    let cycle = c
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "canary".into(),
                parent: "p2".into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["parent".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(cycle.code(), Code::FailedPrecondition);
    assert!(cycle.message().contains("cycle"), "{}", cycle.message());
    let in_use = c
        .profiles
        .delete_profile(DeleteProfileRequest {
            name: "p1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition);
    assert!(
        in_use.message().contains("is the parent of profile \"p2\""),
        "{}",
        in_use.message()
    );
}
