use super::{answer, caller, commit, dry, not_found, public_model, required, writer};
use crate::store::Store;
use duofleet_proto::v1::model_service_server::ModelService;
use duofleet_proto::v1::{
    CreateModelRequest, DeleteModelRequest, GetModelRequest, ListModelsRequest, ListModelsResponse,
    Model, UpdateModelRequest,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ModelApi {
    store: Arc<Store>,
}

impl ModelApi {
    pub fn new(store: Arc<Store>) -> Self {
        ModelApi { store }
    }
}

#[tonic::async_trait]
impl ModelService for ModelApi {
    async fn create_model(
        &self,
        request: Request<CreateModelRequest>,
    ) -> Result<Response<Model>, Status> {
        let caller = writer(&request, "create models")?;
        let request = request.into_inner();
        let model = required(request.model, "model")?;
        let name = model.name.clone();
        let how = dry(request.validate_only);
        let commit = commit(&self.store, caller, how, move |c, cat| {
            c.create_model(cat, model.clone())
        })
        .await?;
        let model = public_model(commit.config.model(&name).map_err(not_found)?);
        Ok(answer(model, &commit, how.validate_only))
    }

    async fn get_model(
        &self,
        request: Request<GetModelRequest>,
    ) -> Result<Response<Model>, Status> {
        caller(&request)?;
        let config = super::fresh(&self.store).await?;
        let model = config.model(&request.get_ref().name).map_err(not_found)?;
        Ok(Response::new(public_model(model)))
    }

    async fn list_models(
        &self,
        request: Request<ListModelsRequest>,
    ) -> Result<Response<ListModelsResponse>, Status> {
        caller(&request)?;
        let config = super::fresh(&self.store).await?;
        let models = config.models.values().map(public_model).collect();
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn update_model(
        &self,
        request: Request<UpdateModelRequest>,
    ) -> Result<Response<Model>, Status> {
        let caller = writer(&request, "update models")?;
        let request = request.into_inner();
        let patch = required(request.model, "model")?;
        let mask = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let name = patch.name.clone();
        let how = dry(request.validate_only);
        let commit = commit(&self.store, caller, how, move |c, cat| {
            c.update_model(cat, patch.clone(), &mask)
        })
        .await?;
        let model = public_model(commit.config.model(&name).map_err(not_found)?);
        Ok(answer(model, &commit, how.validate_only))
    }

    async fn delete_model(
        &self,
        request: Request<DeleteModelRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = writer(&request, "delete models")?;
        let request = request.into_inner();
        let (name, how) = (request.name, dry(request.validate_only));
        let commit = commit(&self.store, caller, how, move |c, _| c.delete_model(&name)).await?;
        Ok(answer((), &commit, how.validate_only))
    }
}
