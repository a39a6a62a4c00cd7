//! `/metrics` from a daemon with agents: the numbers an operator expects,
//! in a format the real promtool accepts.

use crate::{fresh_daemon, wait_instance, wait_synced};
use duofleet_proto::v1::{Profile, SyncState, UpdateProfileRequest};
use duofleet_tests::agent::{Agent, FakeCommand};
use duofleet_tests::http_get;
use std::io::Write;
use std::process::{Command, Stdio};

fn value(metrics: &str, series: &str) -> f64 {
    duofleet_tests::metric(metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_agents_states_and_acks_and_pass_promtool() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let mut agents = Vec::new();
    let mut controls = Vec::new();
    for id in ["gitlab-a", "gitlab-b", "gitlab-c"] {
        let ctl = FakeCommand::new(&dir.path().join(format!("{id}-ctl")));
        let rb = dir.path().join(format!("{id}.rb"));
        std::fs::write(&rb, "").unwrap();
        let args: Vec<String> = [
            "--gitlab-rb",
            &rb.display().to_string(),
            "--reconfigure-command",
            &ctl.command("reconfigure"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        agents.push(Agent::start(&daemon, id, dir.path(), &args));
        controls.push(ctl);
    }
    for id in ["gitlab-a", "gitlab-b", "gitlab-c"] {
        wait_synced(&mut c, id, 0).await;
    }
    controls[2].fail_next(None);
    let revision = c
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: "https://aigw.example.com".into(),
                ..Default::default()
            }),
            update_mask: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision;
    wait_synced(&mut c, "gitlab-a", revision).await;
    wait_synced(&mut c, "gitlab-b", revision).await;
    wait_instance(&mut c, "gitlab-c", "failed", |i| {
        i.sync_state() == SyncState::Failed
    })
    .await;

    // A refused call is counted with its code.
    let refused = c
        .fleet
        .get_instance(duofleet_proto::v1::GetInstanceRequest {
            instance_id: "nope".into(),
        })
        .await;
    assert!(refused.is_err());
    let (status, metrics) = http_get(&daemon.http_addr, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(value(&metrics, "duofleet_agents_connected"), 3.0);
    assert_eq!(
        value(&metrics, "duofleet_instances{sync_state=\"synced\"}"),
        2.0
    );
    assert_eq!(
        value(&metrics, "duofleet_instances{sync_state=\"failed\"}"),
        1.0
    );
    assert_eq!(value(&metrics, "duofleet_config_revision"), revision as f64);
    assert_eq!(
        value(&metrics, "duofleet_acks_total{result=\"applied\"}"),
        2.0
    );
    assert_eq!(
        value(&metrics, "duofleet_acks_total{result=\"failed\"}"),
        1.0
    );
    assert_eq!(value(&metrics, "duofleet_push_to_ack_seconds_count"), 3.0);
    // Every revision this daemon made was timed to its durability.
    assert_eq!(
        value(&metrics, "duofleet_commit_seconds_count"),
        revision as f64
    );
    assert!(value(&metrics, "duofleet_commit_seconds_sum") > 0.0);
    assert_eq!(
        value(
            &metrics,
            "duofleet_grpc_requests_total{method=\"/duofleet.v1.ProfileService/UpdateProfile\",code=\"OK\"}"
        ),
        1.0
    );
    assert!(
        value(
            &metrics,
            "duofleet_grpc_requests_total{method=\"/duofleet.v1.FleetService/GetInstance\",code=\"OK\"}"
        ) >= 4.0
    );
    assert!(
        value(
            &metrics,
            "duofleet_grpc_requests_total{method=\"/duofleet.v1.FleetService/GetInstance\",code=\"NOT_FOUND\"}"
        ) >= 1.0
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool is required (Debian package prometheus; .ci/install-test-tools installs it)",
        );
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(agents);
}
