use super::{commit_staged, public_model, writer};
use crate::diff::public_field_changes;
use crate::rollout::Rollouts;
use crate::store::{Store, Write};
use duofleet_proto::v1::config_service_server::ConfigService;
use duofleet_proto::v1::{
    ApplyConfigRequest, ApplyConfigResponse, ExportConfigRequest, ExportConfigResponse,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ConfigApi {
    store: Arc<Store>,
    rollouts: Arc<Rollouts>,
}

impl ConfigApi {
    pub fn new(store: Arc<Store>, rollouts: Arc<Rollouts>) -> Self {
        ConfigApi { store, rollouts }
    }
}

#[tonic::async_trait]
impl ConfigService for ConfigApi {
    async fn apply_config(
        &self,
        request: Request<ApplyConfigRequest>,
    ) -> Result<Response<ApplyConfigResponse>, Status> {
        let caller = writer(&request, "apply configurations")?;
        let ApplyConfigRequest {
            models,
            profiles,
            prune,
            validate_only,
            expected_revision,
            rollout,
        } = request.into_inner();
        let how = Write {
            validate_only,
            expected_revision: (expected_revision > 0).then_some(expected_revision),
        };
        let (commit, rollout) = commit_staged(
            &self.store,
            &self.rollouts,
            caller,
            how,
            rollout,
            move |c, cat| c.apply_set(cat, models.clone(), profiles.clone(), prune),
        )
        .await?;
        let field_changes = public_field_changes(&commit.previous, &commit.config);
        let current_revision = if validate_only {
            commit.previous.revision
        } else {
            commit.config.revision
        };
        Ok(Response::new(ApplyConfigResponse {
            revision: commit.revision,
            field_changes,
            current_revision,
            rollout,
        }))
    }

    async fn export_config(
        &self,
        request: Request<ExportConfigRequest>,
    ) -> Result<Response<ExportConfigResponse>, Status> {
        super::caller(&request)?;
        let config = super::fresh(&self.store).await?;
        Ok(Response::new(ExportConfigResponse {
            revision: config.revision,
            models: config.models.values().map(public_model).collect(),
            profiles: config.profiles.values().cloned().collect(),
        }))
    }
}
