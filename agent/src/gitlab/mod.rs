//! Models, feature settings and Duo settings through GitLab's GraphQL API
//! (steps 2 and 3 of configuring GitLab Duo Self-Hosted by hand), in the
//! form each GitLab version understands.
//!
//! - **Read first, change only what differs.** A sync of an unchanged
//!   configuration sends queries only, on every supported version. GitLab
//!   answers enums in lower case, so comparisons ignore case.
//! - **The version decides the form** (`api::since`), never an error's
//!   wording. What the instance's GitLab lacks (a family, a feature, a
//!   setting) is skipped with "not supported by GitLab 17.8"; the rest
//!   applies.
//! - **One bad item fails alone.** Each model, feature and setting is its
//!   own item with its own outcome; a top-level GraphQL error on one does
//!   not stop the others. Only a refused token or an unreachable GitLab
//!   stops the sync.
//! - **What GitLab hides stays known.** Models of beta families and beta
//!   features are hidden until the testing terms are accepted. The agent
//!   keeps the ids of the models it created (state file), compares hidden
//!   ones with what it last pushed, and says why they are hidden.
//! - It touches only the models it created; since GitLab never returns an
//!   API key, it keeps a keyed digest of the last key it pushed.

pub mod api;
mod connection;
mod features;
mod models;
mod settings;

pub use api::SyncError;

use crate::state::GitLabState;
use api::Api;
use duofleet_proto::GitLabVersion;
use duofleet_proto::v1::{
    DesiredConfig, Family, Feature, GitLabSync, ReleaseState, SyncItem, SyncItemState,
};
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(Clone)]
pub struct GitLab {
    api: Api,
    /// Keys the API-key digests; lives in the state dir.
    digest_key: Vec<u8>,
}

/// What one sync did, item by item.
#[derive(Debug, Default)]
pub struct Report {
    /// As GitLab reports it, e.g. "17.11.2-ee".
    pub version: String,
    pub mutations: usize,
    pub items: Vec<SyncItem>,
    pub unmanaged: Vec<String>,
}

impl Report {
    fn add(&mut self, kind: &str, key: &str, state: SyncItemState, detail: impl Into<String>) {
        self.items.push(SyncItem {
            kind: kind.into(),
            key: key.into(),
            state: state as i32,
            detail: detail.into(),
        });
    }

    fn state_of(&self, kind: &str, key: &str) -> Option<(SyncItemState, &str)> {
        self.items
            .iter()
            .rev()
            .find(|i| i.kind == kind && i.key == key)
            .map(|i| (i.state(), i.detail.as_str()))
    }

    /// The sync status to report; `applied_revision` is the newest revision
    /// whose API items all held.
    pub fn status(&self, applied_revision: u64) -> GitLabSync {
        GitLabSync {
            enabled: true,
            detail: format!("GitLab {}", self.version),
            unmanaged_models: self.unmanaged.clone(),
            applied_revision,
            items: self.items.clone(),
        }
    }

    pub fn failed(&self) -> bool {
        self.items
            .iter()
            .any(|i| i.state() == SyncItemState::Failed)
    }

    /// The ack's error text: what was applied, what was not, and why.
    pub fn failure(&self) -> Option<String> {
        if !self.failed() {
            return None;
        }
        let of = |state: SyncItemState| -> Vec<&SyncItem> {
            self.items.iter().filter(|i| i.state() == state).collect()
        };
        let applied: Vec<&str> = of(SyncItemState::Applied)
            .iter()
            .map(|i| i.detail.as_str())
            .collect();
        let applied = if applied.is_empty() {
            "nothing".to_string()
        } else {
            applied.join(", ")
        };
        let failed: Vec<String> = of(SyncItemState::Failed)
            .iter()
            .map(|i| format!("{}: {}", i.key, i.detail))
            .collect();
        Some(format!(
            "GitLab API: applied {applied}; not applied: {}",
            failed.join("; ")
        ))
    }
}

/// What the control plane's catalog says of the families and features of
/// a desired config, read at the instance's GitLab version.
struct Catalog<'a> {
    version: GitLabVersion,
    families: &'a [Family],
    features: &'a [Feature],
}

impl<'a> Catalog<'a> {
    fn new(version: GitLabVersion, desired: &'a DesiredConfig) -> Catalog<'a> {
        Catalog {
            version,
            families: &desired.catalog_families,
            features: &desired.catalog_features,
        }
    }

    /// "not supported by GitLab 17.8 (it came in 18.3)" when this GitLab
    /// lacks the family; None when it has it (or the catalog is silent).
    fn family_unsupported(&self, key: &str) -> Option<String> {
        let family = self.families.iter().find(|f| f.key == key)?;
        self.unsupported(&family.since_gitlab_version)
    }

    fn feature_unsupported(&self, key: &str) -> Option<String> {
        let feature = self.features.iter().find(|f| f.key == key)?;
        self.unsupported(&feature.since_gitlab_version)
    }

    fn unsupported(&self, since: &str) -> Option<String> {
        let since = GitLabVersion::parse(since)?;
        (self.version < since).then(|| {
            format!(
                "not supported by GitLab {} (it came in {since})",
                self.version
            )
        })
    }

    /// Why GitLab at this version refuses a `family` model for `feature`,
    /// in GitLab's words and with the title of this version, e.g. "Mistral
    /// is incompatible with the All agents, except Agentic Chat feature
    /// (GitLab accepts it from 19.0)". None when it accepts it, or the
    /// catalog is silent.
    fn incompatible(&self, feature: &str, family: &str) -> Option<String> {
        // A family no version accepts is refused by duofleetd: the agent is
        // sent only what later versions accept.
        let feature = self.features.iter().find(|f| f.key == feature)?;
        let since = feature
            .compatible_since
            .iter()
            .find(|f| f.family == family)
            .and_then(|f| GitLabVersion::parse(&f.since_gitlab_version))?;
        (self.version < since).then(|| {
            self.refusal(
                feature,
                family,
                format!(
                    " on GitLab {} (GitLab accepts it from {since})",
                    self.version
                ),
            )
        })
    }

    fn refusal(&self, feature: &Feature, family: &str, tail: String) -> String {
        // GitLab's words, with the title of the instance's version.
        let mut chars = family.chars();
        let capitalized: String = chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default();
        format!(
            "{capitalized} is incompatible with the {} feature{tail}",
            title_at(feature, self.version)
        )
    }

    /// Where GitLab sets a feature its feature settings API lacks.
    fn not_settable(&self, key: &str) -> Option<&str> {
        self.features
            .iter()
            .find(|f| f.key == key)
            .map(|f| f.not_settable.as_str())
            .filter(|why| !why.is_empty())
    }

    fn family_beta(&self, key: &str) -> bool {
        self.families
            .iter()
            .find(|f| f.key == key)
            .is_some_and(|f| beta_at(&f.release_states, self.version))
    }

    fn feature_beta(&self, key: &str) -> bool {
        self.features
            .iter()
            .find(|f| f.key == key)
            .is_some_and(|f| beta_at(&f.release_states, self.version))
    }
}

/// The feature's title as GitLab `version` names it.
fn title_at(feature: &Feature, version: GitLabVersion) -> &str {
    feature
        .titles
        .iter()
        .filter_map(|t| Some((GitLabVersion::parse(&t.since_gitlab_version)?, &t.title)))
        .filter(|(since, _)| *since <= version)
        .max_by_key(|(since, _)| *since)
        .map_or(&feature.title, |(_, title)| title)
}

/// Whether the release state in force at `version` is beta or experiment.
fn beta_at(states: &[duofleet_proto::v1::ReleaseStateSince], version: GitLabVersion) -> bool {
    states
        .iter()
        .filter_map(|s| {
            Some((
                GitLabVersion::parse(&s.since_gitlab_version)?,
                s.release_state(),
            ))
        })
        .filter(|(since, _)| *since <= version)
        .max_by_key(|(since, _)| *since)
        .is_some_and(|(_, state)| matches!(state, ReleaseState::Beta | ReleaseState::Experiment))
}

/// GitLab answers null where the token's user lacks the permission.
pub const NOT_ADMIN: &str = "GitLab answered nothing: the user of --gitlab-token-file may not manage self-hosted models; it must be an administrator's token with the api scope";

/// Where GitLab hides beta items, the words an administrator needs.
pub const TESTING_TERMS: &str = "GitLab hides beta models and features until an administrator accepts the testing terms (Admin > GitLab Duo > Self-hosted models: \"Use beta models and features\")";

impl GitLab {
    pub fn new(base: &str, token: String, digest_key: Vec<u8>, http: reqwest::Client) -> GitLab {
        GitLab {
            api: Api::new(base, token, http),
            digest_key,
        }
    }

    /// An HTTP client with the system's roots and proxy settings.
    pub fn client() -> Result<reqwest::Client, String> {
        Api::client()
    }

    pub async fn version(&self) -> Result<String, SyncError> {
        self.api.version().await
    }

    /// Brings GitLab to `desired`, item by item. `state` is what the agent
    /// created and set before; it is updated as mutations succeed, also
    /// when a later step fails. `Err` only when the sync could not run at
    /// all (token refused, GitLab unreachable).
    pub async fn reconcile(
        &self,
        desired: &DesiredConfig,
        state: &mut GitLabState,
    ) -> Result<Report, SyncError> {
        let version = self.version().await?;
        let parsed = api::parse_version(&version)?;
        let mut report = Report {
            version,
            ..Report::default()
        };
        let catalog = Catalog::new(parsed, desired);
        let mut sync = Sync {
            gitlab: self,
            version: parsed,
            catalog,
            state,
            report: &mut report,
        };
        sync.models(desired).await?;
        sync.features(desired).await?;
        sync.obsolete_models(desired).await?;
        sync.settings(desired).await?;
        Ok(report)
    }

    fn key_digest(&self, key: &str) -> String {
        if key.is_empty() {
            return String::new();
        }
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.digest_key).expect("HMAC takes any key length");
        mac.update(key.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// One sync in progress.
struct Sync<'a> {
    gitlab: &'a GitLab,
    version: GitLabVersion,
    catalog: Catalog<'a>,
    state: &'a mut GitLabState,
    report: &'a mut Report,
}

impl Sync<'_> {
    /// A mutation, counted. A top-level error is returned as the item's
    /// failure unless it is fatal for the whole sync.
    async fn mutate(
        &mut self,
        what: &str,
        query: &str,
        field: &str,
        input: serde_json::Value,
    ) -> Result<Result<serde_json::Value, String>, SyncError> {
        self.report.mutations += 1;
        match self.gitlab.api.mutate(what, query, field, input).await {
            Ok(Ok(payload)) => Ok(Ok(payload)),
            Ok(Err(errors)) => Ok(Err(errors.join(", "))),
            Err(error) if error.is_fatal() => Err(error),
            Err(error) => Ok(Err(error.item_detail())),
        }
    }

    /// A query whose top-level error fails the items that need it.
    async fn query(
        &self,
        what: &str,
        query: &str,
    ) -> Result<Result<serde_json::Value, String>, SyncError> {
        match self
            .gitlab
            .api
            .graphql(what, query, serde_json::json!({}))
            .await
        {
            Ok(data) => Ok(Ok(data)),
            Err(error) if error.is_fatal() => Err(error),
            Err(error) => Ok(Err(error.item_detail())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duofleet_proto::v1::ReleaseStateSince;

    fn states(list: &[(&str, ReleaseState)]) -> Vec<ReleaseStateSince> {
        list.iter()
            .map(|(v, s)| ReleaseStateSince {
                since_gitlab_version: v.to_string(),
                release_state: *s as i32,
            })
            .collect()
    }

    #[test]
    fn release_state_is_read_at_the_instance_version() {
        let review = states(&[("17.4", ReleaseState::Beta), ("18.4", ReleaseState::Ga)]);
        assert!(beta_at(&review, GitLabVersion::new(17, 11)));
        assert!(beta_at(&review, GitLabVersion::new(18, 3)));
        assert!(!beta_at(&review, GitLabVersion::new(18, 4)));
        assert!(!beta_at(&review, GitLabVersion::new(18, 9)));
    }

    #[test]
    fn compatibility_and_titles_follow_the_instance_version() {
        let dap = Feature {
            key: "duo_agent_platform".into(),
            title: "Agents & flows".into(),
            compatible_families: vec!["claude_3".into(), "mistral".into()],
            compatible_since: vec![duofleet_proto::v1::FamilySince {
                family: "mistral".into(),
                since_gitlab_version: "19.0".into(),
            }],
            titles: vec![
                duofleet_proto::v1::TitleSince {
                    title: "All agents, except Agentic Chat".into(),
                    since_gitlab_version: "18.4".into(),
                },
                duofleet_proto::v1::TitleSince {
                    title: "Agents & flows".into(),
                    since_gitlab_version: "19.0".into(),
                },
            ],
            ..Default::default()
        };
        let desired = DesiredConfig {
            catalog_features: vec![dap],
            ..Default::default()
        };
        let old = Catalog::new(GitLabVersion::new(18, 9), &desired);
        assert_eq!(
            old.incompatible("duo_agent_platform", "mistral").as_deref(),
            Some(
                "Mistral is incompatible with the All agents, except Agentic Chat feature on GitLab 18.9 (GitLab accepts it from 19.0)"
            )
        );
        assert_eq!(old.incompatible("duo_agent_platform", "claude_3"), None);
        let new = Catalog::new(GitLabVersion::new(19, 0), &desired);
        assert_eq!(new.incompatible("duo_agent_platform", "mistral"), None);
    }

    #[test]
    fn unsupported_names_the_instance_version() {
        let desired = DesiredConfig {
            catalog_families: vec![Family {
                key: "general".into(),
                since_gitlab_version: "18.3".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let catalog = Catalog::new(GitLabVersion::new(17, 8), &desired);
        assert_eq!(
            catalog.family_unsupported("general").as_deref(),
            Some("not supported by GitLab 17.8 (it came in 18.3)")
        );
        assert_eq!(catalog.family_unsupported("mixtral"), None);
        let newer = Catalog::new(GitLabVersion::new(18, 3), &desired);
        assert_eq!(newer.family_unsupported("general"), None);
    }
}
