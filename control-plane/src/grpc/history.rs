use super::{blocking, caller, log_commit, public_model, status, writer};
use crate::diff::public_field_changes;
use crate::store::Store;
use duofleet_proto::v1::history_service_server::HistoryService;
use duofleet_proto::v1::{
    DiffRevisionsRequest, DiffRevisionsResponse, GetRevisionRequest, ListRevisionsRequest,
    ListRevisionsResponse, Revision, RollbackRequest,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

const DEFAULT_PAGE_SIZE: usize = 50;
const MAX_PAGE_SIZE: usize = 1000;

pub struct HistoryApi {
    store: Arc<Store>,
}

impl HistoryApi {
    pub fn new(store: Arc<Store>) -> Self {
        HistoryApi { store }
    }
}

#[tonic::async_trait]
impl HistoryService for HistoryApi {
    async fn list_revisions(
        &self,
        request: Request<ListRevisionsRequest>,
    ) -> Result<Response<ListRevisionsResponse>, Status> {
        caller(&request)?;
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n < 0 => {
                return Err(Status::invalid_argument("page_size: must not be negative"));
            }
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let before = match request.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<u64>().map_err(|_| {
                Status::invalid_argument(
                    "page_token: not a token from ListRevisions; pass next_page_token unchanged",
                )
            })?),
        };
        let store = self.store.clone();
        let mut revisions = blocking(move || store.list_revisions(before, page_size + 1))
            .await?
            .map_err(status)?;
        let next_page_token = if revisions.len() > page_size {
            revisions.truncate(page_size);
            revisions
                .last()
                .map(|r| r.revision.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListRevisionsResponse {
            revisions,
            next_page_token,
        }))
    }

    async fn get_revision(
        &self,
        request: Request<GetRevisionRequest>,
    ) -> Result<Response<Revision>, Status> {
        caller(&request)?;
        let revision = request.get_ref().revision;
        let store = self.store.clone();
        let (mut record, config) = blocking(move || store.get_revision(revision))
            .await?
            .map_err(status)?;
        record.models = config.models.values().map(public_model).collect();
        record.profiles = config.profiles.into_values().collect();
        Ok(Response::new(record))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<Revision>, Status> {
        let caller = writer(&request, "roll back")?;
        let RollbackRequest {
            revision: target,
            validate_only,
        } = request.into_inner();
        let store = self.store.clone();
        let actor = caller.name.clone();
        let result = blocking(move || store.rollback(&actor, target, validate_only)).await?;
        let commit = log_commit(&caller, validate_only, result)?;
        let mut record = commit.revision.expect("a rollback always makes a revision");
        if validate_only {
            // What it would restore, keys left out.
            record.models = commit.config.models.values().map(public_model).collect();
            record.profiles = commit.config.profiles.values().cloned().collect();
        }
        Ok(Response::new(record))
    }

    async fn diff_revisions(
        &self,
        request: Request<DiffRevisionsRequest>,
    ) -> Result<Response<DiffRevisionsResponse>, Status> {
        caller(&request)?;
        let DiffRevisionsRequest { from, to } = request.into_inner();
        let store = self.store.clone();
        let (to, changes) = blocking(move || {
            let to = if to == 0 { store.fresh()?.revision } else { to };
            let old = store.config_at_revision(from)?;
            let new = store.config_at_revision(to)?;
            Ok::<_, crate::store::StoreError>((to, public_field_changes(&old, &new)))
        })
        .await?
        .map_err(status)?;
        Ok(Response::new(DiffRevisionsResponse { from, to, changes }))
    }
}
