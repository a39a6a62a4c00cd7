//! Fan-out benchmark: N simulated agents, each on its own TCP connection
//! with automatic acks, against a real duofleetd; M changes to the default
//! profile; the time from each change's OK to the last agent's ack, and the
//! daemon's memory per connected agent.
//!
//!   cargo run --release -p duofleet-tests --bin fanout -- --agents 1000 --changes 20
//!
//! Prints one JSON object per line, then a table. Not part of the timed
//! test suite: a small-N smoke run of it is (it must not rot).

use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::agent_service_client::AgentServiceClient;
use duofleet_proto::v1::control_message;
use duofleet_proto::v1::{
    Ack, AckResult, AgentMessage, Hello, ListInstancesRequest, Profile, UpdateProfileRequest,
};
use duofleet_tests::{Daemon, DaemonOptions};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::transport::Endpoint;

struct Options {
    agents: usize,
    changes: usize,
}

fn options() -> Options {
    let mut o = Options {
        agents: 100,
        changes: 10,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse().ok());
        match (args[i].as_str(), value) {
            ("--agents", Some(n)) => o.agents = n,
            ("--changes", Some(n)) => o.changes = n,
            (other, _) => {
                eprintln!(
                    "fanout: unknown or incomplete argument {other:?}; use --agents N --changes M"
                );
                std::process::exit(2);
            }
        }
        i += 2;
    }
    o
}

/// Re-runs this program under a raised open-file limit (one socket per agent).
fn raise_nofile() {
    if std::env::var_os("DUOFLEET_FANOUT_NOFILE").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$0" "$@""#)
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("DUOFLEET_FANOUT_NOFILE", "1")
        .status()
        .expect("re-exec");
    std::process::exit(status.code().unwrap_or(1));
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[derive(Default)]
struct Acks {
    /// revision -> (acks so far, time of the last one)
    by_revision: HashMap<u64, (usize, Instant)>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn main() {
    raise_nofile();
    let o = options();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(o));
}

async fn run(o: Options) {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(
        &dir.path().join("data"),
        DaemonOptions {
            args: vec![
                "--max-agents".into(),
                (o.agents + 10).to_string(),
                "--max-connections".into(),
                (o.agents + 100).to_string(),
            ],
            ..Default::default()
        },
    );
    let token = std::fs::read_to_string(daemon.data_dir().join("enroll.token"))
        .unwrap()
        .trim()
        .to_string();
    let mut operator = daemon.clients().await;
    let rss_before = rss_kib(daemon.pid());

    let acks = Arc::new(Mutex::new(Acks::default()));
    let progress = Arc::new(Notify::new());
    let connect_started = Instant::now();
    let mut keep = Vec::with_capacity(o.agents);
    for i in 0..o.agents {
        let channel = Endpoint::from_shared(format!("http://{}", daemon.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("agent connect");
        let (tx, rx) = mpsc::channel(4);
        tx.send(AgentMessage {
            message: Some(Message::Hello(Hello {
                instance_id: format!("bench-{i:05}"),
                hostname: "bench".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut request = Request::new(ReceiverStream::new(rx));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut inbound = AgentServiceClient::new(channel)
            .connect(request)
            .await
            .expect("stream")
            .into_inner();
        let (acks, progress) = (acks.clone(), progress.clone());
        keep.push(tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(control_message::Message::DesiredConfig(desired)) = message.message {
                    let ack = Ack {
                        revision: desired.revision,
                        result: AckResult::Applied as i32,
                        ..Default::default()
                    };
                    if tx
                        .send(AgentMessage {
                            message: Some(Message::Ack(ack)),
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                    let mut a = acks.lock().unwrap();
                    let entry = a
                        .by_revision
                        .entry(desired.revision)
                        .or_insert((0, Instant::now()));
                    entry.0 += 1;
                    entry.1 = Instant::now();
                    progress.notify_waiters();
                }
            }
        }));
    }
    // Wait until the daemon sees them all.
    loop {
        let listed = operator
            .fleet
            .list_instances(ListInstancesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .instances;
        if listed.iter().filter(|i| i.connected).count() == o.agents {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let rss_after = rss_kib(daemon.pid());
    let per_agent_kib = (rss_after.saturating_sub(rss_before)) as f64 / o.agents as f64;
    println!(
        r#"{{"metric":"connect_all","agents":{},"seconds":{connect_secs:.3}}}"#,
        o.agents
    );
    println!(
        r#"{{"metric":"rss_per_agent_kib","agents":{},"value":{per_agent_kib:.1},"rss_before_kib":{rss_before},"rss_after_kib":{rss_after}}}"#,
        o.agents
    );

    let mut latencies = Vec::with_capacity(o.changes);
    for change in 1..=o.changes {
        let sent_at = Instant::now();
        let reply = operator
            .profiles
            .update_profile(UpdateProfileRequest {
                profile: Some(Profile {
                    name: "default".into(),
                    ai_gateway_url: format!("https://aigw-{change}.example.com"),
                    ..Default::default()
                }),
                update_mask: None,
            })
            .await
            .unwrap()
            .into_inner();
        let ok_at = Instant::now();
        let revision = reply.revision;
        let last_ack = loop {
            let notified = progress.notified();
            if let Some((count, at)) = acks.lock().unwrap().by_revision.get(&revision).copied()
                && count == o.agents
            {
                break at;
            }
            let _ = tokio::time::timeout(Duration::from_secs(60), notified).await;
        };
        // Acks can beat the RPC's answer (the daemon pushes once the change
        // is durable), so the time from the request is printed too.
        let ms = last_ack.saturating_duration_since(ok_at).as_secs_f64() * 1000.0;
        let from_request_ms = last_ack.saturating_duration_since(sent_at).as_secs_f64() * 1000.0;
        println!(
            r#"{{"metric":"change_to_all_acked","change":{change},"revision":{revision},"agents":{},"ms":{ms:.3},"from_request_ms":{from_request_ms:.3}}}"#,
            o.agents
        );
        latencies.push(ms);
    }
    latencies.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99, max) = (
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(0.0),
    );
    println!(
        r#"{{"metric":"summary","agents":{},"changes":{},"p50_ms":{p50:.3},"p99_ms":{p99:.3},"max_ms":{max:.3},"rss_per_agent_kib":{per_agent_kib:.1}}}"#,
        o.agents, o.changes
    );
    println!();
    println!("| agents | changes | change-to-all-acked p50 | p99 | max | daemon RSS per agent |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {p50:.1} ms | {p99:.1} ms | {max:.1} ms | {per_agent_kib:.1} KiB |",
        o.agents, o.changes
    );
    drop(keep);
}
