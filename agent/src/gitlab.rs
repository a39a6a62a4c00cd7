//! Models and feature settings through GitLab's GraphQL API (steps 3 and 4
//! of the page this project grew from), and the gateway URL in GitLab's
//! database from 17.9 on.
//!
//! Reconciling is idempotent: it reads first and mutates only what differs,
//! so a sync with nothing to change sends queries only. It touches only the
//! self-hosted models it created itself (their GitLab ids are in the state
//! file), and since GitLab never returns an API key, it keeps a keyed digest
//! of the last key it pushed to know when a key changed.

use crate::state::GitLabState;
use duofleet_proto::v1::{DesiredConfig, DesiredModel, GitLabSync, Provider};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub struct GitLab {
    http: reqwest::Client,
    base: String,
    token: String,
    /// Keys the API-key digests; lives in the state dir.
    digest_key: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "GitLab refused the token in --gitlab-token-file (HTTP {status}: {body}); it must be an administrator's personal access token with the api scope"
    )]
    Token { status: u16, body: String },
    #[error("GitLab API {what} failed: {detail}")]
    Http { what: String, detail: String },
    #[error("GitLab API {what}: {}", .errors.join("; "))]
    GraphQl { what: String, errors: Vec<String> },
}

/// What one reconcile did.
#[derive(Debug, Default)]
pub struct Report {
    pub mutations: usize,
    pub applied: Vec<String>,
    pub failed: Vec<String>,
    pub unmanaged: Vec<String>,
    pub version: String,
}

impl Report {
    pub fn status(&self) -> GitLabSync {
        GitLabSync {
            enabled: true,
            detail: format!("GitLab {}", self.version),
            unmanaged_models: self.unmanaged.clone(),
        }
    }

    /// The ack's error text: what was applied, what was not, and why.
    pub fn failure(&self) -> Option<String> {
        if self.failed.is_empty() {
            return None;
        }
        let applied = if self.applied.is_empty() {
            "nothing".to_string()
        } else {
            self.applied.join(", ")
        };
        Some(format!(
            "GitLab API: applied {applied}; not applied: {}",
            self.failed.join("; ")
        ))
    }
}

const MODELS_QUERY: &str = "query duofleetModels { aiSelfHostedModels { nodes { id name model endpoint identifier hasApiToken } } }";
const FEATURES_QUERY: &str = "query duofleetFeatures { aiFeatureSettings { nodes { feature provider selfHostedModel { id } } } }";
const DUO_SETTINGS_QUERY: &str = "query duofleetDuoSettings { duoSettings { aiGatewayUrl } }";
const CREATE: &str = "mutation duofleetCreate($input: AiSelfHostedModelCreateInput!) { aiSelfHostedModelCreate(input: $input) { selfHostedModel { id } errors } }";
const UPDATE: &str = "mutation duofleetUpdate($input: AiSelfHostedModelUpdateInput!) { aiSelfHostedModelUpdate(input: $input) { selfHostedModel { id } errors } }";
const DELETE: &str = "mutation duofleetDelete($input: AiSelfHostedModelDeleteInput!) { aiSelfHostedModelDelete(input: $input) { errors } }";
const FEATURES_UPDATE: &str = "mutation duofleetFeatures($input: AiFeatureSettingUpdateInput!) { aiFeatureSettingUpdate(input: $input) { errors } }";
const GATEWAY_UPDATE: &str = "mutation duofleetGateway($input: DuoSettingsUpdateInput!) { duoSettingsUpdate(input: $input) { errors } }";

/// What early 17.x says when given the list form.
const NO_LIST_FORM: &str = "doesn't accept argument 'features'";

impl GitLab {
    pub fn new(
        base: &str,
        token: String,
        digest_key: Vec<u8>,
        ca_roots: reqwest::Client,
    ) -> GitLab {
        GitLab {
            http: ca_roots,
            base: base.trim_end_matches('/').to_string(),
            token,
            digest_key,
        }
    }

    /// An HTTP client with the system's roots and proxy settings.
    pub fn client() -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    pub async fn version(&self) -> Result<String, SyncError> {
        let what = "GET /api/v4/version".to_string();
        let response = self
            .http
            .get(format!("{}/api/v4/version", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| SyncError::Http {
                what: what.clone(),
                detail: e.to_string(),
            })?;
        let body = check_status(response, &what).await?;
        body["version"]
            .as_str()
            .map(str::to_string)
            .ok_or(SyncError::Http {
                what,
                detail: "no version in the answer".into(),
            })
    }

    async fn graphql(&self, what: &str, query: &str, variables: Value) -> Result<Value, SyncError> {
        let response = self
            .http
            .post(format!("{}/api/graphql", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .map_err(|e| SyncError::Http {
                what: what.to_string(),
                detail: e.to_string(),
            })?;
        let body = check_status(response, what).await?;
        if let Some(errors) = body["errors"].as_array().filter(|e| !e.is_empty()) {
            return Err(SyncError::GraphQl {
                what: what.to_string(),
                errors: errors
                    .iter()
                    .map(|e| e["message"].as_str().unwrap_or("unknown error").to_string())
                    .collect(),
            });
        }
        Ok(body["data"].clone())
    }

    /// A mutation: top-level errors fail the call; the payload's `errors`
    /// (GitLab's validation messages) come back as `Err(messages)`.
    async fn mutate(
        &self,
        what: &str,
        query: &str,
        field: &str,
        input: Value,
        report: &mut Report,
    ) -> Result<Result<Value, Vec<String>>, SyncError> {
        report.mutations += 1;
        let data = self.graphql(what, query, json!({ "input": input })).await?;
        let payload = data[field].clone();
        let errors: Vec<String> = payload["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|m| m.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(if errors.is_empty() {
            Ok(payload)
        } else {
            Err(errors)
        })
    }

    /// Brings GitLab to `desired`. `state` is what the agent created before;
    /// it is updated as mutations succeed.
    pub async fn reconcile(
        &self,
        desired: &DesiredConfig,
        state: &mut GitLabState,
    ) -> Result<Report, SyncError> {
        let mut report = Report {
            version: self.version().await?,
            ..Report::default()
        };
        let existing = self
            .graphql("aiSelfHostedModels", MODELS_QUERY, json!({}))
            .await?;
        let existing: Vec<Value> = existing["aiSelfHostedModels"]["nodes"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let by_id: BTreeMap<&str, &Value> = existing
            .iter()
            .filter_map(|m| Some((m["id"].as_str()?, m)))
            .collect();
        // Forget models deleted in GitLab by hand: they are created again.
        state
            .models
            .retain(|_, managed| by_id.contains_key(managed.id.as_str()));
        let managed_ids: BTreeSet<String> = state.models.values().map(|m| m.id.clone()).collect();
        report.unmanaged = existing
            .iter()
            .filter(|m| !managed_ids.contains(m["id"].as_str().unwrap_or_default()))
            .filter_map(|m| m["name"].as_str().map(str::to_string))
            .collect();

        for model in &desired.models {
            self.sync_model(model, &by_id, state, &mut report).await?;
        }
        self.sync_features(desired, state, &mut report).await?;

        let wanted: BTreeSet<&str> = desired.models.iter().map(|m| m.name.as_str()).collect();
        let obsolete: Vec<String> = state
            .models
            .keys()
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        for name in obsolete {
            let id = state.models[&name].id.clone();
            match self
                .mutate(
                    &format!("delete model {name}"),
                    DELETE,
                    "aiSelfHostedModelDelete",
                    json!({ "id": id }),
                    &mut report,
                )
                .await?
            {
                Ok(_) => {
                    state.models.remove(&name);
                    report.applied.push(format!("deleted model {name}"));
                }
                Err(errors) => report
                    .failed
                    .push(format!("delete model {name}: {}", errors.join(", "))),
            }
        }

        if !desired.ai_gateway_url.is_empty() && at_least(&report.version, 17, 9) {
            let current = self
                .graphql("duoSettings", DUO_SETTINGS_QUERY, json!({}))
                .await?;
            if current["duoSettings"]["aiGatewayUrl"].as_str()
                != Some(desired.ai_gateway_url.as_str())
            {
                match self
                    .mutate(
                        "duoSettingsUpdate",
                        GATEWAY_UPDATE,
                        "duoSettingsUpdate",
                        json!({ "aiGatewayUrl": desired.ai_gateway_url }),
                        &mut report,
                    )
                    .await?
                {
                    Ok(_) => report.applied.push("AI gateway URL setting".into()),
                    Err(errors) => report
                        .failed
                        .push(format!("AI gateway URL setting: {}", errors.join(", "))),
                }
            }
        }
        Ok(report)
    }

    async fn sync_model(
        &self,
        model: &DesiredModel,
        by_id: &BTreeMap<&str, &Value>,
        state: &mut GitLabState,
        report: &mut Report,
    ) -> Result<(), SyncError> {
        let key_digest = self.key_digest(&model.api_key);
        let mut input = json!({
            "name": model.name,
            "model": model.family.to_uppercase(),
            "endpoint": model.endpoint,
            "identifier": model.identifier,
        });
        if !model.api_key.is_empty() {
            input["apiToken"] = json!(model.api_key);
        }
        match state.models.get(&model.name) {
            Some(managed) => {
                let current = by_id[managed.id.as_str()];
                let same = current["name"] == json!(model.name)
                    && current["model"] == input["model"]
                    && current["endpoint"] == json!(model.endpoint)
                    && current["identifier"].as_str().unwrap_or_default() == model.identifier
                    && current["hasApiToken"].as_bool() == Some(!model.api_key.is_empty())
                    && managed.key_digest == key_digest;
                if same {
                    return Ok(());
                }
                input["id"] = json!(managed.id);
                match self
                    .mutate(
                        &format!("update model {}", model.name),
                        UPDATE,
                        "aiSelfHostedModelUpdate",
                        input,
                        report,
                    )
                    .await?
                {
                    Ok(_) => {
                        state
                            .models
                            .get_mut(&model.name)
                            .expect("present")
                            .key_digest = key_digest;
                        report.applied.push(format!("updated model {}", model.name));
                    }
                    Err(errors) => report.failed.push(format!(
                        "update model {}: {}",
                        model.name,
                        errors.join(", ")
                    )),
                }
            }
            None => {
                if by_id.values().any(|m| m["name"] == json!(model.name)) {
                    report.failed.push(format!(
                        "model {}: GitLab already has a self-hosted model of that name that duofleet did not create; rename or delete it in GitLab",
                        model.name
                    ));
                    return Ok(());
                }
                match self
                    .mutate(
                        &format!("create model {}", model.name),
                        CREATE,
                        "aiSelfHostedModelCreate",
                        input,
                        report,
                    )
                    .await?
                {
                    Ok(payload) => match payload["selfHostedModel"]["id"].as_str() {
                        Some(id) => {
                            state.models.insert(
                                model.name.clone(),
                                crate::state::ManagedModel {
                                    id: id.to_string(),
                                    key_digest,
                                },
                            );
                            report.applied.push(format!("created model {}", model.name));
                        }
                        None => report.failed.push(format!(
                            "create model {}: GitLab returned no id",
                            model.name
                        )),
                    },
                    Err(errors) => report.failed.push(format!(
                        "create model {}: {}",
                        model.name,
                        errors.join(", ")
                    )),
                }
            }
        }
        Ok(())
    }

    async fn sync_features(
        &self,
        desired: &DesiredConfig,
        state: &mut GitLabState,
        report: &mut Report,
    ) -> Result<(), SyncError> {
        let current = self
            .graphql("aiFeatureSettings", FEATURES_QUERY, json!({}))
            .await?;
        let current: BTreeMap<String, (String, String)> = current["aiFeatureSettings"]["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                Some((
                    n["feature"].as_str()?.to_string(),
                    (
                        n["provider"].as_str()?.to_string(),
                        n["selfHostedModel"]["id"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                    ),
                ))
            })
            .collect();
        // Group what differs by (provider, model id): one call per group.
        let mut groups: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for setting in &desired.features {
            let provider = match setting.provider() {
                Provider::Disabled => "DISABLED",
                Provider::Vendor => "VENDORED",
                Provider::SelfHosted => "SELF_HOSTED",
                Provider::Unspecified => continue,
            };
            let model_id = if setting.provider() == Provider::SelfHosted {
                match state.models.get(&setting.model) {
                    Some(m) => m.id.clone(),
                    None => {
                        report.failed.push(format!(
                            "feature {}: model {} is not in GitLab",
                            setting.feature, setting.model
                        ));
                        continue;
                    }
                }
            } else {
                String::new()
            };
            let feature = setting.feature.to_uppercase();
            if current.get(&feature) != Some(&(provider.to_string(), model_id.clone())) {
                groups
                    .entry((provider.to_string(), model_id))
                    .or_default()
                    .push(feature);
            }
        }
        for ((provider, model_id), features) in groups {
            let mut input = json!({ "provider": provider });
            if !model_id.is_empty() {
                input["aiSelfHostedModelId"] = json!(model_id);
            }
            let outcome = if state.single_feature_form {
                Err(SyncError::GraphQl {
                    what: String::new(),
                    errors: vec![NO_LIST_FORM.into()],
                })
            } else {
                let mut list = input.clone();
                list["features"] = json!(features);
                self.mutate(
                    "aiFeatureSettingUpdate",
                    FEATURES_UPDATE,
                    "aiFeatureSettingUpdate",
                    list,
                    report,
                )
                .await
            };
            let results: Vec<(String, Result<Value, Vec<String>>)> = match outcome {
                Err(SyncError::GraphQl { errors, .. })
                    if errors.iter().any(|e| e.contains(NO_LIST_FORM)) =>
                {
                    // Early 17.x: one call per feature, with `feature:`.
                    state.single_feature_form = true;
                    let mut results = Vec::new();
                    for feature in &features {
                        let mut single = input.clone();
                        single["feature"] = json!(feature);
                        let result = self
                            .mutate(
                                "aiFeatureSettingUpdate",
                                FEATURES_UPDATE,
                                "aiFeatureSettingUpdate",
                                single,
                                report,
                            )
                            .await?;
                        results.push((feature.clone(), result));
                    }
                    results
                }
                Err(other) => return Err(other),
                Ok(result) => vec![(features.join(", "), result)],
            };
            for (what, result) in results {
                match result {
                    Ok(_) => report
                        .applied
                        .push(format!("{} -> {provider}", what.to_lowercase())),
                    Err(errors) => report.failed.push(format!(
                        "{}: {}",
                        what.to_lowercase(),
                        errors.join(", ")
                    )),
                }
            }
        }
        Ok(())
    }

    fn key_digest(&self, key: &str) -> String {
        if key.is_empty() {
            return String::new();
        }
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.digest_key).expect("HMAC takes any key length");
        mac.update(key.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

async fn check_status(response: reqwest::Response, what: &str) -> Result<Value, SyncError> {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    if status == 401 || status == 403 {
        return Err(SyncError::Token {
            status,
            body: body.chars().take(200).collect(),
        });
    }
    if !(200..300).contains(&status) {
        return Err(SyncError::Http {
            what: what.to_string(),
            detail: format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            ),
        });
    }
    serde_json::from_str(&body).map_err(|e| SyncError::Http {
        what: what.to_string(),
        detail: format!("not JSON: {e}"),
    })
}

/// Whether "17.9.0-ee" is at least 17.9.
pub fn at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_major_and_minor() {
        assert!(at_least("17.9.0-ee", 17, 9));
        assert!(at_least("18.0.1", 17, 9));
        assert!(!at_least("17.8.3-ee", 17, 9));
        assert!(!at_least("garbage", 17, 9));
    }
}
