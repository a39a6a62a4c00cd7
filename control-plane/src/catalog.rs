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
    /// Every family GitLab accepts for it, in some version.
    pub compatible_families: Vec<String>,
    /// Family -> the GitLab version from which GitLab accepts it for this
    /// feature, where that is later than the feature itself.
    #[serde(default)]
    pub compatible_since: BTreeMap<String, String>,
    /// GitLab version -> the title from that version on (`title` before).
    #[serde(default)]
    pub titles: BTreeMap<String, String>,
    /// Where GitLab sets a feature that its feature settings API lacks.
    #[serde(default)]
    pub not_settable: Option<String>,
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
        let mut compatible_since: Vec<_> = self
            .compatible_since
            .iter()
            .map(|(family, v)| pb::FamilySince {
                family: family.clone(),
                since_gitlab_version: parse_version(v).to_string(),
            })
            .collect();
        compatible_since.sort_by_key(|f| parse_version(&f.since_gitlab_version));
        pb::Feature {
            key: self.key.clone(),
            title: self.newest_title().to_string(),
            release_state: self.release_state().to_proto() as i32,
            compatible_families: self.compatible_families.clone(),
            since_gitlab_version: since.clone(),
            release_states: states,
            compatible_since,
            titles: self
                .ordered_titles()
                .into_iter()
                .map(|(v, title)| pb::TitleSince {
                    title: title.to_string(),
                    since_gitlab_version: v.to_string(),
                })
                .collect(),
            not_settable: self.not_settable.clone().unwrap_or_default(),
        }
    }

    /// Titles by version, oldest first, starting with `title` at `since`.
    fn ordered_titles(&self) -> Vec<(GitLabVersion, &str)> {
        let mut titles: Vec<_> = std::iter::once((parse_version(&self.since), self.title.as_str()))
            .chain(
                self.titles
                    .iter()
                    .map(|(v, t)| (parse_version(v), t.as_str())),
            )
            .collect();
        titles.sort_by_key(|(v, _)| *v);
        titles
    }

    /// The title in the newest GitLab version.
    pub fn newest_title(&self) -> &str {
        self.ordered_titles().last().map_or(&self.title, |(_, t)| t)
    }

    /// Whether some GitLab version accepts `family` for this feature.
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
            self.newest_title()
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
        for feature in &catalog.features {
            for (family, since) in &feature.compatible_since {
                assert!(
                    feature.accepts(family),
                    "{}: {family} is accepted later but not listed",
                    feature.key
                );
                assert!(
                    GitLabVersion::parse(since).is_some(),
                    "{}: {since}",
                    feature.key
                );
            }
            for since in feature.titles.keys() {
                assert!(
                    GitLabVersion::parse(since).is_some(),
                    "{}: {since}",
                    feature.key
                );
            }
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
        assert_eq!(families.len(), 13);
        assert_eq!(catalog.family("general").unwrap().since, "18.3");
        assert_eq!(catalog.family("gemini").unwrap().since, "19.0");
        assert_eq!(catalog.family("embedding").unwrap().since, "19.1");
        assert_eq!(catalog.family("qwen").unwrap().since, "19.2");
        assert_eq!(catalog.features.len(), 27);
        // At 17.4 GitLab's AiFeatures enum had only the first seven.
        let at_17_4: Vec<&str> = catalog
            .features
            .iter()
            .filter(|f| f.since == "17.4")
            .map(|f| f.key.as_str())
            .collect();
        assert_eq!(at_17_4.len(), 7, "{at_17_4:?}");
        assert_eq!(
            catalog.feature("duo_chat_troubleshoot_job").unwrap().since,
            "17.10"
        );
        assert_eq!(
            catalog.feature("generate_commit_message").unwrap().since,
            "18.1"
        );
        assert_eq!(
            catalog.feature("review_merge_request").unwrap().since,
            "18.3"
        );
        let dap = catalog.feature("duo_agent_platform").unwrap().to_proto();
        assert_eq!(dap.title, "Agents & flows");
        assert_eq!(
            dap.titles
                .iter()
                .map(|t| (t.since_gitlab_version.as_str(), t.title.as_str()))
                .collect::<Vec<_>>(),
            [
                ("18.4", "All agents, except Agentic Chat"),
                ("19.0", "Agents & flows")
            ]
        );
        assert!(
            dap.compatible_since
                .iter()
                .any(|f| f.family == "mistral" && f.since_gitlab_version == "19.0")
        );
        let embeddings = catalog.feature("embeddings_code").unwrap();
        assert!(
            embeddings
                .not_settable
                .as_deref()
                .unwrap()
                .contains("Semantic Search")
        );
        assert!(catalog.feature("duo_chat").unwrap().not_settable.is_none());
        let review = catalog.feature("review_merge_request").unwrap().to_proto();
        assert_eq!(review.release_state, pb::ReleaseState::Ga as i32);
        assert_eq!(
            review
                .release_states
                .iter()
                .map(|s| s.since_gitlab_version.as_str())
                .collect::<Vec<_>>(),
            ["18.3", "18.4"]
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
