//! AgentService.Connect: one long-lived stream per agent, in the manner of
//! xDS. The agent says Hello; this side sends the instance's DesiredConfig
//! when the agent is behind, and afterwards only when that instance's
//! effective configuration changes.
//!
//! Each session follows the store's `watch` of the current configuration,
//! which coalesces to the newest: an agent that is slow to read holds up
//! only its own session, which later sends just the latest state. What it
//! sends is shared (`fanout`): built and encoded once per revision and
//! profile, and compared by digest. The session is the response stream
//! itself, with no task or channel of its own: memory per agent is its
//! state and a reference to the last configuration sent.

use super::{AgentIdentity, status};
use crate::agent_input;
use crate::ca::CertAuthority;
use crate::config::Config;
use crate::effective::Labels;
use crate::fanout::{Fanout, Prepared};
use crate::labels::LabelGrant;
use crate::registry::{Refused, Registry, Session};
use crate::rollout::Rollouts;
use crate::store::Store;
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::{AckResult, AgentMessage, Hello};
use duofleet_proto::wire::ControlFrame;
use duofleet_proto::wire::agent_service_server::AgentService;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AgentApi {
    store: Arc<Store>,
    registry: Arc<Registry>,
    rollouts: Arc<Rollouts>,
    ca: Arc<CertAuthority>,
    fanout: Arc<Fanout>,
    shutdown: watch::Receiver<bool>,
}

impl AgentApi {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        rollouts: Arc<Rollouts>,
        ca: Arc<CertAuthority>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        AgentApi {
            store,
            registry,
            rollouts,
            ca,
            fanout: Arc::default(),
            shutdown,
        }
    }
}

type ControlStream = Pin<Box<dyn Stream<Item = Result<ControlFrame, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentApi {
    type ConnectStream = ControlStream;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        if *self.shutdown.borrow() {
            // Shutting down: come back later, without waiting for a Hello.
            let peer = request.remote_addr().map(|a| a.to_string());
            let connected = self.registry.connected();
            return Err(restarting(peer.as_deref().unwrap_or(""), connected));
        }
        let who = super::caller(&request)?;
        if who.role == crate::auth::Role::Join {
            return Err(Status::permission_denied(format!(
                "token {:?} is a join token: it only enrolls (EnrollmentService.Enroll)",
                who.name
            )));
        }
        let identity = request.extensions().get::<AgentIdentity>().cloned();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 30 s of connecting"))??;
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
        let live = Live::start(
            self.store.subscribe(),
            Shared {
                registry: self.registry.clone(),
                rollouts: self.rollouts.clone(),
                fanout: self.fanout.clone(),
            },
            session,
            &hello,
            inbound,
            self.shutdown.clone(),
        );
        // The session is the response stream itself, polled by the task
        // that sends it: no task of its own, no channel between.
        let stream = futures_util::stream::unfold(live, |mut live| async move {
            let item = live.next().await?;
            Some((item, live))
        });
        Ok(Response::new(Box::pin(stream)))
    }
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

/// What every session shares.
struct Shared {
    registry: Arc<Registry>,
    rollouts: Arc<Rollouts>,
    fanout: Arc<Fanout>,
}

/// One agent's session: follows the configuration, the rollouts and the
/// instance's labels, and takes in the agent's messages. Dropped when the
/// stream ends, however it ends.
struct Live {
    shared: Shared,
    session: Session,
    inbound: Streaming<AgentMessage>,
    /// The store's current configuration, read whenever anything changes:
    /// a rollout step may be seen before the revision that goes with it.
    current: watch::Receiver<Arc<Config>>,
    /// Changes to watch. Streams, so that their wake-ups stay registered
    /// between messages: each ack does not sign up for three
    /// notifications again.
    configs: WatchStream<Arc<Config>>,
    epoch: WatchStream<u64>,
    labels: Labels,
    relabels: WatchStream<Labels>,
    /// The configuration last sent (or that the agent said it has).
    last: Arc<Prepared>,
    /// To send first: the agent is behind.
    first: Option<Arc<Prepared>>,
    stopped: Pin<Box<dyn Future<Output = ()> + Send>>,
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
        inbound: Streaming<AgentMessage>,
        shutdown: watch::Receiver<bool>,
    ) -> Live {
        let mut epoch = shared.rollouts.subscribe_epoch();
        epoch.borrow_and_update();
        let config = configs.borrow_and_update().clone();
        let labels: Labels = session.labels.borrow_and_update().clone();
        let relabels = WatchStream::from_changes(session.labels.clone());
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
            current: configs.clone(),
            configs: WatchStream::from_changes(configs),
            epoch: WatchStream::from_changes(epoch),
            relabels,
            labels,
            last,
            stopped: Box::pin(crate::server::wait_for(shutdown)),
            ended: false,
            restarting: false,
        }
    }

    /// The next item of the agent's stream: a configuration to send, the
    /// status that ends the stream, or None when it ends quietly.
    async fn next(&mut self) -> Option<Result<ControlFrame, Status>> {
        if self.ended {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(Ok(self.sending(&first)));
        }
        loop {
            let changed = tokio::select! {
                config = self.configs.next() => {
                    if config.is_none() {
                        return self.end(None);
                    }
                    self.changed()
                }
                // A rollout released (or held back) this instance.
                epoch = self.epoch.next() => {
                    if epoch.is_none() {
                        return self.end(None);
                    }
                    self.changed()
                }
                // An operator relabelled the instance: its profile may change.
                labels = self.relabels.next() => {
                    let Some(labels) = labels else {
                        return self.end(None);
                    };
                    self.labels = labels;
                    self.changed()
                }
                message = self.inbound.message() => match message {
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
                _ = &mut self.session.kicked => {
                    tracing::info!(instance = %self.session.instance_id, "session replaced or instance deleted");
                    return self.end(Some(Status::aborted("this instance connected again or was deleted")));
                }
                _ = &mut self.stopped => {
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

    fn sending(&self, prepared: &Prepared) -> ControlFrame {
        let desired = &prepared.desired;
        self.shared
            .registry
            .set_desired(&self.session, &desired.profile, desired.revision, true);
        // Per agent and change: debug, or a fleet's rollout floods the log.
        tracing::debug!(instance = %self.session.instance_id, revision = desired.revision, profile = %desired.profile, "sending desired config");
        prepared.frame.clone()
    }

    fn end(&mut self, status: Option<Status>) -> Option<Result<ControlFrame, Status>> {
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
