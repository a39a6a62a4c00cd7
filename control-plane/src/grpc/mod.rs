//! Thin tonic adapters over `config` and `store`. This is the only place
//! that builds `tonic::Status`: [`status`] is the one table from domain
//! errors to gRPC codes.

mod agent;
mod backup;
mod config;
mod deadline;
mod enroll;
mod fleet;
mod history;
mod http2;
mod models;
mod profiles;
mod rollouts;
mod serve;
mod tokens;

pub use agent::AgentApi;
pub use backup::BackupApi;
pub use config::ConfigApi;
pub use deadline::DeadlineLayer;
pub use enroll::EnrollApi;
pub use fleet::FleetApi;
pub use history::HistoryApi;
/// The gRPC port's header compression, also what the fan-out bench's
/// simulated agents decode response heads and trailers with.
pub use http2::hpack;
pub use models::ModelApi;
pub use profiles::ProfileApi;
pub use rollouts::RolloutApi;
pub use serve::{GrpcServer, Settings as GrpcSettings};
pub use tokens::TokenApi;

use crate::admission::Connections;
use crate::auth::{AuthError, Caller, Tokens};
use crate::ca::CertAuthority;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::error::{ConfigError, error_chain};
use crate::rollout::Rollouts;
use crate::store::{Commit, Store, StoreError, Write};
use duofleet_proto::v1::Model;
use duofleet_proto::v1::{Rollout, RolloutSpec};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Maps every domain error to its gRPC code (the README's error table).
pub fn status(error: StoreError) -> Status {
    match error {
        StoreError::Config(config) => match &config {
            ConfigError::Invalid { .. } => Status::invalid_argument(config.to_string()),
            ConfigError::AlreadyExists { .. } => Status::already_exists(config.to_string()),
            ConfigError::NotFound { .. } | ConfigError::RevisionNotFound(_) => {
                Status::not_found(config.to_string())
            }
            ConfigError::Blocked(_) => Status::failed_precondition(config.to_string()),
            ConfigError::Stale { .. } => Status::aborted(config.to_string()),
        },
        full if full.is_disk_full() => {
            tracing::error!(error = %error_chain(&full), "storage is full");
            Status::resource_exhausted(
                "disk full: duofleetd cannot write its database; free space on the data dir's file system",
            )
        }
        StoreError::Unavailable => Status::unavailable(error.to_string()),
        StoreError::Conflict { .. } | StoreError::RolloutContended { .. } => {
            Status::aborted(error.to_string())
        }
        StoreError::Unsupported(_) => Status::failed_precondition(error.to_string()),
        StoreError::Etcd { .. } => {
            tracing::error!(error = %error_chain(&error), "etcd request failed");
            Status::unavailable(
                "the etcd cluster did not answer; nothing was acknowledged: retry, and see the duofleetd log if this persists",
            )
        }
        internal => {
            tracing::error!(error = %error_chain(&internal), "storage failure");
            Status::internal("internal storage error; see the duofleetd log")
        }
    }
}

fn auth_status(error: AuthError) -> Status {
    match error {
        AuthError::Missing | AuthError::Invalid | AuthError::Expired { .. } => {
            Status::unauthenticated(error.to_string())
        }
        AuthError::ReadOnly { .. } | AuthError::WrongAudience { .. } => {
            Status::permission_denied(error.to_string())
        }
    }
}

/// The interceptor in front of every service but health and reflection:
/// checks the bearer token, and that it is an agent token exactly when
/// `agent` (AgentService), and hands the [`Caller`] to the handler.
pub fn authenticator(
    tokens: Arc<Tokens>,
    connections: Arc<Connections>,
    agent: bool,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |mut request: Request<()>| {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.to_str().unwrap_or_default());
        let peer = request.remote_addr().map(|a| a.ip());
        let refused = |error: AuthError| {
            tokens
                .refusals
                .record(peer, error.token(), &error.to_string());
            auth_status(error)
        };
        let caller = tokens.authenticate(header).map_err(refused)?;
        caller.require_audience(agent).map_err(refused)?;
        let operator = matches!(
            caller.role,
            crate::auth::Role::Admin | crate::auth::Role::Viewer
        );
        connections
            .authenticated(request.remote_addr(), operator)
            .map_err(|reserved| Status::resource_exhausted(reserved.to_string()))?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// An interceptor kept by a handler that calls it itself
/// (AgentService.Connect, served by `serve` rather than tonic).
pub type Authenticate =
    Arc<dyn Fn(Request<()>) -> Result<Request<()>, Status> + Send + Sync + 'static>;

/// The instance a verified client certificate was issued to.
#[derive(Debug, Clone)]
pub struct AgentIdentity(pub String);

/// The interceptor in front of the agent services: a client certificate
/// issued by this duofleetd names the instance; without one, the bearer
/// enroll token is accepted unless `require_cert`.
pub fn agent_authenticator(
    tokens: Arc<Tokens>,
    connections: Arc<Connections>,
    ca: Arc<CertAuthority>,
    require_cert: bool,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    agent_or_admin_authenticator(tokens, connections, ca, require_cert, false)
}

/// Like [`agent_authenticator`]; with `admin`, an admin token is accepted
/// too (EnrollmentService: an operator re-enrolls an instance explicitly).
pub fn agent_or_admin_authenticator(
    tokens: Arc<Tokens>,
    connections: Arc<Connections>,
    ca: Arc<CertAuthority>,
    require_cert: bool,
    admin: bool,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    let bearer = authenticator(tokens.clone(), connections.clone(), true);
    let operator = authenticator(tokens.clone(), connections.clone(), false);
    move |mut request: Request<()>| {
        let presented = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        if let Some(der) = presented {
            let peer = request.remote_addr().map(|a| a.ip());
            let instance = ca.identify(&der).ok_or_else(|| {
                tokens
                    .refusals
                    .record(peer, None, "a revoked or foreign client certificate");
                Status::permission_denied(
                    "this client certificate was revoked or was not issued by this duofleetd; enroll again",
                )
            })?;
            connections
                .authenticated(request.remote_addr(), false)
                .map_err(|reserved| Status::resource_exhausted(reserved.to_string()))?;
            request.extensions_mut().insert(Caller {
                name: instance.clone(),
                role: crate::auth::Role::Agent,
            });
            request.extensions_mut().insert(AgentIdentity(instance));
            return Ok(request);
        }
        if admin {
            let header = request
                .metadata()
                .get("authorization")
                .map(|v| v.to_str().unwrap_or_default());
            if tokens
                .authenticate(header)
                .is_ok_and(|c| c.role == crate::auth::Role::Admin)
            {
                return operator(request);
            }
        }
        if require_cert && request.metadata().get("authorization").is_none() {
            return Err(Status::unauthenticated(
                "a client certificate is required: the agent enrolls first (--enroll-token-file)",
            ));
        }
        if require_cert {
            return Err(Status::permission_denied(
                "with TLS on, agents connect with their client certificate, not a token",
            ));
        }
        bearer(request)
    }
}

fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated(AuthError::Missing.to_string()))
}

/// The caller, who must be allowed to write.
fn writer<T>(request: &Request<T>, action: &'static str) -> Result<Caller, Status> {
    let caller = caller(request)?;
    caller.require_admin(action).map_err(auth_status)?;
    Ok(caller)
}

fn required<T>(value: Option<T>, field: &str) -> Result<T, Status> {
    value.ok_or_else(|| Status::invalid_argument(format!("{field}: required")))
}

/// Runs blocking store work (sled reads, writes and flushes, signing) on
/// the blocking pool, off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Status::internal(format!("blocking task failed: {e}")))
}

/// The configuration for an operator's read: with replicas, as of the
/// newest revision any of them committed (see `Store::fresh`).
async fn fresh(store: &Arc<Store>) -> Result<Arc<Config>, Status> {
    let store = store.clone();
    blocking(move || store.fresh()).await?.map_err(status)
}

/// Runs one configuration change on the blocking pool (sled flushes to
/// disk) and logs the revision it made.
async fn commit(
    store: &Arc<Store>,
    caller: Caller,
    how: Write,
    op: impl Fn(&mut Config, &'static Catalog) -> Result<String, ConfigError> + Send + 'static,
) -> Result<Commit, Status> {
    let store = store.clone();
    let actor = caller.name.clone();
    let result = blocking(move || store.change(&actor, how, op)).await?;
    log_commit(&caller, how.validate_only, result)
}

/// [`commit`], staged when `rollout` is set: the change's revision commits
/// with its rollout, which then releases it wave by wave. Returns the
/// rollout too (with `validate_only`: the plan).
async fn commit_staged(
    store: &Arc<Store>,
    rollouts: &Arc<Rollouts>,
    caller: Caller,
    how: Write,
    rollout: Option<RolloutSpec>,
    op: impl Fn(&mut Config, &'static Catalog) -> Result<String, ConfigError> + Send + 'static,
) -> Result<(Commit, Option<Rollout>), Status> {
    let Some(spec) = rollout else {
        return Ok((commit(store, caller, how, op).await?, None));
    };
    let (store, rollouts) = (store.clone(), rollouts.clone());
    let actor = caller.name.clone();
    let (result, rollout) = blocking(move || {
        let planned = std::sync::Mutex::new(None);
        let result = store.change_with(
            &actor,
            how,
            rollouts.stage(spec, actor.clone(), how.validate_only, &planned),
            op,
        );
        let planned = planned.into_inner().unwrap_or_else(|e| e.into_inner());
        let rollout = match &result {
            Ok(_) if how.validate_only => planned,
            Ok(commit) => rollouts.committed(commit.revision.as_ref(), planned),
            Err(_) => {
                rollouts.forget(planned);
                None
            }
        };
        (result, rollout)
    })
    .await?;
    Ok((log_commit(&caller, how.validate_only, result)?, rollout))
}

/// With `validate_only`, ask for a dry run.
fn dry(validate_only: bool) -> Write {
    Write {
        validate_only,
        ..Write::default()
    }
}

fn log_commit(
    caller: &Caller,
    validate_only: bool,
    result: Result<Commit, StoreError>,
) -> Result<Commit, Status> {
    match result {
        Ok(commit) => {
            match &commit.revision {
                Some(r) if validate_only => {
                    tracing::info!(actor = %r.actor, summary = %r.summary, "validated; nothing written (validate_only)")
                }
                Some(r) => {
                    tracing::info!(revision = r.revision, actor = %r.actor, summary = %r.summary, "revision committed")
                }
                None => tracing::info!(actor = %caller.name, "no change; no revision made"),
            }
            Ok(commit)
        }
        Err(error) => {
            let status = status(error);
            tracing::info!(actor = %caller.name, code = ?status.code(), message = status.message(), "change refused");
            Err(status)
        }
    }
}

/// The answer to a change: with `validate_only`, the response header
/// `duofleet-summary` holds the summary the revision would carry (ASCII;
/// other characters escaped), or "no change".
fn answer<T>(message: T, commit: &Commit, validate_only: bool) -> Response<T> {
    answer_staged(message, commit, validate_only, None)
}

/// [`answer`], and the header `duofleet-rollout` with a staged change's
/// rollout id.
fn answer_staged<T>(
    message: T,
    commit: &Commit,
    validate_only: bool,
    rollout: Option<&Rollout>,
) -> Response<T> {
    let mut response = Response::new(message);
    if let Some(rollout) = rollout
        && let Ok(value) = rollout.id.parse()
    {
        response.metadata_mut().insert("duofleet-rollout", value);
    }
    if validate_only {
        let summary = commit
            .revision
            .as_ref()
            .map_or("no change".to_string(), |r| r.summary.clone());
        let ascii: String = summary
            .chars()
            .flat_map(|c| {
                if c.is_ascii() && !c.is_ascii_control() {
                    vec![c]
                } else {
                    c.escape_unicode().collect()
                }
            })
            .collect();
        if let Ok(value) = ascii.parse() {
            response.metadata_mut().insert("duofleet-summary", value);
        }
    }
    response
}

/// A model as operators see it: the API key never leaves.
fn public_model(model: &Model) -> Model {
    Model {
        api_key: String::new(),
        has_api_key: !model.api_key.is_empty(),
        ..model.clone()
    }
}

fn not_found(error: ConfigError) -> Status {
    status(StoreError::Config(error))
}
