//! End-to-end tests against the real `duofleetd` binary.

mod agents;
mod at_rest;
mod bench_smoke;
mod chaos;
mod ctl;
mod dashboard;
mod deploy;
mod durability;
mod gitlab_api;
mod grpcurl;
mod ha;
mod health;
mod helm;
mod history;
mod hostile;
mod http2;
mod metrics;
mod otlp;
mod readme;
mod rollout;
mod secrets;
mod security;
mod tokens;
mod trust;
mod validation;

use duofleet_proto::v1::{CreateModelRequest, ListRevisionsRequest, Model};
use duofleet_proto::v1::{GetInstanceRequest, Instance, SyncState};
use duofleet_tests::Clients;
use std::time::{Duration, Instant};

/// Creates a model and returns what the daemon answered.
pub async fn create_model(clients: &mut Clients, model: Model) -> Model {
    clients
        .models
        .create_model(CreateModelRequest {
            model: Some(model),
            ..Default::default()
        })
        .await
        .expect("CreateModel")
        .into_inner()
}

/// The revision numbers the daemon lists, newest first.
pub async fn revision_numbers(clients: &mut Clients) -> Vec<u64> {
    clients
        .history
        .list_revisions(ListRevisionsRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .expect("ListRevisions")
        .into_inner()
        .revisions
        .iter()
        .map(|r| r.revision)
        .collect()
}

/// All models, as ListModels returns them.
pub async fn list_models(clients: &mut Clients) -> Vec<Model> {
    clients
        .models
        .list_models(duofleet_proto::v1::ListModelsRequest {})
        .await
        .expect("ListModels")
        .into_inner()
        .models
}

/// Every instance, as ListInstances returns them.
pub async fn list_instances(c: &mut Clients) -> Vec<Instance> {
    c.fleet
        .list_instances(duofleet_proto::v1::ListInstancesRequest::default())
        .await
        .expect("ListInstances")
        .into_inner()
        .instances
}

/// DeleteInstance for `id`, for real (not a dry run).
pub async fn delete_instance(c: &mut Clients, id: &str) -> Result<(), tonic::Status> {
    c.fleet
        .delete_instance(duofleet_proto::v1::DeleteInstanceRequest {
            instance_id: id.into(),
            validate_only: false,
        })
        .await
        .map(drop)
}

/// A WatchFleet stream.
pub async fn watch_fleet(
    clients: &mut Clients,
) -> tonic::Streaming<duofleet_proto::v1::FleetEvent> {
    clients
        .fleet
        .watch_fleet(duofleet_proto::v1::WatchFleetRequest {})
        .await
        .expect("WatchFleet")
        .into_inner()
}

/// A daemon on a fresh data dir; keep the TempDir alive as long as it runs.
pub fn fresh_daemon() -> (tempfile::TempDir, duofleet_tests::Daemon) {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = duofleet_tests::Daemon::start(&dir.path().join("data"));
    (dir, daemon)
}

/// Starts the daemon again on `data`, on the gRPC address its agents know.
pub fn restart_daemon(data: &std::path::Path, listen: String) -> duofleet_tests::Daemon {
    duofleet_tests::Daemon::start_with(
        data,
        duofleet_tests::DaemonOptions {
            listen: Some(listen),
            ..Default::default()
        },
    )
}

pub async fn instance(c: &mut Clients, id: &str) -> Option<Instance> {
    c.fleet
        .get_instance(GetInstanceRequest {
            instance_id: id.into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Waits until `check` holds for the instance, and returns it.
pub async fn wait_instance(
    c: &mut Clients,
    id: &str,
    what: &str,
    check: impl Fn(&Instance) -> bool,
) -> Instance {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = instance(c, id).await;
        if let Some(i) = got.as_ref().filter(|i| check(i)) {
            return i.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{id}: never {what}; last seen {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_synced(c: &mut Clients, id: &str, revision: u64) -> Instance {
    wait_instance(c, id, &format!("synced at {revision}"), |i| {
        i.connected && i.sync_state() == SyncState::Synced && i.applied_revision == revision
    })
    .await
}

/// How long the end-to-end waits give a condition.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Every file under `dir`, read raw.
pub fn raw_files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(raw_files(&path));
        } else {
            out.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}
