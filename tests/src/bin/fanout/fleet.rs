//! N simulated agents. Each one behaves as `duofleet-agent` does on the
//! wire and nothing more: Hello with the revision it applied, an ack for
//! every DesiredConfig, health reports when told, and reconnects on gRPC's
//! backoff schedule (the agent's own `Backoff`), or when the daemon said to
//! come back, when its stream ends.
//!
//! The agents of one TCP connection (one, or a group with
//! `--streams-per-connection`) are run by one task that speaks HTTP/2 by
//! hand (`wire.rs`): one read and one write per change, no channel and no
//! second task between the socket and the agent. The agents share the
//! machine's two cores with the server under test, so what they cost is
//! taken from it; built on `h2`'s client, they took about 1.8 times the
//! CPU of the floor's plain-TCP clients for the same messages.

use crate::Arrivals;
use crate::wire::{self, Frame};
use duofleet_agent::session::{Backoff, reconnect_after};
use duofleet_control_plane::grpc::hpack;
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::{
    Ack, AckResult, AgentMessage, EndpointHealth, HealthReport, HealthState, Hello, TargetKind,
};
use prost::Message as _;
use prost::bytes::{Buf, BytesMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;

const CONNECT_PATH: &str = "/duofleet.v1.AgentService/Connect";
/// Read this much at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Health reports are written while less than this waits to be sent: as
/// fast as the connection takes them.
const WRITE_BACKLOG: usize = 16 * 1024;
/// Flow-control room kept back from reports, for acks.
const ACK_ROOM: i64 = 64;

/// What a simulated agent reads of a ControlMessage (`duofleet.v1`, the
/// same tags): whether it is a DesiredConfig, and its revision. What an
/// agent does with the rest is its own host's work, not the daemon's; the
/// floor's clients likewise read only their push's revision.
#[derive(Clone, PartialEq, prost::Message)]
struct ControlHead {
    #[prost(message, optional, tag = "1")]
    desired_config: Option<DesiredHead>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DesiredHead {
    #[prost(uint64, tag = "1")]
    revision: u64,
}

/// An order to every agent: send `reports` health reports, as fast as the
/// stream takes them.
#[derive(Clone, Copy, Default)]
pub struct HealthRound {
    pub reports: usize,
    /// Every report changes a target's state (a transition the daemon
    /// records and announces); otherwise all are unchanged heartbeats.
    pub flapping: bool,
}

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
    tasks: Vec<JoinHandle<()>>,
}

impl Fleet {
    /// Starts `agents` agents against `addr`, all at once, each group of
    /// `per_connection` sharing one TCP connection (1: each its own).
    pub fn start(addr: &str, token: &str, agents: usize, per_connection: usize) -> Fleet {
        let counters = Arc::new(Counters {
            arrivals: Arrivals::new(agents),
            desired: AtomicU64::new(0),
            reapplied: AtomicU64::new(0),
            sessions: AtomicU64::new(0),
        });
        let (health, _) = watch::channel(HealthRound::default());
        let now = Instant::now();
        let ids: Vec<usize> = (0..agents).collect();
        let tasks = ids
            .chunks(per_connection.max(1))
            .map(|group| {
                let link = Link {
                    addr: addr.to_string(),
                    bearer: format!("Bearer {token}"),
                    agents: group
                        .iter()
                        .map(|i| SimAgent {
                            instance_id: format!("bench-{i:05}"),
                            applied: 0,
                            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(120)),
                            due: Some(now),
                            stream: None,
                            sending: None,
                        })
                        .collect(),
                    counters: counters.clone(),
                    health: WatchStream::from_changes(health.subscribe()),
                };
                tokio::spawn(link.run())
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
    instance_id: String,
    applied: u64,
    backoff: Backoff,
    /// When to open a stream; `None` while one is open.
    due: Option<Instant>,
    stream: Option<Open>,
    /// A health round still being sent, and how many of it are out.
    sending: Option<(HealthRound, usize)>,
}

/// An agent's stream on the current connection.
struct Open {
    id: u32,
    /// The response head has come: the session is up.
    answered: bool,
    /// What flow control lets this stream send.
    window: i64,
    /// The start of a gRPC message whose rest is still to come.
    partial: BytesMut,
    /// Bytes received and not yet given back with WINDOW_UPDATE.
    unreturned: u32,
}

impl SimAgent {
    /// The stream has ended: come back when the daemon said, or on the
    /// backoff schedule. Answers the ended stream's id.
    fn ended(&mut self, hint: Option<Duration>) -> Option<u32> {
        let delay = match hint {
            Some(after) => self.backoff.hinted(after),
            None => self.backoff.next_delay(),
        };
        self.due = Some(Instant::now() + delay);
        self.stream.take().map(|open| open.id)
    }
}

/// One TCP connection's agents, run by one task.
struct Link {
    addr: String,
    bearer: String,
    agents: Vec<SimAgent>,
    counters: Arc<Counters>,
    /// Health rounds as they are ordered. A stream, not the receiver's
    /// `changed()`: it stays signed up between polls, where a fresh
    /// `changed()` on every turn of the loop would sign up and off again,
    /// under a lock every agent shares.
    health: WatchStream<HealthRound>,
}

/// One HTTP/2 connection, this side's state of it.
struct Connection {
    io: TcpStream,
    wbuf: BytesMut,
    decoder: hpack::Decoder,
    next_id: u32,
    /// What flow control lets the connection send.
    window: i64,
    /// The server's SETTINGS_INITIAL_WINDOW_SIZE.
    initial_window: i64,
    /// Bytes received and not yet given back with WINDOW_UPDATE.
    unreturned: u32,
    /// GOAWAY came: no new streams here.
    going_away: bool,
    /// A header block waiting for its CONTINUATION: stream, the block so
    /// far, END_STREAM.
    continuing: Option<(u32, Vec<u8>, bool)>,
}

enum Event {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Health(Option<HealthRound>),
    Due,
}

impl Link {
    async fn run(mut self) {
        loop {
            // Disconnected, every agent has a time to come back.
            let due = self.agents.iter().filter_map(|a| a.due).min();
            if let Some(due) = due {
                tokio::time::sleep_until(due.into()).await;
            }
            match connect(&self.addr).await {
                Ok(io) => {
                    let mut connection = Connection {
                        io,
                        wbuf: BytesMut::new(),
                        decoder: hpack::Decoder::new(4096),
                        next_id: 1,
                        window: wire::DEFAULT_WINDOW,
                        initial_window: wire::DEFAULT_WINDOW,
                        unreturned: 0,
                        going_away: false,
                        continuing: None,
                    };
                    wire::put_preface(&mut connection.wbuf);
                    let _ = self.drive(&mut connection).await;
                    // The connection is gone, and every stream on it.
                    for agent in &mut self.agents {
                        if agent.stream.is_some() {
                            agent.ended(None);
                        }
                    }
                }
                Err(_) => {
                    let now = Instant::now();
                    for agent in &mut self.agents {
                        if agent.due.is_some_and(|d| d <= now) {
                            agent.ended(None);
                        }
                    }
                }
            }
        }
    }

    /// Runs the agents' streams on `c` until it ends, or until it is going
    /// away with none left on it.
    async fn drive(&mut self, c: &mut Connection) -> Result<(), String> {
        // Read into the front of one buffer, what is left of a frame moved
        // back to the front: the same few pages all along. (A BytesMut read
        // into further and further along until it wraps touches a fresh
        // page every 40 changes or so, on every connection at once: 10,000
        // page faults in the clients, taken from the server's cores.)
        let mut rbuf = vec![0u8; READ_CHUNK];
        let mut filled = 0;
        let mut health_open = true;
        loop {
            let now = Instant::now();
            if c.going_away {
                if self.agents.iter().all(|a| a.stream.is_none()) && c.wbuf.is_empty() {
                    return Ok(());
                }
            } else {
                for agent in &mut self.agents {
                    if agent.due.is_some_and(|d| d <= now) {
                        agent.due = None;
                        agent.stream = Some(c.open(&self.addr, &self.bearer, agent));
                    }
                }
            }
            self.send_reports(c);
            let next_due = self.agents.iter().filter_map(|a| a.due).min();
            if filled == rbuf.len() {
                // A frame larger than the buffer.
                rbuf.resize(2 * rbuf.len(), 0);
            }
            let event = {
                let (mut reader, mut writer) = c.io.split();
                tokio::select! {
                    biased;
                    wrote = writer.write(&c.wbuf), if !c.wbuf.is_empty() => Event::Wrote(wrote),
                    read = reader.read(&mut rbuf[filled..]) => Event::Read(read),
                    round = self.health.next(), if health_open => Event::Health(round),
                    _ = sleep_until(next_due), if next_due.is_some() => Event::Due,
                }
            };
            match event {
                Event::Wrote(wrote) => {
                    let n = wrote.map_err(|e| e.to_string())?;
                    c.wbuf.advance(n);
                }
                Event::Read(read) => {
                    let n = read.map_err(|e| e.to_string())?;
                    if n == 0 {
                        return Err("the server closed the connection".into());
                    }
                    filled += n;
                    let mut at = 0;
                    while let Some((frame, len)) = Frame::parse(&rbuf[at..filled]) {
                        self.on_frame(c, frame)?;
                        at += len;
                    }
                    rbuf.copy_within(at..filled, 0);
                    filled -= at;
                }
                Event::Health(Some(round)) => {
                    for agent in &mut self.agents {
                        agent.sending = (round.reports > 0).then_some((round, 0));
                    }
                }
                Event::Health(None) => health_open = false,
                Event::Due => {}
            }
        }
    }

    fn on_frame(&mut self, c: &mut Connection, frame: Frame<'_>) -> Result<(), String> {
        if let Some((stream, _, _)) = &c.continuing
            && (frame.kind != wire::CONTINUATION || frame.stream != *stream)
        {
            return Err("a header block interrupted".into());
        }
        match frame.kind {
            wire::DATA => {
                c.received(frame.payload.len() as u32);
                let data = frame.content()?;
                let end = frame.has(wire::END_STREAM);
                let counters = &self.counters;
                let Some(agent) = by_stream(&mut self.agents, frame.stream) else {
                    return Ok(());
                };
                let open = agent.stream.as_mut().expect("found by its stream");
                open.unreturned += frame.payload.len() as u32;
                if open.unreturned as i64 >= wire::DEFAULT_WINDOW / 2 {
                    wire::put_window_update(&mut c.wbuf, open.id, open.unreturned);
                    open.unreturned = 0;
                }
                let mut partial = std::mem::take(&mut open.partial);
                wire::each_message(&mut partial, data, |message| {
                    let message = ControlHead::decode(message).map_err(|e| e.to_string())?;
                    let Some(desired) = message.desired_config else {
                        return Ok(());
                    };
                    counters.desired.fetch_add(1, Ordering::Relaxed);
                    if desired.revision <= agent.applied {
                        counters.reapplied.fetch_add(1, Ordering::Relaxed);
                    }
                    agent.applied = desired.revision;
                    let ack = AgentMessage {
                        message: Some(Message::Ack(Ack {
                            revision: desired.revision,
                            result: AckResult::Applied as i32,
                            ..Default::default()
                        })),
                    };
                    c.send(open, &ack);
                    counters.arrivals.record(desired.revision);
                    Ok(())
                })?;
                open.partial = partial;
                if end {
                    // A stream that ends without trailers has failed.
                    if let Some(id) = agent.ended(None) {
                        wire::put_cancel(&mut c.wbuf, id);
                    }
                }
            }
            wire::HEADERS => {
                let block = frame.content()?;
                let end = frame.has(wire::END_STREAM);
                if frame.has(wire::END_HEADERS) {
                    self.on_headers(c, frame.stream, block, end)?;
                } else {
                    c.continuing = Some((frame.stream, block.to_vec(), end));
                }
            }
            wire::CONTINUATION => {
                let Some((stream, mut block, end)) = c.continuing.take() else {
                    return Err("CONTINUATION without HEADERS".into());
                };
                block.extend_from_slice(frame.payload);
                if frame.has(wire::END_HEADERS) {
                    self.on_headers(c, stream, &block, end)?;
                } else {
                    c.continuing = Some((stream, block, end));
                }
            }
            wire::RST_STREAM => {
                if let Some(agent) = by_stream(&mut self.agents, frame.stream) {
                    agent.ended(None);
                }
            }
            wire::SETTINGS if !frame.has(wire::ACK) => {
                for setting in frame.payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([setting[0], setting[1]]);
                    let value =
                        u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                    if id == wire::SETTINGS_INITIAL_WINDOW_SIZE {
                        let delta = value as i64 - c.initial_window;
                        c.initial_window = value as i64;
                        for open in self.agents.iter_mut().filter_map(|a| a.stream.as_mut()) {
                            open.window += delta;
                        }
                    }
                }
                wire::put_settings_ack(&mut c.wbuf);
            }
            wire::PING if !frame.has(wire::ACK) => wire::put_ping_ack(&mut c.wbuf, frame.payload),
            wire::GOAWAY => {
                c.going_away = true;
                let last = frame
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .unwrap_or(0);
                // Streams the server never took: over, and tried again.
                for agent in &mut self.agents {
                    if agent.stream.as_ref().is_some_and(|s| s.id > last) {
                        agent.ended(None);
                    }
                }
            }
            wire::WINDOW_UPDATE => {
                let increment = frame
                    .payload
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff)
                    .unwrap_or(0) as i64;
                if frame.stream == 0 {
                    c.window += increment;
                } else if let Some(agent) = by_stream(&mut self.agents, frame.stream) {
                    agent.stream.as_mut().expect("found by its stream").window += increment;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A whole header block: the response head, or the trailers with the
    /// call's status.
    fn on_headers(
        &mut self,
        c: &mut Connection,
        stream: u32,
        block: &[u8],
        end: bool,
    ) -> Result<(), String> {
        // Decoded whatever the stream, to keep the table in step.
        let mut status = None;
        let mut fields = http::HeaderMap::new();
        c.decoder
            .decode(block, usize::MAX, |(name, value)| {
                if &name[..] == b":status" {
                    status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|s| s.parse().ok());
                } else if let (Ok(name), Ok(value)) = (
                    http::HeaderName::from_bytes(&name),
                    http::HeaderValue::from_bytes(&value),
                ) {
                    fields.append(name, value);
                }
            })
            .map_err(|e| e.0.to_string())?;
        let Some(agent) = by_stream(&mut self.agents, stream) else {
            return Ok(());
        };
        let open = agent.stream.as_mut().expect("found by its stream");
        let grpc_status = tonic::Status::from_header_map(&fields);
        let hint = grpc_status.as_ref().and_then(reconnect_after);
        // Whether the call is over, and when to come back if it is.
        let over = if open.answered {
            // Trailers, with the call's status.
            Some(hint)
        } else if status != Some(200) {
            Some(None)
        } else if grpc_status.is_some() {
            // A "trailers-only" answer (e.g. from a daemon shutting down).
            Some(hint)
        } else {
            open.answered = true;
            self.counters.sessions.fetch_add(1, Ordering::Relaxed);
            agent.backoff.reset();
            end.then_some(None)
        };
        if let Some(hint) = over {
            agent.ended(hint);
            wire::put_cancel(&mut c.wbuf, stream);
        }
        Ok(())
    }

    /// Health reports, while flow control and the write backlog allow.
    fn send_reports(&mut self, c: &mut Connection) {
        for agent in &mut self.agents {
            let Some(open) = agent.stream.as_mut().filter(|s| s.answered) else {
                continue;
            };
            while let Some((round, n)) = agent.sending.as_mut() {
                if c.wbuf.len() >= WRITE_BACKLOG {
                    return;
                }
                let message = AgentMessage {
                    message: Some(Message::HealthReport(report(*round, *n))),
                };
                let len = 5 + message.encoded_len() as i64;
                if len + ACK_ROOM > open.window.min(c.window) {
                    break;
                }
                c.send(open, &message);
                *n += 1;
                if *n >= round.reports {
                    agent.sending = None;
                }
            }
        }
    }
}

impl Connection {
    /// Opens a stream for `agent`: the request head, then its Hello.
    fn open(&mut self, addr: &str, bearer: &str, agent: &SimAgent) -> Open {
        let id = self.next_id;
        self.next_id += 2;
        wire::put_request(&mut self.wbuf, id, addr, CONNECT_PATH, bearer);
        let mut open = Open {
            id,
            answered: false,
            window: self.initial_window,
            partial: BytesMut::new(),
            unreturned: 0,
        };
        let hello = AgentMessage {
            message: Some(Message::Hello(Hello {
                instance_id: agent.instance_id.clone(),
                hostname: "bench".into(),
                applied_revision: agent.applied,
                ..Default::default()
            })),
        };
        self.send(&mut open, &hello);
        open
    }

    /// Queues one message on a stream, taking it from both windows.
    fn send(&mut self, open: &mut Open, message: &AgentMessage) {
        let len = wire::put_message(&mut self.wbuf, open.id, message) as i64;
        open.window -= len;
        self.window -= len;
    }

    /// DATA has come: give the connection's window back by halves.
    fn received(&mut self, len: u32) {
        self.unreturned += len;
        if self.unreturned as i64 >= wire::DEFAULT_WINDOW / 2 {
            wire::put_window_update(&mut self.wbuf, 0, self.unreturned);
            self.unreturned = 0;
        }
    }
}

/// The agent whose stream `stream` is, if it is still open.
fn by_stream(agents: &mut [SimAgent], stream: u32) -> Option<&mut SimAgent> {
    agents
        .iter_mut()
        .find(|a| a.stream.as_ref().is_some_and(|s| s.id == stream))
}

async fn connect(addr: &str) -> Result<TcpStream, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
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
