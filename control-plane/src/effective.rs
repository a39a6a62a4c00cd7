//! What one instance gets: the profile it matches and the desired
//! configuration that follows from it.
//!
//! Matching: the profile with the highest `priority` whose selector labels
//! are all among the instance's labels; on equal priority the one with more
//! selector labels, then the name that sorts first; otherwise `default`.

use crate::catalog;
use crate::config::Config;
use crate::validate::DEFAULT_PROFILE;
use duofleet_proto::v1::{self as pb, DesiredConfig, DesiredModel, Profile, Provider};
use std::collections::{BTreeMap, BTreeSet};

pub type Labels = BTreeMap<String, String>;

/// The profile an instance with `labels` gets.
pub fn match_profile<'a>(config: &'a Config, labels: &Labels) -> Option<&'a Profile> {
    config
        .profiles
        .values()
        .filter(|p| p.name != DEFAULT_PROFILE)
        .filter(|p| p.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .max_by(|a, b| {
            a.priority
                .cmp(&b.priority)
                .then(a.selector.len().cmp(&b.selector.len()))
                // max_by keeps the last maximum: reverse so the first name wins.
                .then(b.name.cmp(&a.name))
        })
        .or_else(|| config.profiles.get(DEFAULT_PROFILE))
}

/// The most profiles an inheritance chain may hold: a profile, its
/// parent, and two more ancestors.
pub const MAX_CHAIN: usize = 4;

/// A profile with what it inherits filled in.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolved {
    pub name: String,
    pub ai_gateway_url: String,
    pub ai_gateway_internal_url: String,
    pub features: Vec<pb::FeatureSetting>,
    pub ai_gateway_timeout_seconds: u32,
    pub duo_agent_platform_service_url: String,
    pub reconfigure_window: Option<pb::ReconfigureWindow>,
    /// Field -> the profile it comes from.
    pub sources: BTreeMap<String, String>,
}

/// The profile and its ancestors, nearest first. Stops at a missing
/// parent, a repeat or [`MAX_CHAIN`] (validation keeps stored chains
/// within these).
pub fn chain<'a>(config: &'a Config, profile: &'a Profile) -> Vec<&'a Profile> {
    let mut chain = vec![profile];
    while chain.len() < MAX_CHAIN {
        let last = chain[chain.len() - 1];
        match config.profiles.get(&last.parent) {
            Some(parent)
                if !last.parent.is_empty() && !chain.iter().any(|p| p.name == parent.name) =>
            {
                chain.push(parent)
            }
            _ => break,
        }
    }
    chain
}

/// `profile` with every value it does not set taken from its nearest
/// ancestor that does; feature settings merge per feature.
pub fn resolve(config: &Config, profile: &Profile) -> Resolved {
    let chain = chain(config, profile);
    let mut resolved = Resolved {
        name: profile.name.clone(),
        ..Default::default()
    };
    let mut sources = BTreeMap::new();
    fn first<'a, T: Clone>(
        chain: &[&'a Profile],
        sources: &mut BTreeMap<String, String>,
        field: &str,
        get: impl Fn(&'a Profile) -> Option<T>,
    ) -> Option<T> {
        chain.iter().find_map(|p| {
            let value = get(p)?;
            sources.insert(field.to_string(), p.name.clone());
            Some(value)
        })
    }
    let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
    resolved.ai_gateway_url = first(&chain, &mut sources, "ai_gateway_url", |p| {
        non_empty(&p.ai_gateway_url)
    })
    .unwrap_or_default();
    resolved.ai_gateway_internal_url =
        first(&chain, &mut sources, "ai_gateway_internal_url", |p| {
            non_empty(&p.ai_gateway_internal_url)
        })
        .unwrap_or_default();
    resolved.ai_gateway_timeout_seconds =
        first(&chain, &mut sources, "ai_gateway_timeout_seconds", |p| {
            (p.ai_gateway_timeout_seconds > 0).then_some(p.ai_gateway_timeout_seconds)
        })
        .unwrap_or_default();
    resolved.duo_agent_platform_service_url = first(
        &chain,
        &mut sources,
        "duo_agent_platform_service_url",
        |p| non_empty(&p.duo_agent_platform_service_url),
    )
    .unwrap_or_default();
    resolved.reconfigure_window = first(&chain, &mut sources, "reconfigure_window", |p| {
        p.reconfigure_window.clone()
    });
    let mut features: BTreeMap<String, pb::FeatureSetting> = BTreeMap::new();
    for p in chain.iter().rev() {
        for setting in &p.features {
            features.insert(setting.feature.clone(), setting.clone());
            sources.insert(format!("features.{}", setting.feature), p.name.clone());
        }
    }
    resolved.features = features.into_values().collect();
    resolved.sources = sources;
    resolved
}

/// The desired configuration of an instance with `labels`, at
/// `config.revision`. Only the models its profile uses are included, with
/// their API keys: this goes only to that instance's own stream.
pub fn desired_config(config: &Config, labels: &Labels) -> DesiredConfig {
    let Some(matched) = match_profile(config, labels) else {
        return DesiredConfig {
            revision: config.revision,
            ..Default::default()
        };
    };
    let profile = resolve(config, matched);
    let used: BTreeSet<&str> = profile
        .features
        .iter()
        .filter(|s| s.provider() == Provider::SelfHosted)
        .map(|s| s.model.as_str())
        .collect();
    let models: Vec<DesiredModel> = used
        .into_iter()
        .filter_map(|name| config.models.get(name))
        .map(|m| DesiredModel {
            name: m.name.clone(),
            family: m.family.clone(),
            endpoint: m.endpoint.clone(),
            api_key: m.api_key.clone(),
            identifier: m.identifier.clone(),
            provider: m.provider.clone(),
        })
        .collect();
    // The agent needs to know which GitLab version brought each family and
    // feature, and what GitLab hides as beta.
    let catalog = catalog::get();
    let families: BTreeSet<&str> = models.iter().map(|m| m.family.as_str()).collect();
    let catalog_families = families
        .into_iter()
        .filter_map(|f| catalog.family(f))
        .map(|f| f.to_proto())
        .collect();
    // Every feature, not only those set: which beta features GitLab lists
    // tells the agent whether the testing terms were accepted.
    let catalog_features = catalog
        .features
        .iter()
        .map(|f| pb::Feature {
            // The agent needs no compatibility list: GitLab checks it.
            compatible_families: Vec::new(),
            ..f.to_proto()
        })
        .collect();
    DesiredConfig {
        revision: config.revision,
        profile: profile.name.clone(),
        ai_gateway_url: profile.ai_gateway_url.clone(),
        ai_gateway_internal_url: profile.ai_gateway_internal_url.clone(),
        models,
        features: profile.features.clone(),
        ai_gateway_timeout_seconds: profile.ai_gateway_timeout_seconds,
        duo_agent_platform_service_url: profile.duo_agent_platform_service_url.clone(),
        catalog_families,
        catalog_features,
        reconfigure_window: profile.reconfigure_window.clone(),
    }
}

/// What an instance with `labels` receives, for operators: its
/// DesiredConfig without API keys (has_api_key says whether one is sent).
pub fn public_config(config: &Config, labels: &Labels) -> duofleet_proto::v1::EffectiveConfig {
    let desired = desired_config(config, labels);
    duofleet_proto::v1::EffectiveConfig {
        revision: desired.revision,
        profile: desired.profile,
        ai_gateway_url: desired.ai_gateway_url,
        ai_gateway_internal_url: desired.ai_gateway_internal_url,
        models: desired
            .models
            .into_iter()
            .map(|m| duofleet_proto::v1::Model {
                has_api_key: !m.api_key.is_empty(),
                name: m.name,
                family: m.family,
                endpoint: m.endpoint,
                identifier: m.identifier,
                ..Default::default()
            })
            .collect(),
        features: desired.features,
        ai_gateway_timeout_seconds: desired.ai_gateway_timeout_seconds,
        duo_agent_platform_service_url: desired.duo_agent_platform_service_url,
        reconfigure_window: desired.reconfigure_window,
        sources: match_profile(config, labels)
            .map(|p| resolve(config, p).sources)
            .unwrap_or_default(),
    }
}

/// Whether two desired configurations differ in anything but the revision.
pub fn same_content(a: &DesiredConfig, b: &DesiredConfig) -> bool {
    DesiredConfig {
        revision: 0,
        ..a.clone()
    } == DesiredConfig {
        revision: 0,
        ..b.clone()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::default_profile;
    use duofleet_proto::v1::{FeatureSetting, Model};

    fn mk_profile(name: &str, priority: i32, selector: &[(&str, &str)]) -> Profile {
        Profile {
            name: name.into(),
            priority,
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ai_gateway_url: format!("https://{name}.aigw"),
            ..Default::default()
        }
    }

    fn mk_config(profiles: Vec<Profile>) -> Config {
        let mut config = Config::default();
        for p in profiles.into_iter().chain([default_profile()]) {
            config.profiles.insert(p.name.clone(), p);
        }
        config
    }

    /// Labels from pairs, for tests here and in `labels`.
    pub(crate) fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn highest_priority_matching_profile_wins() {
        let config = mk_config(vec![
            mk_profile("canary", 10, &[("ring", "canary")]),
            mk_profile("eu", 5, &[("region", "eu")]),
            mk_profile("eu-canary", 5, &[("region", "eu"), ("ring", "canary")]),
        ]);
        let name = |l: &[(&str, &str)]| match_profile(&config, &labels(l)).unwrap().name.clone();
        assert_eq!(name(&[]), "default");
        assert_eq!(name(&[("region", "us")]), "default");
        assert_eq!(name(&[("region", "eu")]), "eu");
        // Equal priority: more selector labels wins.
        assert_eq!(name(&[("region", "eu"), ("ring", "canary2")]), "eu");
        assert_eq!(name(&[("region", "eu"), ("ring", "canary")]), "canary");
    }

    #[test]
    fn equal_priority_and_size_picks_the_first_name() {
        let config = mk_config(vec![
            mk_profile("b", 1, &[("x", "1")]),
            mk_profile("a", 1, &[("y", "1")]),
        ]);
        let got = match_profile(&config, &labels(&[("x", "1"), ("y", "1")])).unwrap();
        assert_eq!(got.name, "a");
    }

    #[test]
    fn desired_config_carries_only_the_models_in_use() {
        let mut config = mk_config(vec![]);
        for name in ["used", "unused"] {
            config.models.insert(
                name.into(),
                Model {
                    name: name.into(),
                    family: "mixtral".into(),
                    api_key: format!("key-{name}"),
                    ..Default::default()
                },
            );
        }
        config
            .profiles
            .get_mut("default")
            .unwrap()
            .features
            .push(FeatureSetting {
                feature: "duo_chat".into(),
                provider: Provider::SelfHosted as i32,
                model: "used".into(),
            });
        config.revision = 7;
        let desired = desired_config(&config, &Labels::new());
        assert_eq!(desired.revision, 7);
        assert_eq!(desired.models.len(), 1);
        assert_eq!(desired.models[0].api_key, "key-used");
        let mut later = config.clone();
        later.revision = 8;
        assert!(same_content(
            &desired,
            &desired_config(&later, &Labels::new())
        ));
    }
}
