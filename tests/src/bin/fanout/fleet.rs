//! N simulated agents, each on its own TCP connection. Each one behaves as
//! `duofleet-agent` does on the wire and nothing more: Hello with the
//! revision it applied, an ack for every DesiredConfig, health reports
//! when told, and reconnects on gRPC's backoff schedule (the agent's own
//! `Backoff`) when the stream ends.

use crate::Arrivals;
use duofleet_agent::session::Backoff;
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::agent_service_client::AgentServiceClient;
use duofleet_proto::v1::control_message;
use duofleet_proto::v1::{
    Ack, AckResult, AgentMessage, EndpointHealth, HealthReport, HealthState, Hello, TargetKind,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::transport::Endpoint;

/// An order to every agent: send `reports` health reports, as fast as the
/// stream takes them.
#[derive(Clone, Copy, Default)]
pub struct HealthRound {
    pub reports: usize,
    /// Every report changes a target's state (a transition the daemon
    /// records and announces); otherwise all are unchanged heartbeats.
    pub flapping: bool,
}

#[derive(Default)]
pub struct Counters {
    /// When each revision reached each agent.
    pub arrivals: Arrivals,
    /// DesiredConfigs received at all.
    pub desired: AtomicU64,
    /// DesiredConfigs for a revision the agent had already applied.
    pub reapplied: AtomicU64,
    /// Streams opened (first connections and reconnects).
    pub sessions: AtomicU64,
}

pub struct Fleet {
    pub counters: Arc<Counters>,
    health: watch::Sender<HealthRound>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// Starts `agents` agents against `addr`, all at once.
    pub fn start(addr: &str, token: &str, agents: usize) -> Fleet {
        let counters = Arc::new(Counters::default());
        let (health, _) = watch::channel(HealthRound::default());
        let tasks = (0..agents)
            .map(|i| {
                let agent = SimAgent {
                    url: format!("http://{addr}"),
                    token: token.to_string(),
                    instance_id: format!("bench-{i:05}"),
                    applied: 0,
                    counters: counters.clone(),
                    health: health.subscribe(),
                };
                tokio::spawn(agent.run())
            })
            .collect();
        Fleet {
            counters,
            health,
            tasks,
        }
    }

    pub fn send_health(&self, round: HealthRound) {
        self.health.send_replace(round);
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct SimAgent {
    url: String,
    token: String,
    instance_id: String,
    applied: u64,
    counters: Arc<Counters>,
    health: watch::Receiver<HealthRound>,
}

impl SimAgent {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));
        loop {
            // Ended, refused or unreachable: the same wait in every case.
            let _ = self.session(&mut backoff).await;
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// One connection, until its stream ends.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<(), tonic::Status> {
        let channel = Endpoint::from_shared(self.url.clone())
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let (tx, rx) = mpsc::channel(4);
        let hello = Hello {
            instance_id: self.instance_id.clone(),
            hostname: "bench".into(),
            applied_revision: self.applied,
            ..Default::default()
        };
        let _ = tx
            .send(AgentMessage {
                message: Some(Message::Hello(hello)),
            })
            .await;
        let mut request = Request::new(ReceiverStream::new(rx));
        let bearer = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("token"))?;
        request.metadata_mut().insert("authorization", bearer);
        let mut inbound = AgentServiceClient::new(channel)
            .connect(request)
            .await?
            .into_inner();
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        backoff.reset();
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Some(message) = message? else { return Ok(()) };
                    let Some(control_message::Message::DesiredConfig(desired)) = message.message else {
                        continue;
                    };
                    self.counters.desired.fetch_add(1, Ordering::Relaxed);
                    if desired.revision <= self.applied {
                        self.counters.reapplied.fetch_add(1, Ordering::Relaxed);
                    }
                    self.applied = desired.revision;
                    let ack = Ack {
                        revision: desired.revision,
                        result: AckResult::Applied as i32,
                        ..Default::default()
                    };
                    if tx.send(AgentMessage { message: Some(Message::Ack(ack)) }).await.is_err() {
                        return Ok(());
                    }
                    self.counters.arrivals.record(desired.revision);
                }
                changed = self.health.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let round = *self.health.borrow_and_update();
                    tokio::spawn(send_reports(tx.clone(), round));
                }
            }
        }
    }
}

async fn send_reports(tx: mpsc::Sender<AgentMessage>, round: HealthRound) {
    for n in 0..round.reports {
        let model_state = if round.flapping && n % 2 == 1 {
            HealthState::Unhealthy
        } else {
            HealthState::Healthy
        };
        let target = |kind: TargetKind, target: &str, state: HealthState| EndpointHealth {
            kind: kind as i32,
            target: target.into(),
            state: state as i32,
            error: if state == HealthState::Unhealthy {
                "GET http://vllm.bench:8000/v1/models answered HTTP 503".into()
            } else {
                String::new()
            },
            latency_ms: 3,
            check_time: Some(std::time::SystemTime::now().into()),
        };
        let report = HealthReport {
            results: vec![
                target(
                    TargetKind::AiGateway,
                    "https://aigw.bench.example.com",
                    HealthState::Healthy,
                ),
                target(TargetKind::Model, "mixtral-prod", model_state),
                target(TargetKind::Model, "codestral-prod", HealthState::Healthy),
            ],
        };
        let message = AgentMessage {
            message: Some(Message::HealthReport(report)),
        };
        if tx.send(message).await.is_err() {
            return;
        }
    }
}
