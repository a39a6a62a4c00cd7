//! The catalog of model families and Duo features, embedded from
//! `catalog.yaml` (the one file to edit when GitLab adds a feature).

use duofleet_proto::v1 as pb;
use serde::Deserialize;
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
    pub release_state: ReleaseState,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feature {
    pub key: String,
    pub title: String,
    pub release_state: ReleaseState,
    pub compatible_families: Vec<String>,
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
            families: self
                .families
                .iter()
                .map(|f| pb::Family {
                    key: f.key.clone(),
                    gitlab_enum: f.gitlab_enum.clone(),
                    release_state: f.release_state.to_proto() as i32,
                })
                .collect(),
            features: self
                .features
                .iter()
                .map(|f| pb::Feature {
                    key: f.key.clone(),
                    title: f.title.clone(),
                    release_state: f.release_state.to_proto() as i32,
                    compatible_families: f.compatible_families.clone(),
                })
                .collect(),
        }
    }
}

impl Feature {
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
    }

    #[test]
    fn catalog_matches_gitlab_metadata() {
        let catalog = get();
        assert_eq!(catalog.families.len(), 12);
        assert_eq!(catalog.features.len(), 16);
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
            catalog.feature("summarize_review").unwrap().release_state,
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
