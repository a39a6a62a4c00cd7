//! AgentService.Connect: one long-lived stream per agent, in the manner of
//! xDS. The agent says Hello; this side sends the instance's DesiredConfig
//! when the agent is behind, and afterwards only when that instance's
//! effective configuration changes.
//!
//! Each session follows the store's `watch` of the current configuration,
//! which coalesces to the newest: an agent that is slow to read holds up
//! only its own session, which later sends just the latest state. What it
//! sends is shared (`fanout`): built and encoded once per revision and
//! profile, and compared by digest. Memory per agent is the session task,
//! a 4-slot channel and a reference to the last configuration sent.

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
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
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
        let (outbound, rx) = mpsc::channel(4);
        let run = SessionTask {
            store: self.store.clone(),
            registry: self.registry.clone(),
            rollouts: self.rollouts.clone(),
            fanout: self.fanout.clone(),
            shutdown: self.shutdown.clone(),
            outbound,
        };
        tokio::spawn(run.run(session, hello, inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn check_hello(hello: &Hello) -> Result<(), Status> {
    agent_input::hello(hello).map_err(|e| status(e.into()))
}

async fn until_stopped(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

struct SessionTask {
    store: Arc<Store>,
    registry: Arc<Registry>,
    rollouts: Arc<Rollouts>,
    fanout: Arc<Fanout>,
    shutdown: watch::Receiver<bool>,
    outbound: mpsc::Sender<Result<ControlFrame, Status>>,
}

impl SessionTask {
    async fn run(self, mut session: Session, hello: Hello, mut inbound: Streaming<AgentMessage>) {
        let mut configs = self.store.subscribe();
        let mut epoch = self.rollouts.subscribe_epoch();
        let stopped = until_stopped(self.shutdown.clone());
        tokio::pin!(stopped);
        let config = configs.borrow_and_update().clone();
        let mut labels: Labels = session.labels.borrow_and_update().clone();
        epoch.borrow_and_update();
        let mut last = self.prepare(&session, &config, &labels);
        // Held back by a rollout, the desired revision is the older one.
        // The agent has it when it applied that revision, or any revision
        // with the same content (its digest says so): nothing is sent, as
        // after a daemon restart that changed nothing for it.
        let has_it = hello.applied_revision == last.desired.revision
            || (!hello.applied_digest.is_empty() && hello.applied_digest == last.digest);
        let alive = if has_it {
            self.registry.set_desired(
                &session,
                &last.desired.profile,
                hello.applied_revision,
                false,
            );
            true
        } else {
            self.send(&session, &last).await
        };
        if alive {
            loop {
                tokio::select! {
                    changed = configs.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let config = configs.borrow_and_update().clone();
                        if !self.push_if_changed(&session, &config, &labels, &mut last).await {
                            break;
                        }
                    }
                    // A rollout released (or held back) this instance.
                    changed = epoch.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let config = configs.borrow().clone();
                        if !self.push_if_changed(&session, &config, &labels, &mut last).await {
                            break;
                        }
                    }
                    // An operator relabelled the instance: its profile may change.
                    changed = session.labels.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        labels = session.labels.borrow_and_update().clone();
                        let config = configs.borrow().clone();
                        if !self.push_if_changed(&session, &config, &labels, &mut last).await {
                            break;
                        }
                    }
                    message = inbound.message() => match message {
                        Ok(Some(message)) => {
                            if let Err(error) = agent_input::message(&message) {
                                tracing::warn!(instance = %session.instance_id, %error, "agent message refused");
                                let _ = self.outbound.send(Err(status(error.into()))).await;
                                break;
                            }
                            self.handle(&session, message);
                        }
                        Ok(None) => break,
                        Err(error) => {
                            tracing::info!(instance = %session.instance_id, %error, "agent stream failed");
                            break;
                        }
                    },
                    _ = &mut session.kicked => {
                        tracing::info!(instance = %session.instance_id, "session replaced or instance deleted");
                        let _ = self.outbound.send(Err(Status::aborted("this instance connected again or was deleted"))).await;
                        return;
                    }
                    _ = &mut stopped => break,
                }
            }
        }
        self.registry.disconnect(&session);
        tracing::info!(instance = %session.instance_id, "agent disconnected");
    }

    /// What the instance gets at `config` (or at the revision a rollout
    /// holds it on).
    fn prepare(&self, session: &Session, config: &Arc<Config>, labels: &Labels) -> Arc<Prepared> {
        let config = self.rollouts.config_for(&session.instance_id, config);
        self.fanout.prepare(&config, labels)
    }

    /// Sends the instance's desired config when its content differs from
    /// `last` (a new revision or new labels); false when the stream is gone.
    async fn push_if_changed(
        &self,
        session: &Session,
        config: &Arc<Config>,
        labels: &Labels,
        last: &mut Arc<Prepared>,
    ) -> bool {
        let next = self.prepare(session, config, labels);
        if next.digest == last.digest {
            return true;
        }
        *last = next;
        self.send(session, last).await
    }

    async fn send(&self, session: &Session, prepared: &Prepared) -> bool {
        let desired = &prepared.desired;
        self.registry
            .set_desired(session, &desired.profile, desired.revision, true);
        // Per agent and change: debug, or a fleet's rollout floods the log.
        tracing::debug!(instance = %session.instance_id, revision = desired.revision, profile = %desired.profile, "sending desired config");
        self.outbound.send(Ok(prepared.frame.clone())).await.is_ok()
    }

    fn handle(&self, session: &Session, message: AgentMessage) {
        match message.message {
            Some(Message::Ack(ack)) => {
                if ack.result() == AckResult::Failed {
                    tracing::warn!(instance = %session.instance_id, revision = ack.revision, error = %ack.error, "agent failed to apply");
                } else {
                    tracing::debug!(instance = %session.instance_id, revision = ack.revision, result = ?ack.result(), "agent acked");
                }
                self.registry.ack(session, &ack);
            }
            Some(Message::HealthReport(report)) => self.registry.health(session, report),
            Some(Message::DriftReport(report)) => {
                tracing::warn!(instance = %session.instance_id, detail = %report.detail, repairing = report.repairing, "agent reports drift");
                self.registry.drift(session, &report);
            }
            Some(Message::Hello(_)) | None => {
                tracing::debug!(instance = %session.instance_id, "ignoring a repeated Hello or empty message");
            }
        }
    }
}
