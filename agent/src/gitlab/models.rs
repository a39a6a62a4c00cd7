//! Self-hosted model deployments: create, update and delete the models
//! this agent manages, leaving every other model alone.

use super::api::since;
use super::{Sync, SyncError, TESTING_TERMS};
use crate::state::ManagedModel;
use duofleet_proto::GitLabVersion;
use duofleet_proto::v1::{DesiredConfig, DesiredModel, SyncItemState};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

const MODELS_QUERY: &str = "query duofleetModels { aiSelfHostedModels { nodes { id name model endpoint identifier hasApiToken } } }";
const MODELS_QUERY_WITH_PROVIDER: &str = "query duofleetModels { aiSelfHostedModels { nodes { id name model endpoint identifier hasApiToken provider } } }";
const CREATE: &str = "mutation duofleetCreate($input: AiSelfHostedModelCreateInput!) { aiSelfHostedModelCreate(input: $input) { selfHostedModel { id } errors } }";
const UPDATE: &str = "mutation duofleetUpdate($input: AiSelfHostedModelUpdateInput!) { aiSelfHostedModelUpdate(input: $input) { selfHostedModel { id } errors } }";
const DELETE: &str = "mutation duofleetDelete($input: AiSelfHostedModelDeleteInput!) { aiSelfHostedModelDelete(input: $input) { errors } }";

const NOT_FOUND: &str = "Self-hosted model not found";
const NAME_TAKEN: &str = "Name has already been taken";

/// A model as GitLab lists it.
struct Listed {
    name: String,
    model: String,
    endpoint: String,
    identifier: String,
    has_api_token: bool,
    /// Upper case; empty before GitLab had providers.
    provider: String,
}

impl Sync<'_> {
    pub(super) async fn models(&mut self, desired: &DesiredConfig) -> Result<(), SyncError> {
        if self.version < since::MODELS {
            for model in &desired.models {
                let why = format!(
                    "not supported by GitLab {}: self-hosted models came in {}",
                    self.version,
                    since::MODELS
                );
                self.report
                    .add("model", &model.name, SyncItemState::Skipped, why);
            }
            return Ok(());
        }
        let query = if self.version >= since::MODEL_PROVIDER {
            MODELS_QUERY_WITH_PROVIDER
        } else {
            MODELS_QUERY
        };
        let listed = match self.query("aiSelfHostedModels", query).await? {
            Ok(data) if data["aiSelfHostedModels"].is_null() => {
                for model in &desired.models {
                    self.report.add(
                        "model",
                        &model.name,
                        SyncItemState::Failed,
                        super::NOT_ADMIN,
                    );
                }
                return Ok(());
            }
            Ok(data) => parse_listing(&data),
            Err(why) => {
                for model in &desired.models {
                    let detail = format!("cannot list GitLab's models: {why}");
                    self.report
                        .add("model", &model.name, SyncItemState::Failed, detail);
                }
                // Without a listing nothing is known: keep every id.
                return Ok(());
            }
        };
        let managed_ids: BTreeSet<&str> =
            self.state.models.values().map(|m| m.id.as_str()).collect();
        self.report.unmanaged = listed
            .iter()
            .filter(|(id, _)| !managed_ids.contains(id.as_str()))
            .map(|(_, m)| m.name.clone())
            .collect();
        for model in &desired.models {
            self.model(model, &listed).await?;
        }
        Ok(())
    }

    async fn model(
        &mut self,
        model: &DesiredModel,
        listed: &BTreeMap<String, Listed>,
    ) -> Result<(), SyncError> {
        if let Some(why) = self.catalog.family_unsupported(&model.family) {
            let detail = format!("family {}: {why}", model.family);
            self.report
                .add("model", &model.name, SyncItemState::Skipped, detail);
            return Ok(());
        }
        if model.endpoint.is_empty() && self.version < since::OPTIONAL_ENDPOINT {
            let detail = format!(
                "no endpoint: not supported by GitLab {} (a {} model without one came in {})",
                self.version,
                provider(model).to_lowercase(),
                since::OPTIONAL_ENDPOINT
            );
            self.report
                .add("model", &model.name, SyncItemState::Skipped, detail);
            return Ok(());
        }
        let key_digest = self.gitlab.key_digest(&model.api_key);
        let pushed = pushed_digest(model, &key_digest);
        let hidden_family = self.catalog.family_beta(&model.family);
        match self.state.models.get(&model.name).cloned() {
            Some(managed) => match listed.get(&managed.id) {
                Some(current) => {
                    if same(current, model, self.version) && managed.key_digest == key_digest {
                        self.remember(model, &managed.id, key_digest, pushed);
                        self.report
                            .add("model", &model.name, SyncItemState::Unchanged, "");
                        return Ok(());
                    }
                    let send_key = managed.key_digest != key_digest
                        || current.has_api_token == model.api_key.is_empty();
                    self.update(model, &managed.id, send_key, key_digest, pushed)
                        .await
                }
                // Not listed: GitLab hides its family, or it was deleted by hand.
                None if hidden_family => {
                    if managed.pushed == pushed {
                        let detail = format!(
                            "created by duofleet ({}) and in place, but not listed: {TESTING_TERMS}",
                            managed.id
                        );
                        self.report
                            .add("model", &model.name, SyncItemState::Hidden, detail);
                        return Ok(());
                    }
                    let send_key = managed.key_digest != key_digest;
                    self.update(model, &managed.id, send_key, key_digest, pushed)
                        .await
                }
                None => {
                    // Deleted in GitLab by hand: create it again.
                    self.state.models.remove(&model.name);
                    self.create(model, listed, key_digest, pushed).await
                }
            },
            None => self.create(model, listed, key_digest, pushed).await,
        }
    }

    fn remember(&mut self, model: &DesiredModel, id: &str, key_digest: String, pushed: String) {
        self.state.blocked.remove(&model.name);
        self.state.models.insert(
            model.name.clone(),
            ManagedModel {
                id: id.to_string(),
                key_digest,
                pushed,
            },
        );
    }

    async fn update(
        &mut self,
        model: &DesiredModel,
        id: &str,
        send_key: bool,
        key_digest: String,
        pushed: String,
    ) -> Result<(), SyncError> {
        if self.version < since::MODEL_UPDATE {
            let detail = format!(
                "differs from the desired model, but GitLab {} cannot update models (it came in {}); delete it in GitLab to have it created again",
                self.version,
                since::MODEL_UPDATE
            );
            self.report
                .add("model", &model.name, SyncItemState::Failed, detail);
            return Ok(());
        }
        let mut input = model_input(model, self.version);
        input["id"] = json!(id);
        // An omitted apiToken keeps GitLab's stored key: send it only when
        // it changes, and "" to remove it.
        if send_key {
            input["apiToken"] = json!(model.api_key);
        }
        let what = format!("update model {}", model.name);
        match self
            .mutate(&what, UPDATE, "aiSelfHostedModelUpdate", input)
            .await?
        {
            Ok(_) => {
                self.remember(model, id, key_digest, pushed);
                let detail = format!("updated model {}", model.name);
                self.report
                    .add("model", &model.name, SyncItemState::Applied, detail);
            }
            Err(why) if why.contains(NOT_FOUND) => {
                // Gone although hidden: it was deleted by hand.
                self.state.models.remove(&model.name);
                return Box::pin(self.create(model, &BTreeMap::new(), key_digest, pushed)).await;
            }
            Err(why) => self
                .report
                .add("model", &model.name, SyncItemState::Failed, why),
        }
        Ok(())
    }

    async fn create(
        &mut self,
        model: &DesiredModel,
        listed: &BTreeMap<String, Listed>,
        key_digest: String,
        pushed: String,
    ) -> Result<(), SyncError> {
        if listed.values().any(|m| m.name == model.name) {
            let detail = "GitLab already has a self-hosted model of that name that duofleet did not create; rename or delete it in GitLab";
            self.report
                .add("model", &model.name, SyncItemState::Failed, detail);
            return Ok(());
        }
        // A create refused because a hidden model holds the name is not
        // tried again until the desired model changes.
        if let Some(why) = self
            .state
            .blocked
            .get(&model.name)
            .and_then(|b| (b.pushed == pushed).then(|| b.reason.clone()))
        {
            self.report
                .add("model", &model.name, SyncItemState::Failed, why);
            return Ok(());
        }
        let mut input = model_input(model, self.version);
        if !model.api_key.is_empty() {
            input["apiToken"] = json!(model.api_key);
        }
        let what = format!("create model {}", model.name);
        match self
            .mutate(&what, CREATE, "aiSelfHostedModelCreate", input)
            .await?
        {
            Ok(payload) => match payload["selfHostedModel"]["id"].as_str() {
                Some(id) => {
                    self.remember(model, id, key_digest, pushed);
                    let detail = format!("created model {}", model.name);
                    self.report
                        .add("model", &model.name, SyncItemState::Applied, detail);
                }
                None => self.report.add(
                    "model",
                    &model.name,
                    SyncItemState::Failed,
                    "GitLab returned no id",
                ),
            },
            Err(why) if why.contains(NAME_TAKEN) => {
                let reason = format!(
                    "GitLab already has a model named {} that it does not list: {TESTING_TERMS}. Accept them, or rename or delete that model in GitLab",
                    model.name
                );
                self.state.blocked.insert(
                    model.name.clone(),
                    crate::state::Blocked {
                        pushed,
                        reason: reason.clone(),
                    },
                );
                self.report
                    .add("model", &model.name, SyncItemState::Failed, reason);
            }
            Err(why) => self
                .report
                .add("model", &model.name, SyncItemState::Failed, why),
        }
        Ok(())
    }

    /// Deletes the models this agent created that the desired config no
    /// longer has (after the feature settings moved away from them).
    pub(super) async fn obsolete_models(
        &mut self,
        desired: &DesiredConfig,
    ) -> Result<(), SyncError> {
        let wanted: BTreeSet<&str> = desired.models.iter().map(|m| m.name.as_str()).collect();
        self.state
            .blocked
            .retain(|name, _| wanted.contains(name.as_str()));
        let obsolete: Vec<(String, String)> = self
            .state
            .models
            .iter()
            .filter(|(name, _)| !wanted.contains(name.as_str()))
            .map(|(name, m)| (name.clone(), m.id.clone()))
            .collect();
        if obsolete.is_empty() || self.version < since::MODEL_UPDATE {
            return Ok(());
        }
        for (name, id) in obsolete {
            let what = format!("delete model {name}");
            match self
                .mutate(
                    &what,
                    DELETE,
                    "aiSelfHostedModelDelete",
                    json!({ "id": id }),
                )
                .await?
            {
                Ok(_) => {
                    self.state.models.remove(&name);
                    let detail = format!("deleted model {name}");
                    self.report
                        .add("model", &name, SyncItemState::Applied, detail);
                }
                Err(why) if why.contains(NOT_FOUND) => {
                    self.state.models.remove(&name);
                }
                Err(why) => self.report.add("model", &name, SyncItemState::Failed, why),
            }
        }
        Ok(())
    }

    /// The GitLab id of a desired model, once it is in place (or hidden).
    pub(super) fn model_id(&self, name: &str) -> Result<String, (SyncItemState, String)> {
        match self.report.state_of("model", name) {
            Some((SyncItemState::Skipped, why)) => {
                Err((SyncItemState::Skipped, format!("model {name}: {why}")))
            }
            Some((SyncItemState::Failed, _)) | None if !self.state.models.contains_key(name) => {
                Err((
                    SyncItemState::Failed,
                    format!("model {name} is not in GitLab"),
                ))
            }
            _ => Ok(self.state.models[name].id.clone()),
        }
    }
}

fn parse_listing(data: &Value) -> BTreeMap<String, Listed> {
    data["aiSelfHostedModels"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let text = |k: &str| m[k].as_str().unwrap_or_default().to_string();
            Some((
                m["id"].as_str()?.to_string(),
                Listed {
                    name: text("name"),
                    model: text("model"),
                    endpoint: text("endpoint"),
                    identifier: text("identifier"),
                    has_api_token: m["hasApiToken"].as_bool().unwrap_or(false),
                    provider: text("provider").to_uppercase(),
                },
            ))
        })
        .collect()
}

/// name, model (the enum in upper case), endpoint and identifier: GitLab
/// requires the first three on update as well; identifier is always sent
/// so that clearing it takes effect. From 18.11, the provider too (newer
/// GitLab requires it).
pub(super) fn model_input(model: &DesiredModel, version: GitLabVersion) -> Value {
    let mut input = json!({
        "name": model.name,
        "model": model.family.to_uppercase(),
        "identifier": model.identifier,
    });
    // Left out when there is none (GitLab 19.0+ for bedrock and vertex_ai).
    if !model.endpoint.is_empty() {
        input["endpoint"] = json!(model.endpoint);
    }
    if version >= since::MODEL_PROVIDER {
        input["provider"] = json!(provider(model));
    }
    input
}

/// The model's provider as GitLab's enum names it: the one given, else
/// inferred from the identifier as GitLab infers it (`bedrock/` and
/// `vertex_ai/` name theirs, anything else is `API`).
pub(super) fn provider(model: &DesiredModel) -> String {
    if !model.provider.is_empty() {
        return model.provider.to_uppercase();
    }
    let prefix = model.identifier.split('/').next().unwrap_or_default();
    match prefix {
        "bedrock" => "BEDROCK",
        "vertex_ai" => "VERTEX_AI",
        _ => "API",
    }
    .to_string()
}

/// Whether GitLab's model matches the desired one (key aside). GitLab
/// answers the family in lower case; compare without case.
fn same(current: &Listed, model: &DesiredModel, version: GitLabVersion) -> bool {
    current.name == model.name
        && current.model.eq_ignore_ascii_case(&model.family)
        && current.endpoint == model.endpoint
        && current.identifier == model.identifier
        && current.has_api_token != model.api_key.is_empty()
        && (version < since::MODEL_PROVIDER || current.provider == provider(model))
}

/// What was pushed, to compare a model GitLab does not list.
fn pushed_digest(model: &DesiredModel, key_digest: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut text = format!(
        "{}\n{}\n{}\n{}\n{key_digest}",
        model.name, model.family, model.endpoint, model.identifier
    );
    // Only a provider given outright: digests from before providers stay.
    if !model.provider.is_empty() {
        text.push_str(&format!("\n{}", model.provider));
    }
    hex::encode(Sha256::digest(text.as_bytes()))
}
