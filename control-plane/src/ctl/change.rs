//! Changing: apply, diff, export, and the one-resource commands.

use crate::file::{ConfigFile, KeySource, ModelSpec, ProfileSpec, read_key};
use crate::read::field_changes_text;
use crate::{Failure, One, Outcome, Output, parse_duration, refused, view};
use clap::{Subcommand, ValueEnum};
use duofleet_control_plane::client::Clients;
use duofleet_proto::v1::{
    ApplyConfigRequest, CreateBackupRequest, CreateModelRequest, CreateProfileRequest,
    CreateTokenRequest, DeleteInstanceRequest, DeleteModelRequest, DeleteProfileRequest,
    ExportConfigRequest, FeatureSetting, GetInstanceRequest, Instance, Model, Profile, Provider,
    RevokeTokenRequest, Role, RollbackRequest, SetFeatureSettingRequest, UpdateInstanceRequest,
    UpdateModelRequest, UpdateProfileRequest,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum Set {
    /// A profile's AI gateway URL.
    Gateway { profile: String, url: String },
    /// How a profile serves one Duo feature.
    Feature {
        profile: String,
        feature: String,
        /// A self-hosted model by name.
        #[arg(long, value_name = "MODEL", group = "how", required_unless_present_any = ["vendor", "disabled", "unset"])]
        self_hosted: Option<String>,
        /// GitLab's own (vendored) model.
        #[arg(long, group = "how")]
        vendor: bool,
        /// Off.
        #[arg(long, group = "how")]
        disabled: bool,
        /// Back to GitLab's default.
        #[arg(long, group = "how")]
        unset: bool,
    },
}

#[derive(Subcommand)]
pub enum Create {
    /// A self-hosted model deployment.
    Model {
        name: String,
        #[arg(long)]
        family: String,
        /// Required unless --provider is bedrock or vertex_ai.
        #[arg(long, default_value = "")]
        endpoint: String,
        #[arg(long, default_value = "")]
        identifier: String,
        /// api, bedrock or vertex_ai (GitLab 18.11+); default: inferred from
        /// the identifier, as GitLab infers it.
        #[arg(long, default_value = "")]
        provider: String,
        /// Read the API key from this environment variable.
        #[arg(long, value_name = "VAR", conflicts_with = "api_key_from_file")]
        api_key_from_env: Option<String>,
        /// Read the API key from this file.
        #[arg(long, value_name = "PATH")]
        api_key_from_file: Option<PathBuf>,
    },
    /// A profile.
    Profile {
        name: String,
        /// Labels an instance must carry (repeatable).
        #[arg(long = "selector", value_name = "KEY=VALUE")]
        selector: Vec<String>,
        #[arg(long, default_value_t = 0)]
        priority: i32,
        #[arg(long, value_name = "URL", default_value = "")]
        gateway: String,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// A new token; its secret is printed once.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: RoleName,
        /// Expiry, e.g. 30d (default: never).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        /// Join tokens: how many agents may enroll with it (0: unlimited).
        #[arg(long, default_value_t = 0)]
        max_uses: u32,
        /// Join tokens: a label every instance it enrolls gets (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Join tokens: a label key an agent may set itself (repeatable).
        #[arg(long = "allowed-label-key", value_name = "KEY")]
        allowed_label_keys: Vec<String>,
    },
    List,
    Revoke {
        name: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleName {
    Admin,
    Viewer,
    Join,
}

fn load(path: &Path) -> Result<(ConfigFile, Vec<Model>, Vec<Profile>), Failure> {
    let (file, sources) = ConfigFile::load(path)?;
    let models = file.models(&sources)?;
    let profiles = file.profiles();
    Ok((file, models, profiles))
}

pub async fn apply(
    c: &mut Clients,
    path: &Path,
    dry_run: bool,
    prune: bool,
    force: bool,
    rollout: Option<&Path>,
) -> Result<Outcome, Failure> {
    let (file, models, profiles) = load(path)?;
    let rollout = rollout.map(crate::rollout::load_spec).transpose()?;
    let response = c
        .config
        .apply_config(ApplyConfigRequest {
            models,
            profiles,
            prune,
            validate_only: dry_run,
            expected_revision: if force { 0 } else { file.revision.unwrap_or(0) },
            rollout,
        })
        .await
        .map_err(refused)?
        .into_inner();
    if let Some(rollout) = &response.rollout {
        println!(
            "{} rollout {}: {} instances in {} waves (follow it: duofleetctl rollout status {} --watch)",
            if dry_run { "would start" } else { "started" },
            rollout.id,
            rollout
                .waves
                .iter()
                .map(|w| w.instances.len())
                .sum::<usize>(),
            rollout.waves.len(),
            rollout.id
        );
    }
    match (&response.revision, dry_run) {
        (None, _) => println!(
            "no change: the configuration already matches (revision {})",
            response.current_revision
        ),
        (Some(r), true) => {
            println!("dry run: would make revision {}: {}", r.revision, r.summary);
            print!("{}", field_changes_text(&response.field_changes));
        }
        (Some(r), false) => {
            println!("revision {}: {}", r.revision, r.summary);
            print!("{}", field_changes_text(&response.field_changes));
        }
    }
    Ok(Outcome::Done)
}

/// The configuration as it is now, as a file.
async fn current(c: &mut Clients) -> Result<(ConfigFile, Vec<Model>), Failure> {
    let export = c
        .config
        .export_config(ExportConfigRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    Ok((
        ConfigFile::from_config(export.revision, &export.models, &export.profiles),
        export.models,
    ))
}

pub async fn export(c: &mut Clients) -> Result<Outcome, Failure> {
    let (file, _) = current(c).await?;
    println!(
        "# duofleet configuration at revision {}. API keys are never exported:\n# add `apiKey: {{fromEnv: VAR}}` or `{{fromFile: PATH}}` to set one; without, the stored key stays.\n# `apply` refuses this file once the configuration has moved past `revision` (--force applies anyway).",
        file.revision.unwrap_or(0)
    );
    print!("{}", file.to_yaml());
    Ok(Outcome::Done)
}

/// Exit 0 when applying `path` would change nothing, 1 when it would, with
/// a unified diff of the YAML; errors (a bad file, a refusal) exit 3.
pub async fn diff(c: &mut Clients, path: &Path, prune: bool) -> Result<Outcome, Failure> {
    let (file, models, profiles) = load(path)?;
    // The server checks it all first: a diff of a file apply would refuse
    // is an error, not a diff.
    c.config
        .apply_config(ApplyConfigRequest {
            models,
            profiles,
            prune,
            validate_only: true,
            expected_revision: 0,
            rollout: None,
        })
        .await
        .map_err(refused)?;
    let (now, _) = current(c).await?;
    let after = overlay(&now, &file, prune);
    let before_text = display_yaml(&now, &BTreeMap::new());
    let keys: BTreeMap<String, bool> = file
        .models
        .iter()
        .map(|m| (m.name.clone(), m.api_key.is_some()))
        .collect();
    let after_text = display_yaml(&after, &keys);
    if before_text == after_text {
        return Ok(Outcome::Done);
    }
    let diff = similar::TextDiff::from_lines(&before_text, &after_text);
    print!(
        "{}",
        diff.unified_diff()
            .context_radius(3)
            .header("current", &path.display().to_string())
    );
    Ok(Outcome::Negative)
}

/// What the configuration would be after applying `file` to `now`.
fn overlay(now: &ConfigFile, file: &ConfigFile, prune: bool) -> ConfigFile {
    let mut models: BTreeMap<String, ModelSpec> = now
        .models
        .iter()
        .map(|m| (m.name.clone(), m.clone()))
        .collect();
    let mut profiles: BTreeMap<String, ProfileSpec> = now
        .profiles
        .iter()
        .map(|p| (p.name.clone(), p.clone()))
        .collect();
    if prune {
        models.retain(|name, _| file.models.iter().any(|m| &m.name == name));
        profiles
            .retain(|name, _| name == "default" || file.profiles.iter().any(|p| &p.name == name));
    }
    for m in &file.models {
        models.insert(m.name.clone(), m.clone());
    }
    for p in &file.profiles {
        let mut p = p.clone();
        p.features.sort_by(|a, b| a.feature.cmp(&b.feature));
        profiles.insert(p.name.clone(), p);
    }
    ConfigFile {
        api_version: now.api_version.clone(),
        revision: None,
        models: models.into_values().collect(),
        profiles: profiles.into_values().collect(),
    }
}

/// The file as YAML for a diff: no revision, and a model whose key the
/// file sets shows `apiKey: (write-only, will be set)`.
fn display_yaml(file: &ConfigFile, keys: &BTreeMap<String, bool>) -> String {
    let mut plain = file.clone();
    plain.revision = None;
    for m in &mut plain.models {
        m.api_key = None;
    }
    let mut value = serde_norway::to_value(&plain).expect("the file serializes");
    if let Some(models) = value.get_mut("models").and_then(|m| m.as_sequence_mut()) {
        for model in models {
            let name = model
                .get("name")
                .and_then(|n| n.as_str())
                .unwrap_or_default()
                .to_string();
            if keys.get(&name) == Some(&true)
                && let Some(map) = model.as_mapping_mut()
            {
                map.insert("apiKey".into(), "(write-only, will be set)".into());
            }
        }
    }
    serde_norway::to_string(&value).expect("YAML values serialize")
}

pub async fn set(c: &mut Clients, set: Set) -> Result<Outcome, Failure> {
    match set {
        Set::Gateway { profile, url } => {
            let p = c
                .profiles
                .update_profile(UpdateProfileRequest {
                    profile: Some(Profile {
                        name: profile,
                        ai_gateway_url: url,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["ai_gateway_url".into()],
                    }),
                    validate_only: false,
                    rollout: None,
                })
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "profile {}: gateway {} (revision {})",
                p.name, p.ai_gateway_url, p.revision
            );
        }
        Set::Feature {
            profile,
            feature,
            self_hosted,
            vendor,
            disabled,
            unset,
        } => {
            let (provider, model) = match (self_hosted, vendor, disabled, unset) {
                (Some(model), ..) => (Provider::SelfHosted, model),
                (None, true, ..) => (Provider::Vendor, String::new()),
                (None, false, true, _) => (Provider::Disabled, String::new()),
                _ => (Provider::Unspecified, String::new()),
            };
            let p = c
                .profiles
                .set_feature_setting(SetFeatureSettingRequest {
                    profile,
                    setting: Some(FeatureSetting {
                        feature: feature.clone(),
                        provider: provider as i32,
                        model,
                    }),
                    validate_only: false,
                    rollout: None,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let now = p.features.iter().find(|s| s.feature == feature).map_or(
                "GitLab's default".into(),
                duofleet_control_plane::diff::setting_text,
            );
            println!(
                "profile {}: {feature} is {now} (revision {})",
                p.name, p.revision
            );
        }
    }
    Ok(Outcome::Done)
}

pub async fn create(c: &mut Clients, create: Create) -> Result<Outcome, Failure> {
    match create {
        Create::Model {
            name,
            family,
            endpoint,
            identifier,
            provider,
            api_key_from_env,
            api_key_from_file,
        } => {
            let source = match (api_key_from_env, api_key_from_file) {
                (Some(var), _) => Some(KeySource::FromEnv(var)),
                (None, Some(path)) => Some(KeySource::FromFile(path)),
                (None, None) => None,
            };
            let api_key = match &source {
                Some(source) => read_key(Path::new("."), &name, source)?,
                None => String::new(),
            };
            let m = c
                .models
                .create_model(CreateModelRequest {
                    model: Some(Model {
                        name,
                        family,
                        endpoint,
                        identifier,
                        provider,
                        api_key,
                        ..Default::default()
                    }),
                    validate_only: false,
                })
                .await
                .map_err(refused)?
                .into_inner();
            println!("model {} created (revision {})", m.name, m.revision);
        }
        Create::Profile {
            name,
            selector,
            priority,
            gateway,
        } => {
            let p = c
                .profiles
                .create_profile(CreateProfileRequest {
                    profile: Some(Profile {
                        name,
                        selector: crate::read::selector(&selector)?,
                        priority,
                        ai_gateway_url: gateway,
                        ..Default::default()
                    }),
                    validate_only: false,
                })
                .await
                .map_err(refused)?
                .into_inner();
            println!("profile {} created (revision {})", p.name, p.revision);
        }
    }
    Ok(Outcome::Done)
}

pub async fn delete(
    c: &mut Clients,
    kind: One,
    name: &str,
    dry_run: bool,
) -> Result<Outcome, Failure> {
    let what = match kind {
        One::Model => {
            c.models
                .delete_model(DeleteModelRequest {
                    name: name.into(),
                    validate_only: dry_run,
                })
                .await
                .map_err(refused)?;
            "model"
        }
        One::Profile => {
            c.profiles
                .delete_profile(DeleteProfileRequest {
                    name: name.into(),
                    validate_only: dry_run,
                })
                .await
                .map_err(refused)?;
            "profile"
        }
        One::Instance => {
            c.fleet
                .delete_instance(DeleteInstanceRequest {
                    instance_id: name.into(),
                    validate_only: dry_run,
                })
                .await
                .map_err(refused)?;
            "instance"
        }
    };
    if dry_run {
        println!("dry run: {what} {name} can be deleted");
    } else {
        println!("{what} {name} deleted");
    }
    Ok(Outcome::Done)
}

pub async fn label(c: &mut Clients, id: &str, changes: &[String]) -> Result<Outcome, Failure> {
    let mut instance: Instance = c
        .fleet
        .get_instance(GetInstanceRequest {
            instance_id: id.into(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    for change in changes {
        if let Some((k, v)) = change.split_once('=') {
            instance.labels.insert(k.into(), v.into());
        } else if let Some(k) = change.strip_suffix('-') {
            instance.labels.remove(k);
        } else {
            return Err(Failure(format!(
                "{change:?}: write KEY=VALUE to set a label, KEY- to remove one"
            )));
        }
    }
    let updated = c
        .fleet
        .update_instance(UpdateInstanceRequest {
            instance: Some(Instance {
                instance_id: id.into(),
                labels: instance.labels,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["labels".into()],
            }),
            validate_only: false,
        })
        .await
        .map_err(refused)?
        .into_inner();
    println!(
        "instance {id}: labels {} (profile {})",
        duofleet_control_plane::diff::labels(&updated.labels),
        updated.profile
    );
    Ok(Outcome::Done)
}

pub async fn rotate_key(
    c: &mut Clients,
    model: &str,
    from_env: Option<String>,
    from_file: Option<PathBuf>,
) -> Result<Outcome, Failure> {
    let source = match (from_env, from_file) {
        (Some(var), _) => KeySource::FromEnv(var),
        (None, Some(path)) => KeySource::FromFile(path),
        (None, None) => return Err(Failure("give --from-env VAR or --from-file PATH".into())),
    };
    let api_key = read_key(Path::new("."), model, &source)?;
    let m = c
        .models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: model.into(),
                api_key,
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["api_key".into()],
            }),
            validate_only: false,
        })
        .await
        .map_err(refused)?
        .into_inner();
    println!(
        "model {}: new API key set (revision {})",
        m.name, m.revision
    );
    Ok(Outcome::Done)
}

pub async fn rollback(c: &mut Clients, revision: u64, dry_run: bool) -> Result<Outcome, Failure> {
    let record = c
        .history
        .rollback(RollbackRequest {
            revision,
            validate_only: true,
        })
        .await
        .map_err(refused)?
        .into_inner();
    // What it changes, from now to the target (keys stay as they are).
    let now = c
        .history
        .diff_revisions(duofleet_proto::v1::DiffRevisionsRequest {
            from: record.revision.saturating_sub(1),
            to: revision,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let changes: Vec<_> = now
        .changes
        .into_iter()
        .filter(|c| c.field != "api_key")
        .collect();
    if dry_run {
        println!(
            "dry run: would make revision {}: {}",
            record.revision, record.summary
        );
        print!("{}", field_changes_text(&changes));
        return Ok(Outcome::Done);
    }
    let made = c
        .history
        .rollback(RollbackRequest {
            revision,
            validate_only: false,
        })
        .await
        .map_err(refused)?
        .into_inner();
    println!("revision {}: {}", made.revision, made.summary);
    print!("{}", field_changes_text(&changes));
    Ok(Outcome::Done)
}

pub async fn token(
    c: &mut Clients,
    command: TokenCommand,
    output: Output,
) -> Result<Outcome, Failure> {
    match command {
        TokenCommand::List => {
            return crate::read::get(c, crate::Kind::Tokens, &[], output).await;
        }
        TokenCommand::Create {
            name,
            role,
            ttl,
            max_uses,
            labels,
            allowed_label_keys,
        } => {
            let created = c
                .tokens
                .create_token(CreateTokenRequest {
                    name,
                    role: match role {
                        RoleName::Admin => Role::Admin,
                        RoleName::Viewer => Role::Viewer,
                        RoleName::Join => Role::Join,
                    } as i32,
                    ttl: ttl.map(|d| prost_types::Duration {
                        seconds: d.as_secs() as i64,
                        nanos: 0,
                    }),
                    max_uses,
                    labels: crate::read::selector(&labels)?,
                    allowed_label_keys,
                    validate_only: false,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let token = created.token.unwrap_or_default();
            if matches!(output, Output::Json | Output::Yaml) {
                let mut value = view::token(&token);
                value["secret"] = created.secret.into();
                view::print_value(&value, output == Output::Yaml);
            } else {
                eprintln!(
                    "token {} ({}) created; its secret is shown once, on stdout:",
                    token.name,
                    token
                        .role()
                        .as_str_name()
                        .trim_start_matches("ROLE_")
                        .to_lowercase()
                );
                println!("{}", created.secret);
            }
        }
        TokenCommand::Revoke { name } => {
            c.tokens
                .revoke_token(RevokeTokenRequest {
                    name: name.clone(),
                    validate_only: false,
                })
                .await
                .map_err(refused)?;
            println!("token {name} revoked");
        }
    }
    Ok(Outcome::Done)
}

pub async fn backup(c: &mut Clients, directory: &str) -> Result<Outcome, Failure> {
    let backup = c
        .backup
        .create_backup(CreateBackupRequest {
            directory: directory.into(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    println!(
        "backup of revision {} in {} (on the duofleetd host): {}",
        backup.revision,
        backup.directory,
        backup.files.join(", ")
    );
    if !backup.not_included.is_empty() {
        println!(
            "not included, keep them too: {}",
            backup.not_included.join(", ")
        );
    }
    Ok(Outcome::Done)
}
