//! Feature settings: which provider (and which self-hosted model) each Duo
//! feature uses, in the form of the instance's GitLab version.

use super::api::since;
use super::{Sync, SyncError, TESTING_TERMS};
use crate::state::ManagedFeature;
use duofleet_proto::v1::{DesiredConfig, Provider, SyncItemState};
use serde_json::{Value, json};
use std::collections::BTreeMap;

const FEATURES_QUERY: &str = "query duofleetFeatures { aiFeatureSettings { nodes { feature provider selfHostedModel { id } } } }";
const FEATURES_UPDATE: &str = "mutation duofleetFeatures($input: AiFeatureSettingUpdateInput!) { aiFeatureSettingUpdate(input: $input) { errors } }";

/// What a feature is set to: provider (upper case) and model id.
type Setting = (String, String);

/// Features whose self-hosted model needs GitLab's `update_dap_self_hosted_model`
/// ability: with an offline license the self-hosted agent-platform add-on,
/// otherwise Duo Enterprise and the testing terms. Sent on their own, since
/// GitLab's refusal is a top-level error that fails the whole call.
const LICENSE_GATED: [&str; 2] = ["duo_agent_platform", "duo_agent_platform_agentic_chat"];
const NO_PERMISSION: &str = "You don't have permission to update the setting";

/// The reason shown for a license refusal, with GitLab's own words.
fn not_permitted(feature: &str, gitlab: &str) -> String {
    format!(
        "not permitted by this instance's license: a self-hosted model for {feature} needs GitLab's self-hosted Duo Agent Platform add-on (or Duo Enterprise with the testing terms); GitLab: {gitlab} Not sent again until the setting or GitLab's version changes"
    )
}

fn gated(feature: &str, target: &Setting) -> bool {
    target.0 == "SELF_HOSTED" && LICENSE_GATED.contains(&feature)
}

impl Sync<'_> {
    pub(super) async fn features(&mut self, desired: &DesiredConfig) -> Result<(), SyncError> {
        let wanted = self.wanted_features(desired);
        if self.version < since::FEATURE_UPDATE {
            for feature in wanted.keys() {
                let why = format!(
                    "not supported by GitLab {}: feature settings came in {}",
                    self.version,
                    since::FEATURE_UPDATE
                );
                self.report
                    .add("feature", feature, SyncItemState::Skipped, why);
            }
            return Ok(());
        }
        // 17.5 and later list the features the instance allows; 17.4 cannot
        // be read, and what the agent set last stands for it.
        let listed = if self.version >= since::FEATURE_LIST {
            match self.list().await? {
                Ok(None) => {
                    for feature in wanted.keys() {
                        self.report.add(
                            "feature",
                            feature,
                            SyncItemState::Failed,
                            super::NOT_ADMIN,
                        );
                    }
                    return Ok(());
                }
                Ok(Some(listed)) => Some(listed),
                Err(why) => {
                    for feature in wanted.keys() {
                        let detail = format!("cannot list GitLab's feature settings: {why}");
                        self.report
                            .add("feature", feature, SyncItemState::Failed, detail);
                    }
                    return Ok(());
                }
            }
        } else {
            None
        };
        // (target, whether the feature leaves duofleet's hands, whether the
        // license gates it) -> features
        let mut changes: BTreeMap<(Setting, bool, bool), Vec<String>> = BTreeMap::new();
        for (feature, target) in &wanted {
            let target = match target {
                Ok(target) => target,
                Err((state, why)) => {
                    self.report.add("feature", feature, *state, why.clone());
                    continue;
                }
            };
            let current = match &listed {
                Some(listed) => match listed.get(feature) {
                    Some(current) => Some(current.clone()),
                    None => {
                        // GitLab lists every feature it allows: a beta one
                        // among them means the testing terms were accepted.
                        let terms_accepted = listed.keys().any(|f| self.catalog.feature_beta(f));
                        let why = if self.catalog.feature_beta(feature) && !terms_accepted {
                            format!("a beta feature on GitLab {}: {TESTING_TERMS}", self.version)
                        } else {
                            "GitLab does not offer it on this instance (its license tier lacks it)"
                                .to_string()
                        };
                        self.report
                            .add("feature", feature, SyncItemState::Hidden, why);
                        continue;
                    }
                },
                None => self
                    .state
                    .features
                    .get(feature)
                    .map(|m| (m.provider.clone(), m.model_id.clone())),
            };
            if current.as_ref() == Some(target) {
                self.set(feature, target);
                self.state.refused_features.remove(feature);
                self.report
                    .add("feature", feature, SyncItemState::Unchanged, "");
            } else if let Some(refused) = self
                .state
                .refused_features
                .get(feature)
                .filter(|r| r.pushed == self.refusal_key(target))
            {
                let reason = refused.reason.clone();
                self.report
                    .add("feature", feature, SyncItemState::Hidden, reason);
            } else {
                changes
                    .entry((target.clone(), false, gated(feature, target)))
                    .or_default()
                    .push(feature.clone());
            }
        }
        // Features this agent set that left the profile go back to GitLab's
        // default: unassigned on 18.x, the vendor model on 17.x.
        let default = if self.version >= since::V18 {
            "UNASSIGNED"
        } else {
            "VENDORED"
        };
        let released: Vec<String> = self
            .state
            .features
            .keys()
            .filter(|f| !wanted.contains_key(*f))
            .cloned()
            .collect();
        for feature in released {
            let ours = self.state.features[&feature].clone();
            let still_ours = match &listed {
                Some(listed) => {
                    listed.get(&feature) == Some(&(ours.provider.clone(), ours.model_id.clone()))
                }
                None => true,
            };
            if still_ours {
                changes
                    .entry(((default.to_string(), String::new()), true, false))
                    .or_default()
                    .push(feature);
            } else {
                self.state.features.remove(&feature);
            }
        }
        self.state
            .refused_features
            .retain(|feature, _| wanted.contains_key(feature));
        for ((target, released, _), features) in changes {
            self.update_features(&target, features, released).await?;
        }
        Ok(())
    }

    /// The desired setting per feature key, or why it cannot be applied.
    fn wanted_features(
        &self,
        desired: &DesiredConfig,
    ) -> BTreeMap<String, Result<Setting, (SyncItemState, String)>> {
        let mut wanted = BTreeMap::new();
        for setting in &desired.features {
            let provider = match setting.provider() {
                Provider::Disabled => "DISABLED",
                Provider::Vendor => "VENDORED",
                Provider::SelfHosted => "SELF_HOSTED",
                Provider::Unspecified => continue,
            };
            let family = desired
                .models
                .iter()
                .find(|m| m.name == setting.model)
                .map(|m| m.family.as_str());
            let target = if let Some(why) = self.catalog.feature_unsupported(&setting.feature) {
                Err((SyncItemState::Skipped, why))
            } else if let Some(where_set) = self.catalog.not_settable(&setting.feature) {
                Err((SyncItemState::Skipped, where_set.to_string()))
            } else if setting.provider() == Provider::SelfHosted {
                // A model skipped here skips its features; one GitLab
                // would refuse for this feature is refused without a call.
                self.model_id(&setting.model).and_then(|id| {
                    match family.and_then(|f| self.catalog.incompatible(&setting.feature, f)) {
                        Some(why) => Err((SyncItemState::Failed, why)),
                        None => Ok((provider.to_string(), id)),
                    }
                })
            } else {
                Ok((provider.to_string(), String::new()))
            };
            wanted.insert(setting.feature.clone(), target);
        }
        wanted
    }

    /// GitLab's feature settings; `Ok(None)` when it answers null (the
    /// token's user may not manage them).
    async fn list(&self) -> Result<Result<Option<BTreeMap<String, Setting>>, String>, SyncError> {
        Ok(self
            .query("aiFeatureSettings", FEATURES_QUERY)
            .await?
            .map(|data| (!data["aiFeatureSettings"].is_null()).then(|| parse_listing(&data))))
    }

    /// What a license refusal was about: the setting and GitLab's version.
    fn refusal_key(&self, target: &Setting) -> String {
        format!("{} {} {}", self.version, target.0, target.1)
    }

    fn set(&mut self, feature: &str, target: &Setting) {
        self.state.features.insert(
            feature.to_string(),
            ManagedFeature {
                provider: target.0.clone(),
                model_id: target.1.clone(),
            },
        );
    }

    /// Sets `features` to `target`: one call for all of them from 17.11,
    /// one call each before. GitLab saves each feature on its own, so a
    /// call that reports errors is checked against a fresh listing.
    async fn update_features(
        &mut self,
        target: &Setting,
        features: Vec<String>,
        released: bool,
    ) -> Result<(), SyncError> {
        let (provider, model_id) = target;
        let mut input = json!({ "provider": provider });
        if !model_id.is_empty() {
            input["aiSelfHostedModelId"] = json!(model_id);
        }
        let upper = |f: &str| f.to_uppercase();
        let mut outcomes: Vec<(String, Result<(), String>)> = Vec::new();
        if self.version >= since::FEATURE_LIST_FORM {
            let mut list = input.clone();
            list["features"] = json!(features.iter().map(|f| upper(f)).collect::<Vec<_>>());
            match self
                .mutate(
                    "aiFeatureSettingUpdate",
                    FEATURES_UPDATE,
                    "aiFeatureSettingUpdate",
                    list,
                )
                .await?
            {
                Ok(_) => outcomes.extend(features.iter().map(|f| (f.clone(), Ok(())))),
                Err(why) => {
                    // Which of them were saved: ask GitLab.
                    let listed = self.list().await?.ok().flatten().unwrap_or_default();
                    for feature in &features {
                        let saved = listed.get(feature) == Some(target);
                        outcomes.push((
                            feature.clone(),
                            if saved { Ok(()) } else { Err(why.clone()) },
                        ));
                    }
                }
            }
        } else {
            for feature in &features {
                let mut single = input.clone();
                single["feature"] = json!(upper(feature));
                let result = self
                    .mutate(
                        "aiFeatureSettingUpdate",
                        FEATURES_UPDATE,
                        "aiFeatureSettingUpdate",
                        single,
                    )
                    .await?
                    .map(|_| ());
                outcomes.push((feature.clone(), result));
            }
        }
        for (feature, result) in outcomes {
            match result {
                Ok(()) if released => {
                    self.state.features.remove(&feature);
                    let detail = format!("{feature} -> {provider} (GitLab's default)");
                    self.report
                        .add("feature", &feature, SyncItemState::Applied, detail);
                }
                Ok(()) => {
                    self.set(&feature, target);
                    self.state.refused_features.remove(&feature);
                    let detail = format!("{feature} -> {provider}");
                    self.report
                        .add("feature", &feature, SyncItemState::Applied, detail);
                }
                Err(why) if why.contains(NO_PERMISSION) && gated(&feature, target) => {
                    let reason = not_permitted(&feature, &why);
                    self.state.refused_features.insert(
                        feature.clone(),
                        crate::state::Blocked {
                            pushed: self.refusal_key(target),
                            reason: reason.clone(),
                        },
                    );
                    self.report
                        .add("feature", &feature, SyncItemState::Hidden, reason);
                }
                Err(why) => self
                    .report
                    .add("feature", &feature, SyncItemState::Failed, why),
            }
        }
        Ok(())
    }
}

/// feature (lower case) -> (provider in upper case, model id).
fn parse_listing(data: &Value) -> BTreeMap<String, Setting> {
    data["aiFeatureSettings"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            Some((
                n["feature"].as_str()?.to_lowercase(),
                (
                    n["provider"].as_str()?.to_uppercase(),
                    n["selfHostedModel"]["id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ),
            ))
        })
        .collect()
}
