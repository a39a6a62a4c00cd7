//! Field-level differences between two configurations: what DiffRevisions,
//! ApplyConfig and `duofleetctl history show` report. API keys are never
//! shown, only whether they were set, changed or removed.

use crate::config::Config;
use duofleet_proto::v1::{
    ChangeAction, FeatureSetting, FieldChange, Model, Profile, Provider, ResourceKind,
};
use std::collections::BTreeMap;

/// Every field that differs from `old` to `new`, models first, each kind
/// ordered by name.
pub fn field_changes(old: &Config, new: &Config) -> Vec<FieldChange> {
    let mut changes = Vec::new();
    resources(
        &mut changes,
        ResourceKind::Model,
        &old.models,
        &new.models,
        model_fields,
    );
    resources(
        &mut changes,
        ResourceKind::Profile,
        &old.profiles,
        &new.profiles,
        profile_fields,
    );
    changes
}

fn resources<T>(
    out: &mut Vec<FieldChange>,
    kind: ResourceKind,
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    fields: fn(&T) -> Vec<(String, String)>,
) {
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for name in names {
        let change = |action: ChangeAction, field: &str, old: &str, new: &str| FieldChange {
            kind: kind as i32,
            name: name.clone(),
            action: action as i32,
            field: field.to_string(),
            old_value: old.to_string(),
            new_value: new.to_string(),
        };
        match (old.get(name), new.get(name)) {
            (None, Some(created)) => {
                out.push(change(ChangeAction::Created, "", "", ""));
                for (field, value) in fields(created) {
                    if !value.is_empty() {
                        out.push(change(ChangeAction::Created, &field, "", &value));
                    }
                }
            }
            (Some(_), None) => out.push(change(ChangeAction::Deleted, "", "", "")),
            (Some(before), Some(after)) => {
                let before: BTreeMap<String, String> = fields(before).into_iter().collect();
                let after = fields(after);
                let mut seen = Vec::new();
                for (field, value) in &after {
                    let was = before.get(field).map(String::as_str).unwrap_or("");
                    if was != value {
                        out.push(change(ChangeAction::Updated, field, was, value));
                    }
                    seen.push(field.as_str());
                }
                for (field, was) in &before {
                    if !seen.contains(&field.as_str()) && !was.is_empty() {
                        out.push(change(ChangeAction::Updated, field, was, ""));
                    }
                }
            }
            (None, None) => {}
        }
    }
}

/// A model's comparable fields. The key is reduced to a marker that says
/// whether one is set; a changed key shows as "(changed)" (see below).
fn model_fields(model: &Model) -> Vec<(String, String)> {
    vec![
        ("family".into(), model.family.clone()),
        ("endpoint".into(), model.endpoint.clone()),
        ("identifier".into(), model.identifier.clone()),
        ("provider".into(), model.provider.clone()),
        ("api_key".into(), key_digest(&model.api_key)),
    ]
}

/// Stands in for an API key in comparisons: equal keys give equal text,
/// and the text reveals nothing; [`redact_keys`] turns it into words.
fn key_digest(key: &str) -> String {
    use sha2::{Digest, Sha256};
    if key.is_empty() {
        return String::new();
    }
    let digest = Sha256::digest(key.as_bytes());
    format!("\u{1}{}", &hex::encode(digest)[..16])
}

fn profile_fields(profile: &Profile) -> Vec<(String, String)> {
    let mut fields = vec![
        ("parent".into(), profile.parent.clone()),
        (
            "reconfigure_window".into(),
            profile
                .reconfigure_window
                .as_ref()
                .map(duofleet_proto::window::describe)
                .unwrap_or_default(),
        ),
        ("ai_gateway_url".into(), profile.ai_gateway_url.clone()),
        (
            "ai_gateway_internal_url".into(),
            profile.ai_gateway_internal_url.clone(),
        ),
        ("selector".into(), labels(&profile.selector)),
        ("priority".into(), number(profile.priority as i64)),
        (
            "ai_gateway_timeout_seconds".into(),
            number(profile.ai_gateway_timeout_seconds as i64),
        ),
        (
            "duo_agent_platform_service_url".into(),
            profile.duo_agent_platform_service_url.clone(),
        ),
    ];
    for setting in &profile.features {
        fields.push((
            format!("features.{}", setting.feature),
            setting_text(setting),
        ));
    }
    fields
}

fn number(n: i64) -> String {
    if n == 0 { String::new() } else { n.to_string() }
}

/// `k=v,k=v`, ordered by key.
pub fn labels(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// "self_hosted mixtral-prod", "vendor", "disabled".
pub fn setting_text(setting: &FeatureSetting) -> String {
    match setting.provider() {
        Provider::SelfHosted => format!("self_hosted {}", setting.model),
        Provider::Vendor => "vendor".into(),
        Provider::Disabled => "disabled".into(),
        Provider::Unspecified => String::new(),
    }
}

/// Replaces the key digests in `changes` with what an operator may see:
/// "(set)", "(changed)" or "(removed)", never a key or its digest.
pub fn redact_keys(changes: &mut [FieldChange]) {
    for change in changes.iter_mut().filter(|c| c.field == "api_key") {
        let (old, new) = (!change.old_value.is_empty(), !change.new_value.is_empty());
        change.old_value.clear();
        change.new_value = match (old, new) {
            (false, true) => "(set)",
            (true, true) => "(changed)",
            (true, false) => "(removed)",
            (false, false) => "",
        }
        .to_string();
    }
}

/// The field changes between two configurations, keys redacted: the one
/// entry point for answers to operators.
pub fn public_field_changes(old: &Config, new: &Config) -> Vec<FieldChange> {
    let mut changes = field_changes(old, new);
    redact_keys(&mut changes);
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(key: &str) -> Model {
        Model {
            name: "m".into(),
            family: "mixtral".into(),
            endpoint: "https://a/v1".into(),
            api_key: key.into(),
            ..Default::default()
        }
    }

    fn config(models: Vec<Model>, profiles: Vec<Profile>) -> Config {
        Config {
            revision: 1,
            models: models.into_iter().map(|m| (m.name.clone(), m)).collect(),
            profiles: profiles.into_iter().map(|p| (p.name.clone(), p)).collect(),
        }
    }

    fn brief(changes: &[FieldChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| {
                format!(
                    "{:?} {} {} {}: {:?} -> {:?}",
                    c.kind(),
                    c.action().as_str_name(),
                    c.name,
                    c.field,
                    c.old_value,
                    c.new_value
                )
            })
            .collect()
    }

    #[test]
    fn fields_old_to_new_and_keys_only_as_words() {
        let old = config(
            vec![model("sk-one")],
            vec![Profile {
                name: "default".into(),
                ai_gateway_url: "https://a".into(),
                features: vec![FeatureSetting {
                    feature: "duo_chat".into(),
                    provider: Provider::Vendor as i32,
                    model: String::new(),
                }],
                ..Default::default()
            }],
        );
        let mut new = old.clone();
        new.models.get_mut("m").unwrap().api_key = "sk-two".into();
        new.models.get_mut("m").unwrap().endpoint = "https://b/v1".into();
        let profile = new.profiles.get_mut("default").unwrap();
        profile.ai_gateway_url = "https://b".into();
        profile.features[0] = FeatureSetting {
            feature: "duo_chat".into(),
            provider: Provider::SelfHosted as i32,
            model: "m".into(),
        };
        profile.selector.insert("ring".into(), "canary".into());
        let changes = public_field_changes(&old, &new);
        assert_eq!(
            brief(&changes),
            [
                "Model CHANGE_ACTION_UPDATED m endpoint: \"https://a/v1\" -> \"https://b/v1\"",
                "Model CHANGE_ACTION_UPDATED m api_key: \"\" -> \"(changed)\"",
                "Profile CHANGE_ACTION_UPDATED default ai_gateway_url: \"https://a\" -> \"https://b\"",
                "Profile CHANGE_ACTION_UPDATED default selector: \"\" -> \"ring=canary\"",
                "Profile CHANGE_ACTION_UPDATED default features.duo_chat: \"vendor\" -> \"self_hosted m\"",
            ]
        );
        let text = format!("{changes:?}");
        assert!(!text.contains("sk-"), "{text}");
    }

    #[test]
    fn created_deleted_and_removed_fields() {
        let old = config(vec![model("k")], vec![]);
        let new = config(
            vec![],
            vec![Profile {
                name: "canary".into(),
                priority: 10,
                ..Default::default()
            }],
        );
        assert_eq!(
            brief(&public_field_changes(&old, &new)),
            [
                "Model CHANGE_ACTION_DELETED m : \"\" -> \"\"",
                "Profile CHANGE_ACTION_CREATED canary : \"\" -> \"\"",
                "Profile CHANGE_ACTION_CREATED canary priority: \"\" -> \"10\"",
            ]
        );
        let mut keyless = old.clone();
        keyless.models.get_mut("m").unwrap().api_key.clear();
        assert_eq!(
            brief(&public_field_changes(&old, &keyless)),
            ["Model CHANGE_ACTION_UPDATED m api_key: \"\" -> \"(removed)\""]
        );
    }
}
