//! AgentService.Connect: one long-lived stream per agent, in the manner of
//! xDS. The agent says Hello; this side sends the instance's DesiredConfig
//! when the agent is behind, and afterwards only when that instance's
//! effective configuration changes.
//!
//! Each session follows the store's `watch` of the current configuration,
//! which coalesces to the newest: an agent that is slow to read holds up
//! only its own session, which later sends just the latest state. The
//! fleet's sessions are woken by one bell (`wake::Bell`) rung when the
//! configuration or a rollout's epoch changes, where each stays
//! registered, and look at the watches' versions when polled. What a
//! session sends is shared (`fanout`): built and encoded once per revision
//! and profile, and compared by digest. The session is polled by its
//! connection's task (`serve`), with no task or channel of its own: memory
//! per agent is its state and a reference to the last configuration sent.

use super::http2::StreamIo;
use super::serve::{CONNECT_PATH, rpc_span};
use super::{AgentIdentity, Authenticate, status};
use crate::agent_input;
use crate::ca::CertAuthority;
use crate::config::Config;
use crate::effective::Labels;
use crate::fanout::{Fanout, Prepared};
use crate::labels::LabelGrant;
use crate::registry::{Refused, Registry, Session};
use crate::rollout::Rollouts;
use crate::store::Store;
use crate::wake::{Bell, Ring, TaskWaker};
use bytes::{Buf, Bytes, BytesMut};
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::{AckResult, AgentMessage, Hello};
use prost::Message as _;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::sync::watch;
use tonic::codegen::http::{self, Extensions, HeaderMap, HeaderValue};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};
use tracing::Instrument;

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AgentApi {
    store: Arc<Store>,
    registry: Arc<Registry>,
    rollouts: Arc<Rollouts>,
    ca: Arc<CertAuthority>,
    fanout: Arc<Fanout>,
    /// Rung when the configuration or a rollout's epoch changes: every
    /// session looks whether what it sends changed.
    changes: Arc<Bell>,
    shutdown: watch::Receiver<bool>,
    /// The agent interceptor: a client certificate, or the enroll token.
    authenticate: Authenticate,
}

impl AgentApi {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        rollouts: Arc<Rollouts>,
        ca: Arc<CertAuthority>,
        shutdown: watch::Receiver<bool>,
        authenticate: Authenticate,
    ) -> Self {
        let changes = Arc::new(Bell::default());
        tokio::spawn(ring_on_changes(
            store.subscribe(),
            rollouts.subscribe_epoch(),
            changes.clone(),
        ));
        AgentApi {
            store,
            registry,
            rollouts,
            ca,
            fanout: Arc::default(),
            changes,
            shutdown,
            authenticate,
        }
    }

    /// One agent's stream (AgentService.Connect), from its request to its
    /// last frame, polled by its connection's task (`serve`).
    pub(super) async fn session(
        self: Arc<Self>,
        request: http::Request<()>,
        stream: StreamIo,
        extensions: Extensions,
    ) {
        let span = rpc_span(CONNECT_PATH);
        let (parts, ()) = request.into_parts();
        let request = Request::from_parts(MetadataMap::from_headers(parts.headers), extensions, ());
        // Boxed: what opening holds (the request, the Hello's timer) is
        // freed once the session runs, instead of sizing every session.
        let opened = Box::pin(self.open(request, &stream).instrument(span)).await;
        let live = match opened {
            Ok(live) => live,
            Err(status) => {
                // Refused before it started: a "trailers-only" response.
                self.registry
                    .metrics
                    .rpc(CONNECT_PATH, status.code() as i32);
                let (parts, ()) = status.into_http::<()>().into_parts();
                stream.send_response(parts, true);
                return;
            }
        };
        self.registry.metrics.rpc(CONNECT_PATH, 0);
        let (head, ()) = http::Response::builder()
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .body(())
            .expect("a static header")
            .into_parts();
        stream.send_response(head, false);
        live.run(stream).await;
    }

    /// The restart hint for a stream that has not said Hello: its point in
    /// the reconnect window comes from its address.
    fn come_back_later<T>(&self, request: &Request<T>) -> Status {
        let peer = request.remote_addr().map(|a| a.to_string());
        restarting(peer.as_deref().unwrap_or(""), self.registry.connected())
    }

    /// Authenticates the stream and takes in its Hello: the session, or
    /// the status that refuses it.
    async fn open(&self, request: Request<()>, stream: &StreamIo) -> Result<Live, Status> {
        if *self.shutdown.borrow() {
            // Shutting down: come back later, without waiting for a Hello.
            return Err(self.come_back_later(&request));
        }
        let request = (self.authenticate)(request)?;
        let who = super::caller(&request)?;
        if who.role == crate::auth::Role::Join {
            return Err(Status::permission_denied(format!(
                "token {:?} is a join token: it only enrolls (EnrollmentService.Enroll)",
                who.name
            )));
        }
        let identity = request.extensions().get::<AgentIdentity>().cloned();
        let mut inbound = Inbound::default();
        let first = tokio::select! {
            biased;
            first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message(stream)) => first
                .map_err(|_| Status::deadline_exceeded("no Hello within 30 s of connecting"))??,
            // Shutting down while it waits: a stream that never says Hello
            // must not hold the restart back for its 30 s.
            () = poll_fn(|_| if stream.stopping() { Poll::Ready(()) } else { Poll::Pending }) => {
                return Err(self.come_back_later(&request));
            }
        };
        let hello = match first.and_then(|m| m.message) {
            Some(Message::Hello(hello)) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "hello: the first message on the stream must be Hello",
                ));
            }
        };
        check_hello(&hello)?;
        if let Some(AgentIdentity(certified)) = &identity
            && *certified != hello.instance_id
        {
            tracing::warn!(certificate = %certified, claimed = %hello.instance_id, "an agent claimed another instance");
            return Err(Status::permission_denied(format!(
                "this certificate belongs to instance {certified:?}; it cannot speak for {:?}",
                hello.instance_id
            )));
        }
        // What the token that admitted this agent lets it set: the grant
        // of its certificate's enrollment, or every key for the default
        // enroll token.
        let grant = match &identity {
            Some(AgentIdentity(instance)) => self.ca.grant_of(instance).unwrap_or_default(),
            None => LabelGrant::all(),
        };
        let session = self
            .registry
            .connect(&hello, &grant)
            .map_err(|refused| match refused {
                Refused::Full(_) => {
                    tracing::warn!(instance = %hello.instance_id, %refused, "agent refused");
                    Status::resource_exhausted(refused.to_string())
                }
                // Logged once per claiming host by the registry.
                Refused::Conflict { .. } => Status::already_exists(refused.to_string()),
            })?;
        tracing::info!(instance = %hello.instance_id, hostname = %hello.hostname, applied_revision = hello.applied_revision, "agent connected");
        Ok(Live::start(
            self.store.subscribe(),
            Shared {
                registry: self.registry.clone(),
                rollouts: self.rollouts.clone(),
                fanout: self.fanout.clone(),
                changes: self.changes.clone(),
            },
            session,
            &hello,
            inbound,
        ))
    }
}

/// The agent's side of the stream: gRPC messages (a flag byte, a 4-byte
/// length, the protobuf), each given back to the agent's flow window as it
/// is read.
#[derive(Default)]
struct Inbound {
    /// What has arrived and is not decoded yet: the DATA that brought it
    /// when that holds whole messages (the usual case, with no copy), or
    /// the pieces of one joined.
    buf: Bytes,
}

/// The gRPC message header: the compressed flag and the length.
const HEADER_BYTES: usize = 5;

/// Under this, the start of a message that waits for its rest is copied
/// out of the connection's read buffer rather than keeping all of it.
const READ_SHARE_BYTES: usize = 4 * 1024;

impl Inbound {
    /// The next message, or None when the agent ends its side. Cancel
    /// safe: what has been read stays in the buffer.
    async fn message(&mut self, stream: &StreamIo) -> Result<Option<AgentMessage>, Status> {
        loop {
            if let Some(message) = decode(&mut self.buf)? {
                if self.buf.is_empty() {
                    // An empty slice still holds the read buffer it came
                    // from: let go of it.
                    self.buf = Bytes::new();
                }
                return Ok(Some(message));
            }
            if !self.buf.is_empty() && self.buf.len() < READ_SHARE_BYTES {
                // Part of a message, waiting for the rest: a copy, not a
                // hold on the whole read buffer it arrived in.
                self.buf = Bytes::copy_from_slice(&self.buf);
            }
            match poll_fn(|cx| stream.poll_data(cx)).await {
                Some(Ok(data)) if self.buf.is_empty() => self.buf = data,
                Some(Ok(data)) => {
                    let mut joined = BytesMut::with_capacity(self.buf.len() + data.len());
                    joined.extend_from_slice(&self.buf);
                    joined.extend_from_slice(&data);
                    self.buf = joined.freeze();
                }
                Some(Err(error)) => return Err(Status::cancelled(error.to_string())),
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    return Err(Status::invalid_argument(
                        "request: the stream ended inside a message",
                    ));
                }
            }
        }
    }
}

/// The first whole message in `buf`, taken out of it; None until one has
/// arrived.
fn decode(buf: &mut Bytes) -> Result<Option<AgentMessage>, Status> {
    let Some(header) = buf.get(..HEADER_BYTES) else {
        return Ok(None);
    };
    if header[0] != 0 {
        return Err(Status::invalid_argument(
            "request: compressed messages are not accepted on this stream",
        ));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > agent_input::DECODE_MAX_BYTES {
        return Err(Status::invalid_argument(format!(
            "request: the message is {len} bytes, over the limit of {} bytes",
            agent_input::DECODE_MAX_BYTES
        )));
    }
    let Some(body) = buf.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Ok(None);
    };
    let message = AgentMessage::decode(body).map_err(|e| {
        Status::invalid_argument(format!(
            "request: not a valid message for this method ({e})"
        ))
    })?;
    buf.advance(HEADER_BYTES + len);
    Ok(Some(message))
}

/// The trailers that end a stream with `status`.
fn trailers(status: Option<Status>) -> HeaderMap {
    // Sized for a status, its message and a reconnect hint: at shutdown a
    // fleet's trailers are built at once, and growing each map would
    // reallocate it twice.
    let mut trailers = HeaderMap::with_capacity(4);
    match status {
        Some(status) => {
            if status.add_header(&mut trailers).is_err() {
                trailers.insert("grpc-status", HeaderValue::from(status.code() as i32));
            }
        }
        None => {
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
        }
    }
    trailers
}

fn check_hello(hello: &Hello) -> Result<(), Status> {
    agent_input::hello(hello).map_err(|e| status(e.into()))
}

/// How many reconnecting agents a restarted daemon takes in per second,
/// about (10,000 connecting at once are in within about 2 s on two cores):
/// the window the fleet's reconnects are spread over grows with it.
const RECONNECTS_PER_SECOND: u64 = 8_000;

/// The status that ends a stream at shutdown, with the agent's point in
/// the reconnect window: fixed per instance (a hash of its id, or of its
/// address before it said Hello), so the fleet spreads evenly over it.
fn restarting(instance_id: &str, connected: usize) -> Status {
    use std::hash::{Hash, Hasher};
    let window_ms = (connected as u64 * 1000 / RECONNECTS_PER_SECOND).clamp(500, 30_000);
    let mut hasher = std::hash::DefaultHasher::new();
    instance_id.hash(&mut hasher);
    let after_ms = hasher.finish() % window_ms;
    let mut status = Status::unavailable(format!(
        "duofleetd is shutting down; reconnect in {after_ms} ms"
    ));
    if let Ok(value) = after_ms.to_string().parse() {
        status
            .metadata_mut()
            .insert(duofleet_proto::RECONNECT_AFTER_MS, value);
    }
    status
}

/// Rings `bell` whenever the configuration or the rollouts' epoch
/// changes, until either is gone.
async fn ring_on_changes(
    mut configs: watch::Receiver<Arc<Config>>,
    mut epoch: watch::Receiver<u64>,
    bell: Arc<Bell>,
) {
    loop {
        let changed = tokio::select! {
            changed = configs.changed() => changed,
            changed = epoch.changed() => changed,
        };
        if changed.is_err() {
            return;
        }
        let mut next = 0;
        while let Some(after) = bell.ring_part(next, RING_BATCH) {
            next = after;
            requeue().await;
        }
    }
}

/// How many sessions a ring wakes before it lets the scheduler take a
/// turn. The call that made the change is woken from the blocking pool a
/// moment after the ring began: rung all at once, the fleet's wake-ups
/// filled the workers' queues ahead of it, and one change in five at
/// 10,000 agents was answered 30 to 160 ms after the request instead of
/// 2 to 10 (90 of 450). In batches of 64, 3 of 270 took over 30 ms, and
/// the fan-out is no slower.
const RING_BATCH: usize = 64;

/// Goes to the back of the worker's run queue, where the other worker
/// can take it: `tokio::task::yield_now` defers the task to the worker's
/// own next turn at the driver instead, which no other worker can take
/// over, so that a worker the system holds off the CPU held the ring with
/// it.
async fn requeue() {
    let mut woken = false;
    poll_fn(|cx| {
        if woken {
            return Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// What every session shares.
struct Shared {
    registry: Arc<Registry>,
    rollouts: Arc<Rollouts>,
    fanout: Arc<Fanout>,
    changes: Arc<Bell>,
}

/// One agent's session: follows the configuration, the rollouts and the
/// instance's labels, and takes in the agent's messages. Dropped when the
/// stream ends, however it ends.
struct Live {
    shared: Shared,
    session: Session,
    inbound: Inbound,
    /// The store's current configuration, read whenever anything changes:
    /// a rollout step may be seen before the revision that goes with it.
    current: watch::Receiver<Arc<Config>>,
    /// The rollouts' epoch: a step released (or held back) instances.
    epoch: watch::Receiver<u64>,
    /// This session's place on `Shared::changes`, taken at its first
    /// poll; the fleet-wide changes wake it through that, and it looks at
    /// the two versions above.
    ring: Option<Ring>,
    labels: Labels,
    /// The session's waker is registered for relabels (at its first poll).
    relabels_registered: bool,
    /// The configuration last sent (or that the agent said it has).
    last: Arc<Prepared>,
    /// To send first: the agent is behind.
    first: Option<Arc<Prepared>>,
    ended: bool,
    /// Ended because the daemon is shutting down: the fleet's sessions all
    /// end at once, and the shutdown log says how many.
    restarting: bool,
}

impl Live {
    fn start(
        mut configs: watch::Receiver<Arc<Config>>,
        shared: Shared,
        mut session: Session,
        hello: &Hello,
        inbound: Inbound,
    ) -> Live {
        let mut epoch = shared.rollouts.subscribe_epoch();
        epoch.borrow_and_update();
        let config = configs.borrow_and_update().clone();
        let labels: Labels = session.labels.borrow_and_update().clone();
        let last = prepare(&shared, &session, &config, &labels);
        // Held back by a rollout, the desired revision is the older one.
        // The agent has it when the digest of what it applied is this
        // content's, whatever the revision numbers: nothing is sent, as
        // after a daemon restart that changed nothing for it. Equal
        // numbers are not enough (a data dir started afresh counts from 1
        // again); only an agent that sends no digest is taken at its word.
        let has_it = if hello.applied_digest.is_empty() {
            hello.applied_revision == last.desired.revision
        } else {
            hello.applied_digest == last.digest
        };
        if has_it {
            shared.registry.set_desired(
                &session,
                &last.desired.profile,
                hello.applied_revision,
                false,
            );
        }
        Live {
            first: (!has_it).then(|| last.clone()),
            shared,
            session,
            inbound,
            current: configs,
            epoch,
            ring: None,
            relabels_registered: false,
            labels,
            last,
            ended: false,
            restarting: false,
        }
    }

    /// Sends the agent what it needs, one message at a time as the
    /// connection takes them, until the session ends; then the trailers.
    async fn run(mut self, stream: StreamIo) {
        loop {
            if poll_fn(|cx| stream.poll_room(cx)).await.is_err() {
                return;
            }
            match self.next(&stream).await {
                Some(Ok(message)) => stream.send_data(message, false),
                Some(Err(status)) => {
                    stream.send_trailers(trailers(Some(status)));
                    return;
                }
                None => {
                    stream.send_trailers(trailers(None));
                    return;
                }
            }
        }
    }

    /// The next item of the agent's stream: a message to send, the
    /// status that ends the stream, or None when it ends quietly.
    async fn next(&mut self, stream: &StreamIo) -> Option<Result<Bytes, Status>> {
        if self.ended {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(Ok(self.sending(&first)));
        }
        loop {
            let changed = tokio::select! {
                // In order: a fleet's sessions are polled on every change,
                // and drawing a random start costs more than fairness buys
                // among six mostly idle sources.
                biased;
                message = self.inbound.message(stream) => match message {
                    Ok(Some(message)) => {
                        if let Err(error) = agent_input::message(&message) {
                            tracing::warn!(instance = %self.session.instance_id, %error, "agent message refused");
                            return self.end(Some(status(error.into())));
                        }
                        self.handle(message);
                        None
                    }
                    Ok(None) => return self.end(None),
                    Err(error) => {
                        tracing::info!(instance = %self.session.instance_id, %error, "agent stream failed");
                        return self.end(None);
                    }
                },
                // A new configuration, or a rollout released (or held
                // back) this instance.
                gone = poll_fn(|cx| {
                    fleet_changed(&mut self.ring, &self.shared.changes, &mut self.current, &mut self.epoch, cx)
                }) => {
                    if gone {
                        return self.end(None);
                    }
                    self.changed()
                }
                // An operator relabelled the instance: its profile may change.
                relabelled = poll_fn(|cx| relabelled(&mut self.session.labels, &self.session.relabels, &mut self.relabels_registered, cx)) => {
                    if !relabelled {
                        return self.end(None);
                    }
                    self.labels = self.session.labels.borrow_and_update().clone();
                    self.changed()
                }
                _ = &mut self.session.kicked => {
                    tracing::info!(instance = %self.session.instance_id, "session replaced or instance deleted");
                    return self.end(Some(Status::aborted("this instance connected again or was deleted")));
                }
                // The connection polls its sessions again once it has set
                // this (at shutdown): no wake-up to register.
                () = poll_fn(|_| if stream.stopping() { Poll::Ready(()) } else { Poll::Pending }) => {
                    let connected = self.shared.registry.connected();
                    self.restarting = true;
                    return self.end(Some(restarting(&self.session.instance_id, connected)));
                }
            };
            if let Some(next) = changed {
                return Some(Ok(self.sending(&next)));
            }
        }
    }

    /// The instance's configuration when its content differs from what
    /// it has (a new revision, a rollout's step or new labels).
    fn changed(&mut self) -> Option<Arc<Prepared>> {
        let config = self.current.borrow().clone();
        let next = prepare(&self.shared, &self.session, &config, &self.labels);
        if next.digest == self.last.digest {
            return None;
        }
        self.last = next.clone();
        Some(next)
    }

    fn sending(&self, prepared: &Prepared) -> Bytes {
        let desired = &prepared.desired;
        self.shared
            .registry
            .set_desired(&self.session, &desired.profile, desired.revision, true);
        // Per agent and change: debug, or a fleet's rollout floods the log.
        tracing::debug!(instance = %self.session.instance_id, revision = desired.revision, profile = %desired.profile, "sending desired config");
        prepared.frame.bytes().clone()
    }

    fn end(&mut self, status: Option<Status>) -> Option<Result<Bytes, Status>> {
        self.ended = true;
        status.map(Err)
    }

    fn handle(&self, message: AgentMessage) {
        let session = &self.session;
        let registry = &self.shared.registry;
        match message.message {
            Some(Message::Ack(ack)) => {
                if ack.result() == AckResult::Failed {
                    tracing::warn!(instance = %session.instance_id, revision = ack.revision, error = %ack.error, "agent failed to apply");
                } else {
                    tracing::debug!(instance = %session.instance_id, revision = ack.revision, result = ?ack.result(), "agent acked");
                }
                registry.ack(session, &ack);
            }
            Some(Message::HealthReport(report)) => registry.health(session, report),
            Some(Message::DriftReport(report)) => {
                tracing::warn!(instance = %session.instance_id, detail = %report.detail, repairing = report.repairing, "agent reports drift");
                registry.drift(session, &report);
            }
            Some(Message::Hello(_)) | None => {
                tracing::debug!(instance = %session.instance_id, "ignoring a repeated Hello or empty message");
            }
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.shared.registry.disconnect(&self.session);
        if self.restarting {
            tracing::debug!(instance = %self.session.instance_id, "agent told to reconnect after the restart");
        } else {
            tracing::info!(instance = %self.session.instance_id, "agent disconnected");
        }
    }
}

/// Ready when the configuration or the rollouts' epoch moved since the
/// session last looked (true: the daemon is going away). A session is
/// polled with its stream's waker, always the same: it is registered on
/// the bell once.
fn fleet_changed(
    ring: &mut Option<Ring>,
    bell: &Arc<Bell>,
    current: &mut watch::Receiver<Arc<Config>>,
    epoch: &mut watch::Receiver<u64>,
    cx: &mut std::task::Context<'_>,
) -> Poll<bool> {
    if ring.is_none() {
        *ring = Some(bell.register(cx.waker().clone()));
    }
    match (current.has_changed(), epoch.has_changed()) {
        (Ok(false), Ok(false)) => Poll::Pending,
        (Ok(_), Ok(_)) => {
            current.mark_unchanged();
            epoch.mark_unchanged();
            Poll::Ready(false)
        }
        _ => Poll::Ready(true),
    }
}

/// Ready when the instance's labels changed since the session last
/// looked (false: the registry let go of the instance). Like
/// `fleet_changed`, the waker is registered once.
fn relabelled(
    labels: &mut watch::Receiver<Labels>,
    relabels: &TaskWaker,
    registered: &mut bool,
    cx: &mut std::task::Context<'_>,
) -> Poll<bool> {
    if !*registered {
        relabels.register(cx.waker());
        *registered = true;
    }
    match labels.has_changed() {
        Ok(false) => Poll::Pending,
        Ok(true) => Poll::Ready(true),
        Err(_) => Poll::Ready(false),
    }
}

/// What the instance gets at `config` (or at the revision a rollout holds
/// it on).
fn prepare(
    shared: &Shared,
    session: &Session,
    config: &Arc<Config>,
    labels: &Labels,
) -> Arc<Prepared> {
    let config = shared.rollouts.config_for(&session.instance_id, config);
    shared.fanout.prepare(&config, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use duofleet_proto::v1::Ack;

    fn framed(message: &AgentMessage) -> Vec<u8> {
        let body = message.encode_to_vec();
        let mut wire = vec![0];
        wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
        wire.extend_from_slice(&body);
        wire
    }

    fn ack(revision: u64) -> AgentMessage {
        AgentMessage {
            message: Some(Message::Ack(Ack {
                revision,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn messages_are_taken_whole_however_the_bytes_arrive() {
        let mut wire = framed(&ack(7));
        wire.extend(framed(&ack(8)));
        // A byte at a time: nothing until the first message is whole.
        let mut buf = Bytes::new();
        let mut got = Vec::new();
        for byte in &wire {
            let mut joined = buf.to_vec();
            joined.push(*byte);
            buf = Bytes::from(joined);
            while let Some(message) = decode(&mut buf).unwrap() {
                got.push(message);
            }
        }
        assert_eq!(got, vec![ack(7), ack(8)]);
        assert!(buf.is_empty());
        // Both in one chunk.
        let mut buf = Bytes::copy_from_slice(&wire[..]);
        assert_eq!(decode(&mut buf).unwrap(), Some(ack(7)));
        assert_eq!(decode(&mut buf).unwrap(), Some(ack(8)));
        assert_eq!(decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn oversized_compressed_and_garbled_messages_are_refused_saying_why() {
        let too_big = (agent_input::DECODE_MAX_BYTES + 1) as u32;
        let mut header = vec![0u8];
        header.extend_from_slice(&too_big.to_be_bytes());
        let refused = decode(&mut Bytes::copy_from_slice(&header[..])).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().contains("over the limit of"),
            "{refused:?}"
        );

        let mut compressed = framed(&ack(1));
        compressed[0] = 1;
        let refused = decode(&mut Bytes::copy_from_slice(&compressed[..])).unwrap_err();
        assert!(refused.message().contains("compressed"), "{refused:?}");

        let garbled = [0, 0, 0, 0, 2, 0xff, 0xff];
        let refused = decode(&mut Bytes::copy_from_slice(&garbled[..])).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused
                .message()
                .starts_with("request: not a valid message"),
            "{refused:?}"
        );
    }
}
