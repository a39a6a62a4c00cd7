//! End-to-end tests against the real `duofleetd` binary.

mod agents;
mod at_rest;
mod durability;
mod gitlab_api;
mod grpcurl;
mod health;
mod history;
mod hostile;
mod otlp;
mod readme;
mod secrets;
mod security;
mod tokens;
mod validation;

use duofleet_proto::v1::{CreateModelRequest, ListRevisionsRequest, Model};
use duofleet_tests::Clients;

/// Creates a model and returns what the daemon answered.
pub async fn create_model(clients: &mut Clients, model: Model) -> Model {
    clients
        .models
        .create_model(CreateModelRequest { model: Some(model) })
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
