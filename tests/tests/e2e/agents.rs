//! Real agents against the real daemon: AI_GATEWAY_URL reaches gitlab.rb
//! and Helm values exactly as an administrator would write it, reconfigure
//! runs once per change, failures roll back, and outages and crashes
//! converge without extra reconfigures.

use crate::fresh_daemon;
use crate::{WAIT, instance, wait_instance, wait_synced};
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::{
    CreateModelRequest, CreateProfileRequest, ListInstancesRequest, Profile,
    SetFeatureSettingRequest, SyncState, UpdateProfileRequest,
};
use duofleet_tests::agent::{Agent, FakeCommand};
use duofleet_tests::{Clients, Daemon, DaemonOptions, mk};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) const ENV_HASH_RB: &str = r#"external_url 'https://gitlab-a.example.com'
gitlab_rails['time_zone'] = 'UTC'

gitlab_rails['env'] = {
  'http_proxy' => 'http://proxy.corp:3128',
  # 'AI_GATEWAY_URL' => 'http://commented-out:5052',
  "no_proxy" => "localhost,127.0.0.1", # internal traffic stays direct
  'GITLAB_LICENSE_MODE' => 'test',
}

nginx['listen_port'] = 8080
"#;

const STOCK_RB: &str = r#"## GitLab configuration settings
external_url 'https://gitlab-b.example.com'

### Environment variables
# gitlab_rails['env'] = {
#   'BUNDLE_GEMFILE' => "/opt/gitlab/embedded/service/gitlab-rails/Gemfile",
#   'PATH' => "/opt/gitlab/bin:/opt/gitlab/embedded/bin:/bin:/usr/bin"
# }
"#;

pub(crate) fn args(pairs: &[&str]) -> Vec<String> {
    pairs.iter().map(|s| s.to_string()).collect()
}

/// A Linux-package agent with its own gitlab.rb and fake gitlab-ctl.
pub(crate) fn linux_agent(
    daemon: &Daemon,
    root: &Path,
    id: &str,
    gitlab_rb: &str,
    extra: &[&str],
) -> (Agent, FakeCommand, std::path::PathBuf) {
    let ctl = FakeCommand::new(&root.join(format!("{id}-ctl")));
    let rb = root.join(format!("{id}-gitlab.rb"));
    std::fs::write(&rb, gitlab_rb).unwrap();
    let mut all = args(&[
        "--gitlab-rb",
        &rb.display().to_string(),
        "--reconfigure-command",
        &ctl.command("reconfigure"),
    ]);
    all.extend(args(extra));
    (Agent::start(daemon, id, root, &all), ctl, rb)
}

pub(crate) async fn set_gateway(c: &mut Clients, profile: &str, url: &str) -> u64 {
    c.profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: profile.into(),
                ai_gateway_url: url.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["ai_gateway_url".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// Lines of `after` not in `before`, and of `before` not in `after`.
fn line_diff(before: &str, after: &str) -> (Vec<String>, Vec<String>) {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    (
        a.iter()
            .filter(|l| !b.contains(l))
            .map(|l| l.to_string())
            .collect(),
        b.iter()
            .filter(|l| !a.contains(l))
            .map(|l| l.to_string())
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_get_the_gateway_with_one_reconfigure_each() {
    let (dir, daemon) = fresh_daemon();
    let root = dir.path();
    let mut c = daemon.clients().await;
    let (_a, ctl_a, rb_a) = linux_agent(&daemon, root, "gitlab-a", ENV_HASH_RB, &[]);
    let (_b, ctl_b, rb_b) = linux_agent(&daemon, root, "gitlab-b", STOCK_RB, &[]);
    let helm = FakeCommand::new(&root.join("helm"));
    let values = root.join("gitlab-c-values.yaml");
    let _c_agent = Agent::start(
        &daemon,
        "gitlab-c",
        root,
        &args(&[
            "--deployment",
            "helm",
            "--helm-values",
            &values.display().to_string(),
            "--helm-command",
            &helm.command("upgrade gitlab gitlab/gitlab --reuse-values -f {values}"),
            "--label",
            "ring=canary",
        ]),
    );
    for id in ["gitlab-a", "gitlab-b", "gitlab-c"] {
        wait_synced(&mut c, id, 0).await;
    }

    let url = "https://aigw.example.com:5052";
    let revision = set_gateway(&mut c, "default", url).await;
    for id in ["gitlab-a", "gitlab-b", "gitlab-c"] {
        let i = wait_synced(&mut c, id, revision).await;
        assert_eq!(i.profile, "default");
    }

    // A: only the new entry line was added; everything else byte-identical.
    let a = std::fs::read_to_string(&rb_a).unwrap();
    let (added, removed) = line_diff(ENV_HASH_RB, &a);
    assert_eq!(added, [format!("  'AI_GATEWAY_URL' => '{url}',")]);
    assert!(removed.is_empty());
    let backup = rb_a.with_file_name("gitlab-a-gitlab.rb.duofleet-backup");
    assert_eq!(
        std::fs::read_to_string(backup).unwrap(),
        ENV_HASH_RB,
        "one backup of the previous version"
    );
    // B: the stock file is untouched and a marked block follows it.
    let b = std::fs::read_to_string(&rb_b).unwrap();
    assert!(b.starts_with(STOCK_RB));
    assert!(
        b.contains("# BEGIN duofleet managed")
            && b.contains(&format!("'AI_GATEWAY_URL' => '{url}'"))
    );
    // C: the Helm values, and the helm command with the values path.
    let c_values: serde_json::Value = read_yaml(&values);
    for component in ["webservice", "sidekiq", "toolbox"] {
        assert_eq!(
            c_values["gitlab"][component]["extraEnv"]["AI_GATEWAY_URL"], url,
            "{component}"
        );
    }
    assert_eq!(ctl_a.calls(), ["reconfigure"]);
    assert_eq!(ctl_b.calls(), ["reconfigure"]);
    assert_eq!(
        helm.calls(),
        [format!(
            "upgrade gitlab gitlab/gitlab --reuse-values -f {}",
            values.display()
        )]
    );

    // A feature-only change reaches every agent and runs no reconfigure.
    c.models
        .create_model(CreateModelRequest {
            model: Some(mk::model("mixtral-prod")),
            ..Default::default()
        })
        .await
        .unwrap();
    let feature = c
        .profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "mixtral-prod")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    for id in ["gitlab-a", "gitlab-b", "gitlab-c"] {
        wait_synced(&mut c, id, feature).await;
    }
    assert_eq!(
        ctl_a.calls().len() + ctl_b.calls().len() + helm.calls().len(),
        3
    );

    // A canary profile moves only the canary instance, with its own URLs.
    let canary = c
        .profiles
        .create_profile(CreateProfileRequest {
            profile: Some(Profile {
                name: "canary".into(),
                ai_gateway_url: "https://aigw-canary.example.com".into(),
                ai_gateway_internal_url: "http://ai-gateway.gitlab.svc.cluster.local:5052".into(),
                selector: BTreeMap::from([("ring".to_string(), "canary".to_string())]),
                priority: 10,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let moved = wait_synced(&mut c, "gitlab-c", canary.revision).await;
    assert_eq!(moved.profile, "canary");
    let c_values: serde_json::Value = read_yaml(&values);
    assert_eq!(
        c_values["gitlab"]["webservice"]["extraEnv"]["AI_GATEWAY_URL"],
        "https://aigw-canary.example.com"
    );
    assert_eq!(
        c_values["gitlab"]["sidekiq"]["extraEnv"]["AI_GATEWAY_URL"],
        "http://ai-gateway.gitlab.svc.cluster.local:5052"
    );
    assert_eq!(helm.calls().len(), 2);
    // The default instances were sent nothing: they stay at the feature revision.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in ["gitlab-a", "gitlab-b"] {
        let i = instance(&mut c, id).await.unwrap();
        assert_eq!(
            (i.applied_revision, i.desired_revision, i.sync_state()),
            (feature, feature, SyncState::Synced)
        );
    }
    assert_eq!(ctl_a.calls().len() + ctl_b.calls().len(), 2);

    let listed = c
        .fleet
        .list_instances(ListInstancesRequest {
            selector: BTreeMap::from([("ring".into(), "canary".into())]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .instances
            .iter()
            .map(|i| i.instance_id.as_str())
            .collect::<Vec<_>>(),
        ["gitlab-c"]
    );
}

fn read_yaml(path: &Path) -> serde_json::Value {
    serde_norway::from_str(&std::fs::read_to_string(path).unwrap())
        .expect("the values file is YAML")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reconfigure_restores_gitlab_rb_and_reports_failed() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    wait_synced(&mut c, "gitlab-a", 0).await;
    ctl.fail_next(Some(1));
    let revision = set_gateway(&mut c, "default", "https://aigw.example.com").await;
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert_eq!(failed.applied_revision, 0);
    assert_eq!(failed.desired_revision, revision);
    assert!(
        failed.last_error.contains("failed (exit code 1)"),
        "{}",
        failed.last_error
    );
    assert!(
        failed
            .last_error
            .contains("There was an error running gitlab-ctl reconfigure"),
        "{}",
        failed.last_error
    );
    assert!(
        failed
            .last_error
            .contains("restored the previous file and ran it again"),
        "{}",
        failed.last_error
    );
    assert_eq!(
        std::fs::read_to_string(&rb).unwrap(),
        ENV_HASH_RB,
        "gitlab.rb must be byte-identical"
    );
    // The failed run, then the run that brings the previous state back.
    assert_eq!(ctl.calls(), ["reconfigure", "reconfigure"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconverge_after_kill_9_of_the_daemon_without_reconfiguring() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_a, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    let first = set_gateway(&mut c, "default", "https://aigw-1.example.com").await;
    wait_synced(&mut c, "gitlab-a", first).await;
    let listen = daemon.grpc_addr.clone();
    let data = daemon.data_dir().to_path_buf();
    daemon.kill9();

    // The node keeps its configuration while the daemon is away.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        std::fs::read_to_string(&rb)
            .unwrap()
            .contains("https://aigw-1.example.com")
    );

    let daemon = crate::restart_daemon(&data, listen);
    let mut c = daemon.clients().await;
    let back = wait_synced(&mut c, "gitlab-a", first).await;
    assert!(back.connected);
    assert_eq!(
        ctl.calls().len(),
        1,
        "a reconnect must not reconfigure again"
    );

    let second = set_gateway(&mut c, "default", "https://aigw-2.example.com").await;
    wait_synced(&mut c, "gitlab-a", second).await;
    assert_eq!(ctl.calls().len(), 2);
    assert!(
        std::fs::read_to_string(&rb)
            .unwrap()
            .contains("'AI_GATEWAY_URL' => 'https://aigw-2.example.com',")
    );
}

/// A graceful restart: the daemon tells the agent when to come back, and
/// the agent, behind by a revision that did not change it (another
/// profile's), is sent nothing: its Hello's digest matches.
///
/// Shutting down waits for calls, not for clients: once every agent has
/// been told when to come back and no call is left, a peer that holds its
/// connection open without answering (here one that never gets past the
/// HTTP/2 preface, so never acknowledges the closing handshake) does not
/// hold the restart back until the 10 s grace runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_says_when_to_come_back_and_resends_nothing() {
    use std::io::Write;
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (agent, ctl, _rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    let first = set_gateway(&mut c, "default", "https://aigw-1.example.com").await;
    wait_synced(&mut c, "gitlab-a", first).await;
    // Another profile, for instances this one is not: a new revision
    // that leaves gitlab-a's configuration as it was.
    let other = c
        .profiles
        .create_profile(CreateProfileRequest {
            profile: Some(Profile {
                selector: BTreeMap::from([("ring".to_string(), "canary".to_string())]),
                ..mk::profile("canary")
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other.revision > first);
    let mut silent = std::net::TcpStream::connect(&daemon.grpc_addr).unwrap();
    // The client preface and an empty SETTINGS frame, then nothing.
    silent
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let listen = daemon.grpc_addr.clone();
    let data = daemon.data_dir().to_path_buf();
    let started = Instant::now();
    assert!(daemon.stop("TERM").success());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutting down took {took:?}: it waited for the silent connection"
    );
    drop(silent);
    let hint = duofleet_tests::wait_for(WAIT, || {
        agent
            .log()
            .lines()
            .find(|l| l.contains("the control plane is restarting"))
            .map(str::to_string)
    })
    .await;
    assert!(
        hint.contains("duofleetd is shutting down; reconnect in"),
        "{hint}"
    );

    let daemon = crate::restart_daemon(&data, listen);
    let mut c = daemon.clients().await;
    let back = wait_synced(&mut c, "gitlab-a", first).await;
    assert_eq!(back.desired_revision, first, "nothing was sent");
    assert_eq!(ctl.calls().len(), 1, "nothing was reconfigured");
    // The next change for it arrives as usual.
    let next = set_gateway(&mut c, "default", "https://aigw-2.example.com").await;
    wait_synced(&mut c, "gitlab-a", next).await;
    assert_eq!(ctl.calls().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_agent_during_reconfigure_converges_on_restart() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (mut agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    wait_synced(&mut c, "gitlab-a", 0).await;
    ctl.set_sleep(Some(2));
    let revision = set_gateway(&mut c, "default", "https://aigw.example.com").await;
    let deadline = Instant::now() + WAIT;
    while ctl.calls().is_empty() {
        assert!(Instant::now() < deadline, "reconfigure never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill9();
    // Never partial: the old file or the complete new one.
    let text = std::fs::read_to_string(&rb).unwrap();
    let (added, removed) = line_diff(ENV_HASH_RB, &text);
    assert!(removed.is_empty() && added.len() <= 1, "{text}");
    ctl.set_sleep(None);
    agent.restart();
    wait_synced(&mut c, "gitlab-a", revision).await;
    // The interrupted run happens again, once.
    assert_eq!(ctl.calls(), ["reconfigure", "reconfigure"]);
    assert!(
        std::fs::read_to_string(&rb)
            .unwrap()
            .contains("'AI_GATEWAY_URL' => 'https://aigw.example.com',")
    );
}

/// The agent dies during a reconfigure and the control plane is away too.
/// On restart the agent stops the orphaned reconfigure (two never overlap)
/// and finishes the interrupted apply by itself, from the desired
/// configuration on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_apply_is_finished_at_start_without_the_control_plane() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (mut agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    wait_synced(&mut c, "gitlab-a", 0).await;
    // Long enough that the orphan cannot end by itself before the agent is
    // back, on a loaded machine.
    ctl.set_sleep(Some(8));
    set_gateway(&mut c, "default", "https://aigw.example.com").await;
    let deadline = Instant::now() + WAIT;
    while ctl.calls().is_empty() {
        assert!(Instant::now() < deadline, "reconfigure never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    agent.kill9();
    daemon.kill9();
    ctl.set_sleep(None);
    agent.restart();
    let deadline = Instant::now() + WAIT;
    while ctl.calls().len() < 2 || ctl.finished() < 1 {
        assert!(
            Instant::now() < deadline,
            "the interrupted apply was not finished: {:?}\n{}",
            ctl.calls(),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        std::fs::read_to_string(&rb)
            .unwrap()
            .contains("'AI_GATEWAY_URL' => 'https://aigw.example.com',")
    );
    // The orphan (8 s) would have finished by now had it not been stopped.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(ctl.finished(), 1, "two reconfigures ran to the end");
    assert_eq!(ctl.calls(), ["reconfigure", "reconfigure"]);
    assert!(
        agent
            .log()
            .contains("stopped a reconfigure that a previous agent left running"),
        "{}",
        agent.log()
    );
}

/// gitlab.rb is a link into a configuration checkout: the agent edits the
/// file it points to and keeps the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_gitlab_rb_keeps_its_link() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    let checkout = dir.path().join("config-repo");
    std::fs::create_dir_all(&checkout).unwrap();
    let target = checkout.join("gitlab.rb");
    std::fs::rename(&rb, &target).unwrap();
    std::os::unix::fs::symlink(&target, &rb).unwrap();
    let revision = set_gateway(&mut c, "default", "https://aigw.example.com").await;
    wait_synced(&mut c, "gitlab-a", revision).await;
    assert!(
        std::fs::symlink_metadata(&rb)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced by a regular file"
    );
    assert!(
        std::fs::read_to_string(&target)
            .unwrap()
            .contains("'AI_GATEWAY_URL' => 'https://aigw.example.com',")
    );
    assert_eq!(ctl.calls(), ["reconfigure"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edits_are_reported_as_drift_and_repaired() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_repairing, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    let (_watching, _ctl_b, rb_b) = linux_agent(
        &daemon,
        dir.path(),
        "gitlab-b",
        ENV_HASH_RB,
        &["--repair-drift", "false"],
    );
    let revision = set_gateway(&mut c, "default", "https://aigw.example.com").await;
    wait_synced(&mut c, "gitlab-a", revision).await;
    wait_synced(&mut c, "gitlab-b", revision).await;
    let mut events = crate::watch_fleet(&mut c).await;
    let desired = std::fs::read_to_string(&rb).unwrap();
    let hand_edit = desired.replace("https://aigw.example.com", "http://someone-else:5052");
    std::fs::write(&rb, &hand_edit).unwrap();
    std::fs::write(&rb_b, &hand_edit).unwrap();

    // gitlab-b only reports it.
    let drifted = wait_instance(&mut c, "gitlab-b", "drifted", |i| {
        i.sync_state() == SyncState::Drifted
    })
    .await;
    assert!(drifted.last_error.contains("sets AI_GATEWAY_URL to \"http://someone-else:5052\" instead of https://aigw.example.com"), "{}", drifted.last_error);
    assert_eq!(std::fs::read_to_string(&rb_b).unwrap(), hand_edit);

    // gitlab-a puts it back and reconfigures once more.
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(&rb).unwrap() != desired {
        assert!(Instant::now() < deadline, "drift was not repaired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_synced(&mut c, "gitlab-a", revision).await;
    assert_eq!(ctl.calls().len(), 2);
    let mut saw_drift = false;
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_secs(5), events.message()).await
    {
        if let Some(Event::Drifted(e)) = event.event
            && e.instance_id == "gitlab-a"
        {
            saw_drift = true;
            break;
        }
    }
    assert!(saw_drift, "WatchFleet showed no drift event for gitlab-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_is_final_and_deleted_instances_are_forgotten() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let bad_token = dir.path().join("bad.token");
    std::fs::write(&bad_token, "duofleet_not-the-token\n").unwrap();
    let mut refused = Agent::start(
        &daemon,
        "intruder",
        dir.path(),
        &args(&[
            "--enroll-token-file",
            &bad_token.display().to_string(),
            "--gitlab-rb",
            "/nonexistent",
        ]),
    );
    let status = refused.wait_exit(WAIT);
    assert!(!status.success());
    assert!(
        refused
            .log()
            .contains("the control plane refused this agent (Unauthenticated: invalid token"),
        "{}",
        refused.log()
    );
    assert!(instance(&mut c, "intruder").await.is_none());

    // The operator token is not an agent token, and the other way round.
    let admin_token = daemon.data_dir().join("admin.token");
    let mut operator = Agent::start(
        &daemon,
        "operator",
        dir.path(),
        &args(&[
            "--enroll-token-file",
            &admin_token.display().to_string(),
            "--gitlab-rb",
            "/nonexistent",
        ]),
    );
    assert!(!operator.wait_exit(WAIT).success());
    assert!(
        operator.log().contains(
            "PermissionDenied: token \"admin\" is an operator token, not for this service"
        ),
        "{}",
        operator.log()
    );
    let agent_token = std::fs::read_to_string(daemon.data_dir().join("enroll.token")).unwrap();
    let mut as_agent = Clients::new(daemon.channel().await, Some(agent_token.trim().to_string()));
    let denied = as_agent
        .fleet
        .list_instances(ListInstancesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "token \"enroll\" is an agent enrollment token, not for this service"
    );

    let (mut agent, _ctl, _rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    wait_synced(&mut c, "gitlab-a", 0).await;
    delete_when_offline(&mut c, &mut agent, "gitlab-a").await;
    let again = crate::delete_instance(&mut c, "gitlab-a")
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::NotFound);
}

/// Kills `agent` (instance `id`), waits until the daemon shows it OFFLINE,
/// and deletes the instance, which is then gone.
async fn delete_when_offline(c: &mut Clients, agent: &mut Agent, id: &str) {
    agent.kill9();
    wait_instance(c, id, "offline", |i| {
        !i.connected && i.sync_state() == SyncState::Offline
    })
    .await;
    crate::delete_instance(c, id).await.unwrap();
    assert!(instance(c, id).await.is_none());
}

/// An instance deleted while OFFLINE (as an operator lets go of one that
/// holds a rollout's wave) is forgotten; when its agent comes back, it
/// registers again as new and gets what its profile says now, including a
/// change made while it was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_offline_instance_comes_back_as_new_and_catches_up() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (mut agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    let first = set_gateway(&mut c, "default", "https://aigw-1.example.com").await;
    wait_synced(&mut c, "gitlab-a", first).await;
    assert_eq!(ctl.calls().len(), 1);
    delete_when_offline(&mut c, &mut agent, "gitlab-a").await;
    let second = set_gateway(&mut c, "default", "https://aigw-2.example.com").await;

    agent.restart();
    let back = wait_synced(&mut c, "gitlab-a", second).await;
    assert_eq!(back.desired_revision, second);
    assert_eq!(
        ctl.calls().len(),
        2,
        "one reconfigure for the change it missed"
    );
    let edited = std::fs::read_to_string(&rb).unwrap();
    assert!(edited.contains("https://aigw-2.example.com"), "{edited}");
    // Listed once, as any other instance.
    let listed = crate::list_instances(&mut c).await;
    assert_eq!(
        listed
            .iter()
            .filter(|i| i.instance_id == "gitlab-a")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_goes_offline_and_does_not_hold_up_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let options = DaemonOptions {
        args: args(&["--keepalive-ms", "500"]),
        ..Default::default()
    };
    let daemon = Daemon::start_with(&dir.path().join("data"), options);
    let mut c = daemon.clients().await;
    let (frozen, _ctl_f, rb_frozen) = linux_agent(&daemon, dir.path(), "frozen", ENV_HASH_RB, &[]);
    let (_live, ctl_l, _rb_l) = linux_agent(&daemon, dir.path(), "live", ENV_HASH_RB, &[]);
    wait_synced(&mut c, "frozen", 0).await;
    wait_synced(&mut c, "live", 0).await;
    frozen.signal("STOP");
    let revision = set_gateway(&mut c, "default", "https://aigw.example.com").await;
    wait_synced(&mut c, "live", revision).await;
    assert_eq!(ctl_l.calls().len(), 1);
    // Keepalive finds the frozen peer: OFFLINE, with nothing applied.
    let offline = wait_instance(&mut c, "frozen", "offline", |i| {
        i.sync_state() == SyncState::Offline
    })
    .await;
    assert!(!offline.connected);
    assert_eq!(offline.applied_revision, 0);
    assert_eq!(std::fs::read_to_string(&rb_frozen).unwrap(), ENV_HASH_RB);
    // Thawed, it reconnects and catches up.
    frozen.signal("CONT");
    wait_synced(&mut c, "frozen", revision).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_during_a_reconfigure_coalesce_into_one_follow_up_run() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    wait_synced(&mut c, "gitlab-a", 0).await;
    ctl.set_sleep(Some(2));
    set_gateway(&mut c, "default", "https://aigw-1.example.com").await;
    let deadline = Instant::now() + WAIT;
    while ctl.calls().is_empty() {
        assert!(Instant::now() < deadline, "reconfigure never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_gateway(&mut c, "default", "https://aigw-2.example.com").await;
    set_gateway(&mut c, "default", "https://aigw-3.example.com").await;
    let last = set_gateway(&mut c, "default", "https://aigw-4.example.com").await;
    wait_synced(&mut c, "gitlab-a", last).await;
    assert_eq!(
        ctl.calls().len(),
        2,
        "three updates during a run make one follow-up run"
    );
    assert!(
        std::fs::read_to_string(&rb)
            .unwrap()
            .contains("'AI_GATEWAY_URL' => 'https://aigw-4.example.com',")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconfigure_that_hangs_times_out_and_fails_with_events() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (_agent, ctl, rb) = linux_agent(
        &daemon,
        dir.path(),
        "gitlab-a",
        ENV_HASH_RB,
        &["--reconfigure-timeout", "1s"],
    );
    wait_synced(&mut c, "gitlab-a", 0).await;
    let mut events = crate::watch_fleet(&mut c).await;
    ctl.set_sleep(Some(30));
    let revision = set_gateway(&mut c, "default", "https://aigw.example.com").await;
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed.last_error.contains("failed (timed out after 1s)"),
        "{}",
        failed.last_error
    );
    assert_eq!(std::fs::read_to_string(&rb).unwrap(), ENV_HASH_RB);
    // WatchFleet told the story: the revision, then the failure.
    let mut seen = Vec::new();
    while let Ok(Ok(Some(event))) =
        tokio::time::timeout(Duration::from_secs(10), events.message()).await
    {
        match event.event {
            Some(Event::RevisionCreated(r)) => seen.push(format!("revision {}", r.revision)),
            Some(Event::Failed(e)) => {
                seen.push(format!("failed {}", e.instance_id));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            format!("revision {revision}"),
            "failed gitlab-a".to_string()
        ]
    );
}

/// An env inside `if false` (or a heredoc) is never run by Ruby: it once
/// was edited and reported SYNCED. Now the instance is FAILED with the line
/// and what to change, and gitlab.rb is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_ruby_never_runs_is_reported_not_edited() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let hidden = "external_url 'https://gitlab.example.com'\nif false\n  gitlab_rails['env'] = {\n    'http_proxy' => 'http://proxy:3128',\n  }\nend\n";
    let (_agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", hidden, &[]);
    set_gateway(&mut c, "default", "https://aigw.example.com").await;
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed
            .last_error
            .contains("gitlab.rb line 3: this gitlab_rails['env'] is not a top-level statement"),
        "{}",
        failed.last_error
    );
    assert_eq!(std::fs::read_to_string(&rb).unwrap(), hidden);
    assert!(ctl.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_env_it_cannot_edit_safely_is_left_alone_and_reported() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let merged = "base_env = { 'http_proxy' => 'http://proxy:3128' }\ngitlab_rails['env'] = base_env.merge({ 'MALLOC_CONF' => 'x' })\n";
    let (_agent, ctl, rb) = linux_agent(&daemon, dir.path(), "gitlab-a", merged, &[]);
    set_gateway(&mut c, "default", "https://aigw.example.com").await;
    let failed = wait_instance(&mut c, "gitlab-a", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert!(
        failed.last_error.contains(
            "gitlab.rb line 2: gitlab_rails['env'] is assigned something other than a literal hash"
        ),
        "{}",
        failed.last_error
    );
    assert!(
        failed
            .last_error
            .contains("write gitlab_rails['env'] as a literal hash"),
        "{}",
        failed.last_error
    );
    assert_eq!(std::fs::read_to_string(&rb).unwrap(), merged);
    assert!(ctl.calls().is_empty(), "nothing to reconfigure");

    // The administrator rewrites the env as a literal hash: the agent
    // notices on its next check and applies by itself.
    let fixed = "gitlab_rails['env'] = {\n  'http_proxy' => 'http://proxy:3128',\n  'MALLOC_CONF' => 'x',\n}\n";
    std::fs::write(&rb, fixed).unwrap();
    let synced = wait_synced(&mut c, "gitlab-a", failed.desired_revision).await;
    assert!(synced.last_error.is_empty());
    assert_eq!(ctl.calls(), ["reconfigure"]);
    assert!(
        std::fs::read_to_string(&rb)
            .unwrap()
            .contains("'AI_GATEWAY_URL' => 'https://aigw.example.com',")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_with_nothing_new_reconfigures_nothing() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let (mut agent, ctl, _rb) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    let revision = set_gateway(&mut c, "default", "https://aigw.example.com").await;
    wait_synced(&mut c, "gitlab-a", revision).await;
    // Another revision that does not concern this instance's gateway.
    c.models
        .create_model(CreateModelRequest {
            model: Some(mk::model("m")),
            ..Default::default()
        })
        .await
        .unwrap();
    agent.kill9();
    wait_instance(&mut c, "gitlab-a", "offline", |i| !i.connected).await;
    agent.restart();
    // Its Hello's digest shows it has this content: nothing is sent (it
    // would ack the newer revision), and it is SYNCED where it stood.
    let back = wait_synced(&mut c, "gitlab-a", revision).await;
    assert_eq!(back.desired_revision, revision);
    assert_eq!(ctl.calls().len(), 1, "a restart must not reconfigure again");

    // A change for it while it was down: sent when it is back.
    agent.kill9();
    let next = set_gateway(&mut c, "default", "https://aigw-2.example.com").await;
    agent.restart();
    wait_synced(&mut c, "gitlab-a", next).await;
    assert_eq!(ctl.calls().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_helm_upgrade_restores_the_values_file() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let helm = FakeCommand::new(&dir.path().join("helm"));
    let values = dir.path().join("values.yaml");
    let _agent = Agent::start(
        &daemon,
        "gitlab-helm",
        dir.path(),
        &args(&[
            "--deployment",
            "helm",
            "--helm-values",
            &values.display().to_string(),
            "--helm-command",
            &helm.command("upgrade -f {values}"),
        ]),
    );
    let first = set_gateway(&mut c, "default", "https://aigw-1.example.com").await;
    wait_synced(&mut c, "gitlab-helm", first).await;
    let applied = std::fs::read_to_string(&values).unwrap();
    helm.fail_next(Some(1));
    let second = set_gateway(&mut c, "default", "https://aigw-2.example.com").await;
    let failed = wait_instance(&mut c, "gitlab-helm", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;
    assert_eq!(
        (failed.applied_revision, failed.desired_revision),
        (first, second)
    );
    assert!(
        failed
            .last_error
            .contains("restored the previous file and ran it again successfully"),
        "{}",
        failed.last_error
    );
    assert_eq!(std::fs::read_to_string(&values).unwrap(), applied);
    assert_eq!(
        helm.calls().len(),
        3,
        "first upgrade, the failed one, the one that restores"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_beyond_the_limit_are_refused_and_retry() {
    let dir = tempfile::tempdir().unwrap();
    let options = DaemonOptions {
        args: args(&["--max-agents", "1"]),
        ..Default::default()
    };
    let daemon = Daemon::start_with(&dir.path().join("data"), options);
    let mut c = daemon.clients().await;
    let (mut first, _ctl_a, _rb_a) = linux_agent(&daemon, dir.path(), "gitlab-a", ENV_HASH_RB, &[]);
    wait_synced(&mut c, "gitlab-a", 0).await;
    let (_second, _ctl_b, _rb_b) = linux_agent(&daemon, dir.path(), "gitlab-b", ENV_HASH_RB, &[]);
    let deadline = Instant::now() + WAIT;
    while !daemon
        .log()
        .contains("already holds its limit of 1 connected agents")
    {
        assert!(
            Instant::now() < deadline,
            "the second agent was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(instance(&mut c, "gitlab-b").await.is_none());
    // RESOURCE_EXHAUSTED is not final: once there is room, it gets in.
    first.kill9();
    wait_synced(&mut c, "gitlab-b", 0).await;
}
