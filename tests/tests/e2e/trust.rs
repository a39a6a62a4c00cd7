//! Trust: what an agent (a host, which may be compromised) can claim and
//! send. Real daemon, raw agent streams.

use crate::fresh_daemon;
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::agent_service_client::AgentServiceClient;
use duofleet_proto::v1::{AgentMessage, Hello, ListInstancesRequest};
use duofleet_tests::{Daemon, rss_kib};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Status};

/// Connects as an agent with the enroll token, says `hello`, and returns
/// how the stream answers: the first message's error, if any.
async fn say_hello(daemon: &Daemon, hello: Hello) -> Result<(), Status> {
    let token = std::fs::read_to_string(daemon.data_dir().join("enroll.token")).unwrap();
    let (tx, rx) = mpsc::channel(1);
    tx.send(AgentMessage {
        message: Some(Message::Hello(hello)),
    })
    .await
    .unwrap();
    let mut request = Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    let mut client =
        AgentServiceClient::new(daemon.channel().await).max_encoding_message_size(usize::MAX);
    let mut inbound = client.connect(request).await?.into_inner();
    inbound.message().await.map(|_| ())
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_hello_is_refused_and_costs_nothing() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let hello = |id: &str, version: String| Hello {
        instance_id: id.into(),
        hostname: "web-01".into(),
        gitlab_version: version,
        ..Default::default()
    };
    let refused = say_hello(&daemon, hello("big", "1".repeat(64 * 1024)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .starts_with("hello: the message must be at most 8192 bytes (got 655"),
        "{}",
        refused.message()
    );
    let named = say_hello(&daemon, hello("long-version", "1".repeat(100)))
        .await
        .unwrap_err();
    assert_eq!(
        (named.code(), named.message()),
        (
            Code::InvalidArgument,
            "hello.gitlab_version: must be at most 64 bytes (got 100)"
        )
    );

    // 100 Hellos of 3 MiB once took the daemon from 11 MB to 743 MB and
    // grew the database by 1.1 GB.
    let rss_before = rss_kib(daemon.pid());
    let db_before = dir_bytes(daemon.data_dir());
    for i in 0..100 {
        let error = say_hello(&daemon, hello(&format!("huge-{i}"), "9".repeat(3 << 20)))
            .await
            .unwrap_err();
        assert_ne!(error.code(), Code::Ok);
    }
    let grown_mib = rss_kib(daemon.pid()).saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 64, "the daemon grew by {grown_mib} MiB");
    let db_grown = dir_bytes(daemon.data_dir()).saturating_sub(db_before);
    assert!(db_grown < 1 << 20, "the data dir grew by {db_grown} bytes");
    let instances = crate::list_instances(&mut c).await;
    assert!(instances.is_empty(), "{instances:?}");
}

/// Failed logins leave a trace with the peer, and a flood of them leaves
/// one line, not thousands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_logged_once_per_peer_per_minute() {
    let (_dir, daemon) = fresh_daemon();
    let mut wrong = duofleet_tests::Clients::new(
        daemon.channel().await,
        Some("duofleet_not-a-real-token-7f3a".into()),
    );
    for _ in 0..200 {
        let refused = wrong
            .fleet
            .list_instances(ListInstancesRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
    }
    let log = duofleet_tests::wait_for(std::time::Duration::from_secs(10), || {
        let log = daemon.log();
        log.contains("authentication refused").then_some(log)
    })
    .await;
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("authentication refused"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("peer=127.0.0.1"), "{}", lines[0]);
    assert!(lines[0].contains("refusals=1"), "{}", lines[0]);
    assert!(
        !log.contains("not-a-real-token-7f3a"),
        "a presented secret was logged"
    );
}

/// Two hosts claim one instance id: the second is refused with a clear
/// error, the first keeps its session, the instance shows the conflict,
/// and the log says so once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_instance_id_is_refused_and_does_not_storm() {
    use duofleet_proto::v1::GetInstanceRequest;
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let rb = dir.path().join("gitlab.rb");
    std::fs::write(&rb, "").unwrap();
    let agent = duofleet_tests::agent::Agent::start(
        &daemon,
        "gitlab-a",
        dir.path(),
        &["--gitlab-rb".into(), rb.display().to_string()],
    );
    let first = crate::wait_instance(&mut c, "gitlab-a", "connected", |i| i.connected).await;
    let claim = || Hello {
        instance_id: "gitlab-a".into(),
        hostname: "web-02".into(),
        ..Default::default()
    };
    for _ in 0..20 {
        let refused = say_hello(&daemon, claim()).await.unwrap_err();
        assert_eq!(refused.code(), Code::AlreadyExists, "{refused:?}");
        assert_eq!(
            refused.message(),
            format!(
                "instance \"gitlab-a\" is already connected from host {:?}; two hosts claim the same instance id: give each its own --instance-id (this host, \"web-02\", was refused)",
                first.hostname
            )
        );
    }
    let now = c
        .fleet
        .get_instance(GetInstanceRequest {
            instance_id: "gitlab-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(now.connected && now.hostname == first.hostname);
    assert!(
        now.conflict
            .contains("host \"web-02\" claimed this instance id"),
        "{}",
        now.conflict
    );
    assert!(now.conflict_time.is_some());
    let warnings = daemon
        .log()
        .matches("two hosts claim the same instance id")
        .count();
    assert_eq!(warnings, 1, "{}", daemon.log());
    assert!(
        !agent.log().contains("connected again"),
        "the first agent was kicked: {}",
        agent.log()
    );
}

/// Two profiles with their own model and key: default and canary.
async fn two_profiles(c: &mut duofleet_tests::Clients) -> u64 {
    use duofleet_proto::v1::{CreateModelRequest, CreateProfileRequest, Model, Profile};
    use duofleet_tests::mk;
    for (name, key) in [
        ("default-model", "sk-default"),
        ("canary-model", "sk-canary-secret"),
    ] {
        c.models
            .create_model(CreateModelRequest {
                model: Some(Model {
                    api_key: key.into(),
                    ..mk::model(name)
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    c.profiles
        .set_feature_setting(duofleet_proto::v1::SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "default-model")),
            ..Default::default()
        })
        .await
        .unwrap();
    c.profiles
        .create_profile(CreateProfileRequest {
            profile: Some(Profile {
                selector: [("ring".to_string(), "canary".to_string())].into(),
                priority: 10,
                features: vec![mk::self_hosted("duo_chat", "canary-model")],
                ..mk::profile("canary")
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// What the agent received last, raw: API keys included.
fn received(agent: &duofleet_tests::agent::Agent) -> String {
    String::from_utf8_lossy(&std::fs::read(agent.state_dir.join("desired.pb")).unwrap_or_default())
        .into_owned()
}

/// An enrolled host that says `ring: canary` in its Hello does not get the
/// canary profile's keys; an operator's relabel moves it, and the fleet
/// stream shows who did it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_belong_to_the_control_plane() {
    use duofleet_proto::v1::fleet_event::Event;
    use duofleet_proto::v1::{Instance, UpdateInstanceRequest};
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let revision = two_profiles(&mut c).await;
    let rb = dir.path().join("gitlab.rb");
    std::fs::write(&rb, "").unwrap();
    let args = |labels: &[&str]| {
        let mut args = vec![
            "--gitlab-rb".to_string(),
            rb.display().to_string(),
            "--reconfigure-command".into(),
            "true".into(),
        ];
        for label in labels {
            args.push("--label".into());
            args.push(label.to_string());
        }
        args
    };
    let mut agent =
        duofleet_tests::agent::Agent::start(&daemon, "web-01", dir.path(), &args(&["ring=stable"]));
    let first = crate::wait_synced(&mut c, "web-01", revision).await;
    assert_eq!(first.profile, "default");
    assert_eq!(
        first.labels,
        [("ring".to_string(), "stable".to_string())].into()
    );

    // The host claims canary: shown, not applied; no canary key reaches it.
    agent.kill9();
    let mut agent =
        duofleet_tests::agent::Agent::start(&daemon, "web-01", dir.path(), &args(&["ring=canary"]));
    let claimed = crate::wait_instance(&mut c, "web-01", "reported canary", |i| {
        i.connected && i.reported_labels.get("ring").map(String::as_str) == Some("canary")
    })
    .await;
    assert_eq!(
        claimed.labels,
        [("ring".to_string(), "stable".to_string())].into()
    );
    assert_eq!(claimed.profile, "default");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(received(&agent).contains("sk-default"));
    assert!(
        !received(&agent).contains("sk-canary-secret"),
        "a self-chosen label leaked a key"
    );

    // A viewer cannot relabel; an admin can, and the instance follows.
    let relabel = |labels: &[(&str, &str)]| UpdateInstanceRequest {
        instance: Some(Instance {
            instance_id: "web-01".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["labels".into()],
        }),
        ..Default::default()
    };
    let viewer = c
        .tokens
        .create_token(duofleet_proto::v1::CreateTokenRequest {
            name: "dash".into(),
            role: duofleet_proto::v1::Role::Viewer as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut as_viewer = duofleet_tests::Clients::new(daemon.channel().await, Some(viewer));
    let denied = as_viewer
        .fleet
        .update_instance(relabel(&[("ring", "canary")]))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let bad_mask = c
        .fleet
        .update_instance(UpdateInstanceRequest {
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["hostname".into()],
            }),
            ..relabel(&[])
        })
        .await
        .unwrap_err();
    assert_eq!(bad_mask.code(), Code::InvalidArgument);
    assert!(
        bad_mask
            .message()
            .starts_with("update_mask: must be exactly [\"labels\"]")
    );

    let mut events = crate::watch_fleet(&mut c).await;
    let moved = c
        .fleet
        .update_instance(relabel(&[("ring", "canary")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        moved.labels,
        [("ring".to_string(), "canary".to_string())].into()
    );
    let canary = crate::wait_instance(&mut c, "web-01", "canary", |i| {
        i.profile == "canary" && i.sync_state() == duofleet_proto::v1::SyncState::Synced
    })
    .await;
    assert_eq!(canary.applied_revision, revision);
    assert!(received(&agent).contains("sk-canary-secret"));
    let changed = loop {
        let event = events.message().await.unwrap().unwrap();
        if let Some(Event::LabelsChanged(changed)) = event.event {
            break changed;
        }
    };
    assert_eq!(changed.instance_id, "web-01");
    assert_eq!(changed.actor, "admin");
    assert_eq!(
        changed.old_labels,
        [("ring".to_string(), "stable".to_string())].into()
    );
    assert!(daemon.log().contains("instance labels changed"));

    // Labels survive a daemon restart.
    agent.kill9();
    let data = daemon.data_dir().to_path_buf();
    daemon.stop("TERM");
    let daemon = duofleet_tests::Daemon::start(&data);
    let mut c = daemon.clients().await;
    let mut agent =
        duofleet_tests::agent::Agent::start(&daemon, "web-01", dir.path(), &args(&["ring=stable"]));
    let back = crate::wait_instance(&mut c, "web-01", "back", |i| i.connected).await;
    assert_eq!(
        back.labels,
        [("ring".to_string(), "canary".to_string())].into()
    );
    assert_eq!(back.profile, "canary");
    agent.kill9();
}
