//! The catalog of model families and Duo features, embedded from
//! `catalog.yaml` (the one file to edit when GitLab adds a feature), with
//! the GitLab version that brought each one and its release state by
//! version.

use duofleet_proto::GitLabVersion;
use duofleet_proto::v1 as pb;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::LazyLock;

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReleaseState {
    Ga,
    Beta,
    Experiment,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub key: String,
    pub gitlab_enum: String,
    /// The GitLab version that brought it, e.g. "18.3".
    pub since: String,
    /// GitLab version -> the release state from that version on.
    pub release_states: BTreeMap<String, ReleaseState>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub key: String,
    pub title: String,
    pub since: String,
    pub release_states: BTreeMap<String, ReleaseState>,
    pub compatible_families: Vec<String>,
}

/// The versioned part that families and features share.
trait Versioned {
    fn since(&self) -> &str;
    fn states(&self) -> &BTreeMap<String, ReleaseState>;

    /// Release states ordered by version, oldest first.
    fn ordered_states(&self) -> Vec<(GitLabVersion, ReleaseState)> {
        let mut states: Vec<_> = self
            .states()
            .iter()
            .map(|(v, s)| (parse_version(v), *s))
            .collect();
        states.sort_by_key(|(v, _)| *v);
        states
    }

    /// The state in the newest GitLab version.
    fn release_state(&self) -> ReleaseState {
        self.ordered_states()
            .last()
            .map_or(ReleaseState::Beta, |(_, s)| *s)
    }

    fn versions_proto(&self) -> (String, Vec<pb::ReleaseStateSince>) {
        let states = self
            .ordered_states()
            .into_iter()
            .map(|(v, s)| pb::ReleaseStateSince {
                since_gitlab_version: v.to_string(),
                release_state: s.to_proto() as i32,
            })
            .collect();
        (parse_version(self.since()).to_string(), states)
    }
}

impl Versioned for Family {
    fn since(&self) -> &str {
        &self.since
    }
    fn states(&self) -> &BTreeMap<String, ReleaseState> {
        &self.release_states
    }
}

impl Versioned for Feature {
    fn since(&self) -> &str {
        &self.since
    }
    fn states(&self) -> &BTreeMap<String, ReleaseState> {
        &self.release_states
    }
}

/// Catalog versions are checked by the unit tests below.
fn parse_version(text: &str) -> GitLabVersion {
    GitLabVersion::parse(text).unwrap_or(GitLabVersion::new(0, 0))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    pub families: Vec<Family>,
    pub features: Vec<Feature>,
}

static CATALOG: LazyLock<Catalog> = LazyLock::new(|| {
    serde_norway::from_str(include_str!("catalog.yaml"))
        .expect("the embedded catalog.yaml is checked by unit tests")
});

/// The catalog compiled into this binary.
pub fn get() -> &'static Catalog {
    &CATALOG
}

impl Catalog {
    pub fn family(&self, key: &str) -> Option<&Family> {
        self.families.iter().find(|f| f.key == key)
    }

    pub fn feature(&self, key: &str) -> Option<&Feature> {
        self.features.iter().find(|f| f.key == key)
    }

    pub fn family_keys(&self) -> String {
        join_keys(self.families.iter().map(|f| f.key.as_str()))
    }

    pub fn feature_keys(&self) -> String {
        join_keys(self.features.iter().map(|f| f.key.as_str()))
    }

    pub fn to_proto(&self) -> pb::Catalog {
        pb::Catalog {
            families: self.families.iter().map(Family::to_proto).collect(),
            features: self.features.iter().map(Feature::to_proto).collect(),
        }
    }
}

impl Family {
    pub fn to_proto(&self) -> pb::Family {
        let (since, states) = self.versions_proto();
        pb::Family {
            key: self.key.clone(),
            gitlab_enum: self.gitlab_enum.clone(),
            release_state: self.release_state().to_proto() as i32,
            since_gitlab_version: since,
            release_states: states,
        }
    }
}

impl Feature {
    pub fn to_proto(&self) -> pb::Feature {
        let (since, states) = self.versions_proto();
        pb::Feature {
            key: self.key.clone(),
            title: self.title.clone(),
            release_state: self.release_state().to_proto() as i32,
            compatible_families: self.compatible_families.clone(),
            since_gitlab_version: since,
            release_states: states,
        }
    }

    pub fn accepts(&self, family: &str) -> bool {
        self.compatible_families.iter().any(|f| f == family)
    }

    /// GitLab's own refusal, e.g. "Codegemma is incompatible with the
    /// General Chat feature".
    pub fn incompatibility(&self, family: &str) -> String {
        let mut chars = family.chars();
        let capitalized: String = match chars.next() {
            Some(first) => first.to_uppercase().chain(chars).collect(),
            None => String::new(),
        };
        format!(
            "{capitalized} is incompatible with the {} feature",
            self.title
        )
    }
}

impl ReleaseState {
    fn to_proto(self) -> pb::ReleaseState {
        match self {
            ReleaseState::Ga => pb::ReleaseState::Ga,
            ReleaseState::Beta => pb::ReleaseState::Beta,
            ReleaseState::Experiment => pb::ReleaseState::Experiment,
        }
    }
}

fn join_keys<'a>(keys: impl Iterator<Item = &'a str>) -> String {
    keys.collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn embedded_catalog_is_consistent() {
        let catalog = get();
        let families: HashSet<_> = catalog.families.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(families.len(), catalog.families.len(), "duplicate family");
        let features: HashSet<_> = catalog.features.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(features.len(), catalog.features.len(), "duplicate feature");
        for feature in &catalog.features {
            assert!(!feature.compatible_families.is_empty(), "{}", feature.key);
            for family in &feature.compatible_families {
                assert!(
                    families.contains(family.as_str()),
                    "{} names unknown family {family}",
                    feature.key
                );
            }
        }
        for family in &catalog.families {
            assert_eq!(family.gitlab_enum, family.key.to_uppercase());
        }
        let versions = catalog
            .families
            .iter()
            .flat_map(|f| std::iter::once(&f.since).chain(f.release_states.keys()))
            .chain(
                catalog
                    .features
                    .iter()
                    .flat_map(|f| std::iter::once(&f.since).chain(f.release_states.keys())),
            );
        for version in versions {
            assert!(
                GitLabVersion::parse(version).is_some(),
                "bad version {version:?}"
            );
        }
        for (key, since, states) in catalog
            .families
            .iter()
            .map(|f| (&f.key, &f.since, &f.release_states))
            .chain(
                catalog
                    .features
                    .iter()
                    .map(|f| (&f.key, &f.since, &f.release_states)),
            )
        {
            assert!(
                states.contains_key(since),
                "{key}: its first release state must be at its since version"
            );
        }
    }

    #[test]
    fn catalog_matches_gitlab_metadata() {
        let catalog = get();
        // GitLab's AiAcceptedSelfHostedModels: no QWEN, no GEMINI before 19.x.
        let families: Vec<&str> = catalog.families.iter().map(|f| f.key.as_str()).collect();
        assert_eq!(families.len(), 10);
        assert!(!families.contains(&"qwen") && !families.contains(&"gemini"));
        assert_eq!(catalog.family("general").unwrap().since, "18.3");
        assert_eq!(catalog.features.len(), 18);
        let review = catalog.feature("review_merge_request").unwrap().to_proto();
        assert_eq!(review.release_state, pb::ReleaseState::Ga as i32);
        assert_eq!(
            review
                .release_states
                .iter()
                .map(|s| s.since_gitlab_version.as_str())
                .collect::<Vec<_>>(),
            ["17.4", "18.4"]
        );
        let agentic = catalog
            .feature("duo_agent_platform_agentic_chat")
            .unwrap()
            .to_proto();
        assert_eq!(agentic.since_gitlab_version, "18.7");
        assert!(
            catalog
                .feature("duo_agent_platform")
                .unwrap()
                .accepts("general")
        );
        let chat = catalog.feature("duo_chat").unwrap();
        assert_eq!(chat.title, "General Chat");
        assert!(!chat.accepts("codegemma"));
        assert!(
            catalog
                .feature("code_completions")
                .unwrap()
                .accepts("codegemma")
        );
        assert_eq!(
            catalog.feature("summarize_review").unwrap().release_state(),
            ReleaseState::Experiment
        );
        assert!(
            !catalog
                .feature("review_merge_request")
                .unwrap()
                .accepts("codestral")
        );
    }

    #[test]
    fn incompatibility_uses_gitlab_wording() {
        let chat = get().feature("duo_chat").unwrap();
        assert_eq!(
            chat.incompatibility("codegemma"),
            "Codegemma is incompatible with the General Chat feature"
        );
    }
}
