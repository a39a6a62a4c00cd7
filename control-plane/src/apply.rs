//! ApplyConfig's operation: make the configuration equal to a whole set of
//! models and profiles, checked as a whole, so that it commits as one
//! revision (see `store::Store::change`).

use crate::catalog::Catalog;
use crate::config::{
    Config, clear_output_fields_model, clear_output_fields_profile, same_model, same_profile,
    sort_features,
};
use crate::error::{ConfigError, quoted};
use crate::validate::{self, DEFAULT_PROFILE};
use duofleet_proto::v1::{Model, Profile, Provider};
use std::collections::BTreeMap;

type Result<T = ()> = std::result::Result<T, ConfigError>;

impl Config {
    /// Creates or replaces every listed model and profile (a model without
    /// an API key keeps its stored one) and, with `prune`, deletes the
    /// unlisted ones except `default`. References are checked on the
    /// result, so a model and the profile that starts using it can arrive
    /// together. Errors name the item: `models[2].endpoint: ...`.
    pub fn apply_set(
        &mut self,
        catalog: &Catalog,
        models: Vec<Model>,
        profiles: Vec<Profile>,
        prune: bool,
    ) -> Result<String> {
        let old = self.clone();
        let mut listed_models = BTreeMap::new();
        for (i, mut model) in models.into_iter().enumerate() {
            clear_output_fields_model(&mut model);
            if let Some(first) = listed_models.insert(model.name.clone(), i) {
                return Err(ConfigError::invalid(
                    format!("models[{i}].name"),
                    format!(
                        "{} is listed twice (also models[{first}])",
                        quoted(&model.name)
                    ),
                ));
            }
            let merged = match self.models.get(&model.name) {
                Some(stored) => {
                    let mut merged = stored.clone();
                    merged.family = model.family;
                    merged.endpoint = model.endpoint;
                    merged.identifier = model.identifier;
                    merged.provider = model.provider;
                    if !model.api_key.is_empty() {
                        merged.api_key = model.api_key;
                    }
                    merged
                }
                None => model,
            };
            validate::model(&merged, catalog).map_err(|e| item(e, "model", i))?;
            let mut merged = merged;
            merged.has_api_key = !merged.api_key.is_empty();
            self.models.insert(merged.name.clone(), merged);
        }
        let mut listed_profiles = BTreeMap::new();
        for (i, mut profile) in profiles.into_iter().enumerate() {
            clear_output_fields_profile(&mut profile);
            if let Some(first) = listed_profiles.insert(profile.name.clone(), i) {
                return Err(ConfigError::invalid(
                    format!("profiles[{i}].name"),
                    format!(
                        "{} is listed twice (also profiles[{first}])",
                        quoted(&profile.name)
                    ),
                ));
            }
            validate::profile(&profile, catalog).map_err(|e| item(e, "profile", i))?;
            let merged = match self.profiles.get(&profile.name) {
                Some(stored) => {
                    let mut merged = stored.clone();
                    merged.ai_gateway_url = profile.ai_gateway_url;
                    merged.ai_gateway_internal_url = profile.ai_gateway_internal_url;
                    merged.selector = profile.selector;
                    merged.priority = profile.priority;
                    merged.features = profile.features;
                    merged.ai_gateway_timeout_seconds = profile.ai_gateway_timeout_seconds;
                    merged.duo_agent_platform_service_url = profile.duo_agent_platform_service_url;
                    merged.parent = profile.parent;
                    merged.reconfigure_window = profile.reconfigure_window;
                    merged
                }
                None => profile,
            };
            let mut merged = merged;
            sort_features(&mut merged);
            self.profiles.insert(merged.name.clone(), merged);
        }
        if prune {
            self.models
                .retain(|name, _| listed_models.contains_key(name));
            self.profiles
                .retain(|name, _| name == DEFAULT_PROFILE || listed_profiles.contains_key(name));
        }
        // References, on the result.
        self.check_chains()?;
        for profile in self.profiles.values() {
            for (j, setting) in profile.features.iter().enumerate() {
                if setting.provider() != Provider::SelfHosted {
                    continue;
                }
                let field = match listed_profiles.get(&profile.name) {
                    Some(i) => format!("profiles[{i}].features[{j}]"),
                    None => format!("profile {} features[{j}]", quoted(&profile.name)),
                };
                self.check_setting(catalog, &field, setting)?;
            }
        }
        Ok(summary(&old, self))
    }
}

/// Re-points a validation error from the single-item form (`model.endpoint`)
/// to the item in the request (`models[2].endpoint`).
fn item(error: ConfigError, kind: &str, index: usize) -> ConfigError {
    match error {
        ConfigError::Invalid { field, rule } => {
            let field = match field.strip_prefix(&format!("{kind}.")) {
                Some(rest) => format!("{kind}s[{index}].{rest}"),
                None => format!("{kind}s[{index}].{field}"),
            };
            ConfigError::Invalid { field, rule }
        }
        other => other,
    }
}

/// "apply: create model a; update profile default; delete model b".
fn summary(old: &Config, new: &Config) -> String {
    let mut parts = Vec::new();
    let mut group = |action: &str, kind: &str, names: Vec<&String>| {
        if names.is_empty() {
            return;
        }
        const SHOWN: usize = 5;
        let mut list: Vec<&str> = names.iter().take(SHOWN).map(|n| n.as_str()).collect();
        let more = names.len().saturating_sub(SHOWN);
        let more_text = format!("and {more} more");
        if more > 0 {
            list.push(&more_text);
        }
        let plural = if names.len() == 1 { "" } else { "s" };
        parts.push(format!("{action} {kind}{plural} {}", list.join(", ")));
    };
    group(
        "create",
        "model",
        new.models
            .keys()
            .filter(|n| !old.models.contains_key(*n))
            .collect(),
    );
    group(
        "update",
        "model",
        new.models
            .iter()
            .filter(|(n, m)| old.models.get(*n).is_some_and(|o| !same_model(o, m)))
            .map(|(n, _)| n)
            .collect(),
    );
    group(
        "create",
        "profile",
        new.profiles
            .keys()
            .filter(|n| !old.profiles.contains_key(*n))
            .collect(),
    );
    group(
        "update",
        "profile",
        new.profiles
            .iter()
            .filter(|(n, p)| old.profiles.get(*n).is_some_and(|o| !same_profile(o, p)))
            .map(|(n, _)| n)
            .collect(),
    );
    group(
        "delete",
        "profile",
        old.profiles
            .keys()
            .filter(|n| !new.profiles.contains_key(*n))
            .collect(),
    );
    group(
        "delete",
        "model",
        old.models
            .keys()
            .filter(|n| !new.models.contains_key(*n))
            .collect(),
    );
    if parts.is_empty() {
        "apply: no change".into()
    } else {
        format!("apply: {}", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;
    use crate::config::default_profile;
    use duofleet_proto::v1::FeatureSetting;

    fn model(name: &str, key: &str) -> Model {
        Model {
            name: name.into(),
            family: "mixtral".into(),
            endpoint: "https://vllm:8000/v1".into(),
            api_key: key.into(),
            ..Default::default()
        }
    }

    fn chat_on(model: &str) -> Profile {
        Profile {
            name: DEFAULT_PROFILE.into(),
            features: vec![FeatureSetting {
                feature: "duo_chat".into(),
                provider: Provider::SelfHosted as i32,
                model: model.into(),
            }],
            ..Default::default()
        }
    }

    fn start() -> Config {
        let mut config = Config::default();
        config
            .profiles
            .insert(DEFAULT_PROFILE.into(), default_profile());
        config
    }

    #[test]
    fn a_model_and_the_profile_using_it_arrive_together_and_keys_are_kept() {
        let cat = catalog::get();
        let mut config = start();
        let summary = config
            .apply_set(cat, vec![model("a", "k1")], vec![chat_on("a")], false)
            .unwrap();
        assert_eq!(summary, "apply: create model a; update profile default");
        // Without a key: the stored one stays.
        let summary = config
            .apply_set(cat, vec![model("a", "")], vec![chat_on("a")], false)
            .unwrap();
        assert_eq!(summary, "apply: no change");
        assert_eq!(config.models["a"].api_key, "k1");
    }

    #[test]
    fn prune_deletes_the_unlisted_but_never_default_nor_a_used_model() {
        let cat = catalog::get();
        let mut config = start();
        config
            .apply_set(
                cat,
                vec![model("a", "k"), model("b", "k")],
                vec![chat_on("a")],
                false,
            )
            .unwrap();
        let err = config
            .clone()
            .apply_set(cat, vec![model("b", "")], vec![], true)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "profile \"default\" features[0].model: model \"a\" does not exist; create it first"
        );
        let summary = config
            .apply_set(
                cat,
                vec![model("b", "")],
                vec![Profile {
                    name: DEFAULT_PROFILE.into(),
                    ..Default::default()
                }],
                true,
            )
            .unwrap();
        assert_eq!(summary, "apply: update profile default; delete model a");
        assert!(config.profiles.contains_key(DEFAULT_PROFILE));
    }

    #[test]
    fn errors_name_the_item_in_the_request() {
        let cat = catalog::get();
        let mut bad = model("b", "");
        bad.endpoint = "ftp://x".into();
        let err = start()
            .apply_set(cat, vec![model("a", ""), bad], vec![], false)
            .unwrap_err();
        assert!(err.to_string().starts_with("models[1].endpoint: "), "{err}");
        let err = start()
            .apply_set(cat, vec![model("a", ""), model("a", "")], vec![], false)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "models[1].name: \"a\" is listed twice (also models[0])"
        );
    }
}
