//! N simulated agents, each on its own TCP connection. Each one behaves as
//! `duofleet-agent` does on the wire and nothing more: Hello with the
//! revision it applied, an ack for every DesiredConfig, health reports
//! when told, and reconnects on gRPC's backoff schedule (the agent's own
//! `Backoff`) when the stream ends.

use crate::Arrivals;
use duofleet_agent::session::{Backoff, reconnect_after};
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::control_message;
use duofleet_proto::v1::{
    Ack, AckResult, AgentMessage, ControlMessage, EndpointHealth, HealthReport, HealthState, Hello,
    TargetKind,
};
use prost::Message as _;
use prost::bytes::{Buf, BufMut, Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

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
    /// Starts `agents` agents against `addr`, all at once, each group of
    /// `per_connection` sharing one TCP connection (1: each its own).
    pub fn start(addr: &str, token: &str, agents: usize, per_connection: usize) -> Fleet {
        let counters = Arc::new(Counters::default());
        let (health, _) = watch::channel(HealthRound::default());
        let mut link = Arc::new(Link::new(addr));
        let tasks = (0..agents)
            .map(|i| {
                if i % per_connection.max(1) == 0 {
                    link = Arc::new(Link::new(addr));
                }
                let agent = SimAgent {
                    link: link.clone(),
                    addr: addr.to_string(),
                    bearer: format!("Bearer {token}"),
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

/// One TCP connection, shared by the agents of a group. Made on first use
/// and again after it ends.
struct Link {
    addr: String,
    connection: tokio::sync::Mutex<Option<(h2::client::SendRequest<Bytes>, JoinHandle<()>)>>,
}

impl Link {
    fn new(addr: &str) -> Link {
        Link {
            addr: addr.to_string(),
            connection: tokio::sync::Mutex::new(None),
        }
    }

    async fn get(&self) -> Result<h2::client::SendRequest<Bytes>, String> {
        let mut connection = self.connection.lock().await;
        if let Some((client, task)) = connection.as_ref()
            && !task.is_finished()
        {
            return Ok(client.clone());
        }
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&self.addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let (client, driver) = h2::client::Builder::new()
            .initial_window_size(64 * 1024)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let task = tokio::spawn(async move {
            let _ = driver.await;
        });
        *connection = Some((client.clone(), task));
        Ok(client)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some((_, task)) = self.connection.get_mut() {
            task.abort();
        }
    }
}

struct SimAgent {
    link: Arc<Link>,
    addr: String,
    bearer: String,
    instance_id: String,
    applied: u64,
    counters: Arc<Counters>,
    health: watch::Receiver<HealthRound>,
}

impl SimAgent {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));
        loop {
            // Ended, refused or unreachable: the agent's backoff, unless
            // the daemon said when to come back.
            let delay = match self.session(&mut backoff).await {
                Ok(Some(after)) => backoff.hinted(after),
                _ => backoff.next_delay(),
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// One connection, until its stream ends: gRPC over HTTP/2 by hand
    /// (h2 and prost, no tonic channel), so that 50,000 of them fit beside
    /// the daemon on one machine. On the wire it is what the agent sends.
    async fn session(&mut self, backoff: &mut Backoff) -> Result<Option<Duration>, String> {
        let client = self.link.get().await?;
        self.stream(client, backoff).await
    }

    async fn stream(
        &mut self,
        client: h2::client::SendRequest<Bytes>,
        backoff: &mut Backoff,
    ) -> Result<Option<Duration>, String> {
        let mut client = client.ready().await.map_err(|e| e.to_string())?;
        let request = http::Request::post(format!(
            "http://{}/duofleet.v1.AgentService/Connect",
            self.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", &self.bearer)
        .body(())
        .map_err(|e| e.to_string())?;
        let (response, mut outbound) = client
            .send_request(request, false)
            .map_err(|e| e.to_string())?;
        let hello = Hello {
            instance_id: self.instance_id.clone(),
            hostname: "bench".into(),
            applied_revision: self.applied,
            ..Default::default()
        };
        send(&mut outbound, Message::Hello(hello))?;
        let response = response.await.map_err(|e| e.to_string())?;
        if response.status() != http::StatusCode::OK {
            return Err(format!("HTTP {}", response.status()));
        }
        // Refused at once (a "trailers-only" answer: the status is in the
        // headers), e.g. by a daemon that is shutting down, with its hint.
        if let Some(status) = tonic::Status::from_header_map(response.headers()) {
            return Ok(reconnect_after(&status));
        }
        let mut inbound = response.into_body();
        self.counters.sessions.fetch_add(1, Ordering::Relaxed);
        backoff.reset();
        let mut buffer = BytesMut::new();
        let (reports_tx, mut reports) = mpsc::channel::<HealthRound>(1);
        let mut sending: Option<(HealthRound, usize)> = None;
        loop {
            tokio::select! {
                chunk = inbound.data() => {
                    let Some(chunk) = chunk else {
                        // The status, and when to come back if it says so.
                        let trailers = inbound.trailers().await.ok().flatten();
                        let status = trailers.as_ref().and_then(tonic::Status::from_header_map);
                        return Ok(status.as_ref().and_then(reconnect_after));
                    };
                    let chunk = chunk.map_err(|e| e.to_string())?;
                    let _ = inbound.flow_control().release_capacity(chunk.len());
                    buffer.extend_from_slice(&chunk);
                    while let Some(frame) = next_frame(&mut buffer) {
                        let message = ControlMessage::decode(frame).map_err(|e| e.to_string())?;
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
                        send(&mut outbound, Message::Ack(ack))?;
                        self.counters.arrivals.record(desired.revision);
                    }
                }
                changed = self.health.changed() => {
                    if changed.is_err() {
                        return Ok(None);
                    }
                    let _ = reports_tx.try_send(*self.health.borrow_and_update());
                }
                round = reports.recv(), if sending.is_none() => {
                    sending = round.map(|r| (r, 0));
                }
                // Reports go out as fast as the stream takes them: one per
                // turn, after what the flow-control window allows.
                capacity = wait_capacity(&mut outbound), if sending.is_some() => {
                    capacity?;
                    if let Some((round, n)) = sending.as_mut() {
                        send(&mut outbound, Message::HealthReport(report(*round, *n)))?;
                        *n += 1;
                        if *n >= round.reports {
                            sending = None;
                        }
                    }
                }
            }
        }
    }
}

/// Sends one gRPC message (5-byte prefix, then the protobuf).
fn send(stream: &mut h2::SendStream<Bytes>, message: Message) -> Result<(), String> {
    let body = AgentMessage {
        message: Some(message),
    }
    .encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + body.len());
    frame.put_u8(0);
    frame.put_u32(body.len() as u32);
    frame.extend_from_slice(&body);
    stream
        .send_data(frame.freeze(), false)
        .map_err(|e| e.to_string())
}

/// Waits until the stream may send about one more report.
async fn wait_capacity(stream: &mut h2::SendStream<Bytes>) -> Result<(), String> {
    const REPORT_BYTES: usize = 512;
    if stream.capacity() >= REPORT_BYTES {
        return Ok(());
    }
    stream.reserve_capacity(REPORT_BYTES);
    std::future::poll_fn(|cx| stream.poll_capacity(cx))
        .await
        .ok_or("stream closed")?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The next whole gRPC message in `buffer`, if there is one.
fn next_frame(buffer: &mut BytesMut) -> Option<Bytes> {
    if buffer.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
    if buffer.len() < 5 + len {
        return None;
    }
    buffer.advance(5);
    Some(buffer.split_to(len).freeze())
}

/// The `n`th health report of a round: three targets, the model flapping
/// on every other report when the round says so.
fn report(round: HealthRound, n: usize) -> HealthReport {
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
    HealthReport {
        results: vec![
            target(
                TargetKind::AiGateway,
                "https://aigw.bench.example.com",
                HealthState::Healthy,
            ),
            target(TargetKind::Model, "mixtral-prod", model_state),
            target(TargetKind::Model, "codestral-prod", HealthState::Healthy),
        ],
    }
}
