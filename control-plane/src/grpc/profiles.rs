use super::{
    answer, answer_staged, caller, commit, commit_staged, dry, not_found, required, writer,
};
use crate::rollout::Rollouts;
use crate::store::Store;
use crate::validate::DEFAULT_PROFILE;
use duofleet_proto::v1::profile_service_server::ProfileService;
use duofleet_proto::v1::{
    Catalog, CreateProfileRequest, DeleteProfileRequest, GetCatalogRequest, GetProfileRequest,
    ListProfilesRequest, ListProfilesResponse, Profile, SetFeatureSettingRequest,
    UpdateProfileRequest,
};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct ProfileApi {
    store: Arc<Store>,
    rollouts: Arc<Rollouts>,
}

impl ProfileApi {
    pub fn new(store: Arc<Store>, rollouts: Arc<Rollouts>) -> Self {
        ProfileApi { store, rollouts }
    }
}

#[tonic::async_trait]
impl ProfileService for ProfileApi {
    async fn create_profile(
        &self,
        request: Request<CreateProfileRequest>,
    ) -> Result<Response<Profile>, Status> {
        let caller = writer(&request, "create profiles")?;
        let request = request.into_inner();
        let profile = required(request.profile, "profile")?;
        let name = profile.name.clone();
        let how = dry(request.validate_only);
        let commit = commit(&self.store, caller, how, move |c, cat| {
            c.create_profile(cat, profile.clone())
        })
        .await?;
        let profile = commit.config.profile(&name).map_err(not_found)?.clone();
        Ok(answer(profile, &commit, how.validate_only))
    }

    async fn get_profile(
        &self,
        request: Request<GetProfileRequest>,
    ) -> Result<Response<Profile>, Status> {
        caller(&request)?;
        let config = super::fresh(&self.store).await?;
        let profile = config.profile(&request.get_ref().name).map_err(not_found)?;
        Ok(Response::new(profile.clone()))
    }

    async fn list_profiles(
        &self,
        request: Request<ListProfilesRequest>,
    ) -> Result<Response<ListProfilesResponse>, Status> {
        caller(&request)?;
        let profiles = super::fresh(&self.store)
            .await?
            .profiles
            .values()
            .cloned()
            .collect();
        Ok(Response::new(ListProfilesResponse { profiles }))
    }

    async fn update_profile(
        &self,
        request: Request<UpdateProfileRequest>,
    ) -> Result<Response<Profile>, Status> {
        let caller = writer(&request, "update profiles")?;
        let request = request.into_inner();
        let patch = required(request.profile, "profile")?;
        let mask = request.update_mask.map(|m| m.paths).unwrap_or_default();
        let name = patch.name.clone();
        let how = dry(request.validate_only);
        let (commit, rollout) = commit_staged(
            &self.store,
            &self.rollouts,
            caller,
            how,
            request.rollout,
            move |c, cat| c.update_profile(cat, patch.clone(), &mask),
        )
        .await?;
        let profile = commit.config.profile(&name).map_err(not_found)?.clone();
        Ok(answer_staged(
            profile,
            &commit,
            how.validate_only,
            rollout.as_ref(),
        ))
    }

    async fn delete_profile(
        &self,
        request: Request<DeleteProfileRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = writer(&request, "delete profiles")?;
        let request = request.into_inner();
        let (name, how) = (request.name, dry(request.validate_only));
        let commit = commit(&self.store, caller, how, move |c, _| {
            c.delete_profile(&name)
        })
        .await?;
        Ok(answer((), &commit, how.validate_only))
    }

    async fn set_feature_setting(
        &self,
        request: Request<SetFeatureSettingRequest>,
    ) -> Result<Response<Profile>, Status> {
        let caller = writer(&request, "change feature settings")?;
        let request = request.into_inner();
        let setting = required(request.setting, "setting")?;
        let name = if request.profile.is_empty() {
            DEFAULT_PROFILE.to_string()
        } else {
            request.profile
        };
        let profile = name.clone();
        let how = dry(request.validate_only);
        let (commit, rollout) = commit_staged(
            &self.store,
            &self.rollouts,
            caller,
            how,
            request.rollout,
            move |c, cat| c.set_feature_setting(cat, &profile, setting.clone()),
        )
        .await?;
        let profile = commit.config.profile(&name).map_err(not_found)?.clone();
        Ok(answer_staged(
            profile,
            &commit,
            how.validate_only,
            rollout.as_ref(),
        ))
    }

    async fn get_catalog(
        &self,
        request: Request<GetCatalogRequest>,
    ) -> Result<Response<Catalog>, Status> {
        caller(&request)?;
        Ok(Response::new(self.store.catalog().to_proto()))
    }
}
