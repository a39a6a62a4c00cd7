//! The configuration as a value: models and profiles, and the operations
//! that change them. Each operation checks its input and the references
//! between models and profiles, edits the value, and says what it did in
//! one line. It knows nothing of sled (see `store`) or gRPC (see `grpc`):
//! the store runs an operation on a copy, diffs, and commits the diff as
//! one revision.

use crate::catalog::Catalog;
use crate::effective::MAX_CHAIN;
use crate::error::{ConfigError, quoted};
use crate::validate::{self, DEFAULT_PROFILE};
use duofleet_proto::v1::{FeatureSetting, Model, Profile, Provider};
use std::collections::BTreeMap;

type Result<T = ()> = std::result::Result<T, ConfigError>;

/// The whole configuration at one revision. API keys are inside: this value
/// never leaves the process except on an agent's own stream.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub revision: u64,
    pub models: BTreeMap<String, Model>,
    pub profiles: BTreeMap<String, Profile>,
}

/// The profile every store starts with: matches everything, sets nothing.
pub fn default_profile() -> Profile {
    Profile {
        name: DEFAULT_PROFILE.to_string(),
        ..Default::default()
    }
}

const MODEL_FIELDS: &[&str] = &["family", "endpoint", "api_key", "identifier", "provider"];
const PROFILE_FIELDS: &[&str] = &[
    "parent",
    "reconfigure_window",
    "ai_gateway_url",
    "ai_gateway_internal_url",
    "selector",
    "priority",
    "features",
    "ai_gateway_timeout_seconds",
    "duo_agent_platform_service_url",
];
const OUTPUT_FIELDS: &[&str] = &["revision", "create_time", "update_time", "has_api_key"];

impl Config {
    pub fn model(&self, name: &str) -> Result<&Model> {
        self.models.get(name).ok_or_else(|| ConfigError::NotFound {
            kind: "model",
            name: name.to_string(),
        })
    }

    pub fn profile(&self, name: &str) -> Result<&Profile> {
        self.profiles
            .get(name)
            .ok_or_else(|| ConfigError::NotFound {
                kind: "profile",
                name: name.to_string(),
            })
    }

    pub fn create_model(&mut self, catalog: &Catalog, mut model: Model) -> Result<String> {
        clear_output_fields_model(&mut model);
        validate::model(&model, catalog)?;
        if self.models.contains_key(&model.name) {
            return Err(ConfigError::AlreadyExists {
                kind: "model",
                name: model.name,
            });
        }
        let summary = format!("create model {}", model.name);
        model.has_api_key = !model.api_key.is_empty();
        self.models.insert(model.name.clone(), model);
        Ok(summary)
    }

    /// Applies `patch` to the model of the same name, for the fields in
    /// `mask` (see [`mask_fields`]).
    pub fn update_model(
        &mut self,
        catalog: &Catalog,
        patch: Model,
        mask: &[String],
    ) -> Result<String> {
        validate::model_name("model.name", &patch.name)?;
        let fields = mask_fields("Model", mask, MODEL_FIELDS, |field| match field {
            "family" => !patch.family.is_empty(),
            "endpoint" => !patch.endpoint.is_empty(),
            "api_key" => !patch.api_key.is_empty(),
            "identifier" => !patch.identifier.is_empty(),
            "provider" => !patch.provider.is_empty(),
            _ => false,
        })?;
        let mut model = self.model(&patch.name)?.clone();
        for field in &fields {
            match *field {
                "family" => model.family = patch.family.clone(),
                "endpoint" => model.endpoint = patch.endpoint.clone(),
                "api_key" => model.api_key = patch.api_key.clone(),
                "identifier" => model.identifier = patch.identifier.clone(),
                "provider" => model.provider = patch.provider.clone(),
                _ => unreachable!("mask_fields returns only listed fields"),
            }
        }
        model.has_api_key = !model.api_key.is_empty();
        validate::model(&model, catalog)?;
        for (profile, index, setting) in self.settings_using(&model.name) {
            let feature = catalog
                .feature(&setting.feature)
                .expect("stored features are known");
            if !feature.accepts(&model.family) {
                return Err(ConfigError::Blocked(format!(
                    "model.family: {}; profile {} points {} (features[{index}]) at model {}",
                    feature.incompatibility(&model.family),
                    quoted(profile),
                    setting.feature,
                    quoted(&model.name)
                )));
            }
        }
        let summary = format!("update model {} ({})", model.name, fields.join(", "));
        self.models.insert(model.name.clone(), model);
        Ok(summary)
    }

    pub fn delete_model(&mut self, name: &str) -> Result<String> {
        self.model(name)?;
        if let Some((profile, _, setting)) = self.settings_using(name).next() {
            return Err(ConfigError::Blocked(format!(
                "model {} is used by profile {} for feature {}; point that feature at another model first",
                quoted(name),
                quoted(profile),
                setting.feature
            )));
        }
        self.models.remove(name);
        Ok(format!("delete model {name}"))
    }

    pub fn create_profile(&mut self, catalog: &Catalog, mut profile: Profile) -> Result<String> {
        clear_output_fields_profile(&mut profile);
        validate::profile(&profile, catalog)?;
        if self.profiles.contains_key(&profile.name) {
            return Err(ConfigError::AlreadyExists {
                kind: "profile",
                name: profile.name,
            });
        }
        self.check_references(catalog, &profile)?;
        sort_features(&mut profile);
        let summary = format!("create profile {}", profile.name);
        self.profiles.insert(profile.name.clone(), profile);
        self.check_chains()?;
        Ok(summary)
    }

    pub fn update_profile(
        &mut self,
        catalog: &Catalog,
        patch: Profile,
        mask: &[String],
    ) -> Result<String> {
        validate::profile_name("profile.name", &patch.name)?;
        let fields = mask_fields("Profile", mask, PROFILE_FIELDS, |field| match field {
            "parent" => !patch.parent.is_empty(),
            "reconfigure_window" => patch.reconfigure_window.is_some(),
            "ai_gateway_url" => !patch.ai_gateway_url.is_empty(),
            "ai_gateway_internal_url" => !patch.ai_gateway_internal_url.is_empty(),
            "selector" => !patch.selector.is_empty(),
            "priority" => patch.priority != 0,
            "features" => !patch.features.is_empty(),
            "ai_gateway_timeout_seconds" => patch.ai_gateway_timeout_seconds != 0,
            "duo_agent_platform_service_url" => !patch.duo_agent_platform_service_url.is_empty(),
            _ => false,
        })?;
        let mut profile = self.profile(&patch.name)?.clone();
        for field in &fields {
            match *field {
                "parent" => profile.parent = patch.parent.clone(),
                "reconfigure_window" => {
                    profile.reconfigure_window = patch.reconfigure_window.clone()
                }
                "ai_gateway_url" => profile.ai_gateway_url = patch.ai_gateway_url.clone(),
                "ai_gateway_internal_url" => {
                    profile.ai_gateway_internal_url = patch.ai_gateway_internal_url.clone()
                }
                "selector" => profile.selector = patch.selector.clone(),
                "priority" => profile.priority = patch.priority,
                "features" => profile.features = patch.features.clone(),
                "ai_gateway_timeout_seconds" => {
                    profile.ai_gateway_timeout_seconds = patch.ai_gateway_timeout_seconds
                }
                "duo_agent_platform_service_url" => {
                    profile.duo_agent_platform_service_url =
                        patch.duo_agent_platform_service_url.clone()
                }
                _ => unreachable!("mask_fields returns only listed fields"),
            }
        }
        validate::profile(&profile, catalog)?;
        self.check_references(catalog, &profile)?;
        sort_features(&mut profile);
        let summary = format!("update profile {} ({})", profile.name, fields.join(", "));
        self.profiles.insert(profile.name.clone(), profile);
        self.check_chains()?;
        Ok(summary)
    }

    pub fn delete_profile(&mut self, name: &str) -> Result<String> {
        if name == DEFAULT_PROFILE {
            return Err(ConfigError::Blocked(
                "the default profile cannot be deleted: it is the fallback for every instance"
                    .to_string(),
            ));
        }
        self.profile(name)?;
        if let Some(child) = self.profiles.values().find(|p| p.parent == name) {
            return Err(ConfigError::Blocked(format!(
                "profile {} is the parent of profile {}; give that one another parent (or none) first",
                quoted(name),
                quoted(&child.name)
            )));
        }
        self.profiles.remove(name);
        Ok(format!("delete profile {name}"))
    }

    /// Sets one feature's setting on a profile; PROVIDER_UNSPECIFIED removes
    /// it, so GitLab's own default applies again.
    pub fn set_feature_setting(
        &mut self,
        catalog: &Catalog,
        profile_name: &str,
        setting: FeatureSetting,
    ) -> Result<String> {
        let profile_name = if profile_name.is_empty() {
            DEFAULT_PROFILE
        } else {
            profile_name
        };
        validate::profile_name("profile", profile_name)?;
        validate::feature_setting("setting", &setting, catalog)?;
        let mut profile = self.profile(profile_name)?.clone();
        profile.features.retain(|s| s.feature != setting.feature);
        let summary = match setting.provider() {
            Provider::Unspecified => format!("unset {} on profile {profile_name}", setting.feature),
            Provider::SelfHosted => {
                self.check_setting(catalog, "setting", &setting)?;
                format!(
                    "set {} on profile {profile_name} to self-hosted model {}",
                    setting.feature, setting.model
                )
            }
            other => format!(
                "set {} on profile {profile_name} to {}",
                setting.feature,
                other.as_str_name()
            ),
        };
        if setting.provider() != Provider::Unspecified {
            profile.features.push(setting);
        }
        sort_features(&mut profile);
        self.profiles.insert(profile.name.clone(), profile);
        Ok(summary)
    }

    /// Every profile's parent exists, and no chain of parents loops or is
    /// longer than [`MAX_CHAIN`] profiles.
    pub(crate) fn check_chains(&self) -> Result {
        for profile in self.profiles.values() {
            let mut chain = vec![profile.name.as_str()];
            let mut current = profile;
            while !current.parent.is_empty() {
                let Some(parent) = self.profiles.get(&current.parent) else {
                    return Err(ConfigError::Blocked(format!(
                        "profile.parent: profile {} names parent {}, which does not exist; create it first",
                        quoted(&current.name),
                        quoted(&current.parent)
                    )));
                };
                if chain.contains(&parent.name.as_str()) {
                    chain.push(&parent.name);
                    return Err(ConfigError::Blocked(format!(
                        "profile.parent: the parents form a cycle ({})",
                        chain.join(" -> ")
                    )));
                }
                chain.push(&parent.name);
                if chain.len() > MAX_CHAIN {
                    return Err(ConfigError::Blocked(format!(
                        "profile.parent: the chain {} is longer than {MAX_CHAIN} profiles",
                        chain.join(" -> ")
                    )));
                }
                current = parent;
            }
        }
        Ok(())
    }

    fn check_references(&self, catalog: &Catalog, profile: &Profile) -> Result {
        for (index, setting) in profile.features.iter().enumerate() {
            if setting.provider() == Provider::SelfHosted {
                self.check_setting(catalog, &format!("profile.features[{index}]"), setting)?;
            }
        }
        Ok(())
    }

    /// A self-hosted setting needs an existing model of a compatible family.
    pub(crate) fn check_setting(
        &self,
        catalog: &Catalog,
        field: &str,
        setting: &FeatureSetting,
    ) -> Result {
        let model = self.models.get(&setting.model).ok_or_else(|| {
            ConfigError::Blocked(format!(
                "{field}.model: model {} does not exist; create it first",
                quoted(&setting.model)
            ))
        })?;
        let feature = catalog
            .feature(&setting.feature)
            .expect("feature validated before references");
        if !feature.accepts(&model.family) {
            return Err(ConfigError::Blocked(format!(
                "{field}.model: {} (model {}; compatible families: {})",
                feature.incompatibility(&model.family),
                quoted(&model.name),
                feature.compatible_families.join(", ")
            )));
        }
        Ok(())
    }

    /// Every (profile, index, setting) that points a feature at `model`.
    fn settings_using<'a>(
        &'a self,
        model: &'a str,
    ) -> impl Iterator<Item = (&'a str, usize, &'a FeatureSetting)> + 'a {
        self.profiles.values().flat_map(move |profile| {
            profile
                .features
                .iter()
                .enumerate()
                .filter(move |(_, s)| s.provider() == Provider::SelfHosted && s.model == model)
                .map(move |(index, s)| (profile.name.as_str(), index, s))
        })
    }
}

/// Resolves an update mask (AIP-134): empty means every populated field,
/// `*` means every updatable field (a full replace), otherwise the named
/// fields, each of which must be updatable. Paths may be snake_case or, as
/// grpcurl 1.8 passes them through from JSON, camelCase.
fn mask_fields(
    kind: &str,
    mask: &[String],
    updatable: &'static [&'static str],
    populated: impl Fn(&str) -> bool,
) -> Result<Vec<&'static str>> {
    if mask.is_empty() {
        return Ok(updatable.iter().copied().filter(|f| populated(f)).collect());
    }
    if mask.len() == 1 && mask[0] == "*" {
        return Ok(updatable.to_vec());
    }
    let mut fields = Vec::new();
    for path in mask {
        let field_name = snake_case(path);
        let rule = if field_name == "name" {
            "name cannot be changed: it selects the resource".to_string()
        } else if OUTPUT_FIELDS.contains(&field_name.as_str()) {
            format!("{} is output only", quoted(path))
        } else if let Some(field) = updatable.iter().find(|f| **f == field_name) {
            if !fields.contains(field) {
                fields.push(*field);
            }
            continue;
        } else {
            format!(
                "unknown field {} for {kind}; updatable fields: {}",
                quoted(path),
                updatable.join(", ")
            )
        };
        return Err(ConfigError::invalid("update_mask", rule));
    }
    Ok(fields)
}

fn snake_case(path: &str) -> String {
    let mut snake = String::with_capacity(path.len() + 4);
    for c in path.chars() {
        if c.is_ascii_uppercase() {
            snake.push('_');
            snake.push(c.to_ascii_lowercase());
        } else {
            snake.push(c);
        }
    }
    snake
}

pub(crate) fn sort_features(profile: &mut Profile) {
    profile.features.sort_by(|a, b| a.feature.cmp(&b.feature));
}

pub(crate) fn clear_output_fields_model(model: &mut Model) {
    model.has_api_key = false;
    model.revision = 0;
    model.create_time = None;
    model.update_time = None;
}

pub(crate) fn clear_output_fields_profile(profile: &mut Profile) {
    profile.revision = 0;
    profile.create_time = None;
    profile.update_time = None;
}

/// Equality of content, ignoring the stamps the store sets (revision and
/// times), so that a no-op change makes no revision.
pub fn same_model(a: &Model, b: &Model) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    clear_output_fields_model(&mut a);
    clear_output_fields_model(&mut b);
    a == b
}

pub fn same_profile(a: &Profile, b: &Profile) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    clear_output_fields_profile(&mut a);
    clear_output_fields_profile(&mut b);
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;

    fn mk_model(name: &str, family: &str) -> Model {
        Model {
            name: name.into(),
            family: family.into(),
            endpoint: "https://vllm:8000/v1".into(),
            ..Default::default()
        }
    }

    fn self_hosted(feature: &str, model: &str) -> FeatureSetting {
        FeatureSetting {
            feature: feature.into(),
            provider: Provider::SelfHosted as i32,
            model: model.into(),
        }
    }

    fn mk_config() -> Config {
        let mut config = Config::default();
        config
            .profiles
            .insert(DEFAULT_PROFILE.into(), default_profile());
        config
    }

    #[test]
    fn incompatible_family_is_refused_with_gitlab_wording() {
        let catalog = catalog::get();
        let mut config = mk_config();
        config
            .create_model(catalog, mk_model("cg", "codegemma"))
            .unwrap();
        let err = config
            .set_feature_setting(catalog, "", self_hosted("duo_chat", "cg"))
            .unwrap_err();
        assert!(matches!(err, ConfigError::Blocked(_)));
        assert!(
            err.to_string()
                .contains("Codegemma is incompatible with the General Chat feature"),
            "{err}"
        );
    }

    #[test]
    fn model_in_use_cannot_be_deleted_or_made_incompatible() {
        let catalog = catalog::get();
        let mut config = mk_config();
        config
            .create_model(catalog, mk_model("mx", "mixtral"))
            .unwrap();
        config
            .set_feature_setting(catalog, "default", self_hosted("duo_chat", "mx"))
            .unwrap();
        let err = config.delete_model("mx").unwrap_err().to_string();
        assert_eq!(
            err,
            "model \"mx\" is used by profile \"default\" for feature duo_chat; point that feature at another model first"
        );
        let patch = mk_model("mx", "codegemma");
        let err = config
            .update_model(catalog, patch, &["family".into()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Codegemma is incompatible with the General Chat feature"),
            "{err}"
        );
        assert_eq!(config.models["mx"].family, "mixtral");
    }

    #[test]
    fn update_mask_rules() {
        let catalog = catalog::get();
        let mut config = mk_config();
        let mut m = mk_model("mx", "mixtral");
        m.api_key = "k1".into();
        config.create_model(catalog, m).unwrap();
        let patch = Model {
            name: "mx".into(),
            endpoint: "https://other:8000/v1".into(),
            ..Default::default()
        };
        // Empty mask: populated fields only; the key stays.
        config.update_model(catalog, patch.clone(), &[]).unwrap();
        assert_eq!(config.models["mx"].endpoint, "https://other:8000/v1");
        assert_eq!(config.models["mx"].api_key, "k1");
        let err = config
            .update_model(catalog, patch.clone(), &["bogus".into()])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "update_mask: unknown field \"bogus\" for Model; updatable fields: family, endpoint, api_key, identifier, provider"
        );
        // camelCase paths, as grpcurl sends them, work too.
        let rotate = Model {
            name: "mx".into(),
            api_key: "k2".into(),
            ..Default::default()
        };
        config
            .update_model(catalog, rotate, &["apiKey".into()])
            .unwrap();
        assert_eq!(config.models["mx"].api_key, "k2");
        // "*": a full replace, so the missing family is refused.
        let err = config
            .update_model(catalog, patch, &["*".into()])
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("model.family: unknown family \"\""),
            "{err}"
        );
    }

    #[test]
    fn unset_removes_a_feature_setting() {
        let catalog = catalog::get();
        let mut config = mk_config();
        let vendor = FeatureSetting {
            feature: "duo_chat".into(),
            provider: Provider::Vendor as i32,
            model: String::new(),
        };
        config.set_feature_setting(catalog, "", vendor).unwrap();
        assert_eq!(config.profiles["default"].features.len(), 1);
        let unset = FeatureSetting {
            feature: "duo_chat".into(),
            ..Default::default()
        };
        config.set_feature_setting(catalog, "", unset).unwrap();
        assert!(config.profiles["default"].features.is_empty());
    }

    #[test]
    fn default_profile_cannot_be_deleted() {
        let mut config = mk_config();
        assert!(matches!(
            config.delete_profile("default"),
            Err(ConfigError::Blocked(_))
        ));
    }
}
