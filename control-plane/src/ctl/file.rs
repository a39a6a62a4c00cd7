//! The declarative file `duofleetctl apply` reads and `export` writes:
//! `apiVersion: duofleet/v1`, then models and profiles in the proto's
//! shape (camelCase, as grpcurl writes JSON). It is strict: an unknown key
//! is an error with its line and column. API keys never appear in it,
//! only where to read one: `apiKey: {fromEnv: VAR}` or `{fromFile: PATH}`.

use duofleet_proto::v1::{FeatureSetting, Model, Profile, Provider, ReconfigureWindow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const API_VERSION: &str = "duofleet/v1";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConfigFile {
    pub api_version: String,
    /// The revision this file was exported at: `apply` refuses when the
    /// configuration has moved on since (unless `--force`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub profiles: Vec<ProfileSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModelSpec {
    pub name: String,
    pub family: String,
    /// Required unless the provider is bedrock or vertex_ai.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub identifier: String,
    /// `api`, `bedrock` or `vertex_ai`; absent: inferred from the identifier.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub provider: String,
    /// Absent: the stored key is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<KeySource>,
}

/// Where an API key is read from: `{fromEnv: VAR}` or `{fromFile: PATH}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "KeySpec", into = "KeySpec")]
pub enum KeySource {
    FromEnv(String),
    FromFile(PathBuf),
}

/// [`KeySource`] as YAML writes it: a map with exactly one of the two keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from_file: Option<PathBuf>,
}

impl TryFrom<KeySpec> for KeySource {
    type Error = String;

    fn try_from(spec: KeySpec) -> Result<KeySource, String> {
        match (spec.from_env, spec.from_file) {
            (Some(var), None) => Ok(KeySource::FromEnv(var)),
            (None, Some(path)) => Ok(KeySource::FromFile(path)),
            _ => Err("write exactly one of {fromEnv: VAR} or {fromFile: PATH}".into()),
        }
    }
}

impl From<KeySource> for KeySpec {
    fn from(source: KeySource) -> KeySpec {
        match source {
            KeySource::FromEnv(var) => KeySpec {
                from_env: Some(var),
                ..KeySpec::default()
            },
            KeySource::FromFile(path) => KeySpec {
                from_file: Some(path),
                ..KeySpec::default()
            },
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProfileSpec {
    pub name: String,
    /// Inherit what this profile does not set from another.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ai_gateway_url: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ai_gateway_internal_url: String,
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub ai_gateway_timeout_seconds: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub duo_agent_platform_service_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconfigure_window: Option<WindowSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<FeatureSpec>,
}

/// `reconfigureWindow: {days: [sat, sun], start: "02:00", end: "05:00",
/// timeZone: Europe/Berlin}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WindowSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub days: Vec<String>,
    pub start: String,
    pub end: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub time_zone: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FeatureSpec {
    pub feature: String,
    pub provider: ProviderName,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderName {
    SelfHosted,
    Vendor,
    Disabled,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// A file that cannot be used, with where.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", .path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("{}: apiVersion must be {API_VERSION:?} (got {found:?})", .path.display())]
    ApiVersion { path: PathBuf, found: String },
    #[error("{}: {kind} {name:?} is also in {}", .path.display(), .other.display())]
    Duplicate {
        path: PathBuf,
        other: PathBuf,
        kind: &'static str,
        name: String,
    },
    #[error("{}: model {model:?}: apiKey: {reason}", .path.display())]
    Key {
        path: PathBuf,
        model: String,
        reason: String,
    },
    #[error("{}: no .yaml or .yml files in it", .path.display())]
    EmptyDir { path: PathBuf },
}

impl ConfigFile {
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, FileError> {
        let file: ConfigFile = serde_norway::from_str(text).map_err(|e| FileError::Yaml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if file.api_version != API_VERSION {
            return Err(FileError::ApiVersion {
                path: path.to_path_buf(),
                found: file.api_version,
            });
        }
        Ok(file)
    }

    /// One file, or every `.yaml`/`.yml` file of a directory (in name
    /// order) merged; a name defined twice is an error. Returns the merged
    /// file and, per model, the file it came from (for relative key paths).
    pub fn load(path: &Path) -> Result<(ConfigFile, BTreeMap<String, PathBuf>), FileError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| FileError::Read {
                path: p.to_path_buf(),
                source,
            })
        };
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| FileError::Read {
                    path: path.to_path_buf(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                })
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(FileError::EmptyDir {
                    path: path.to_path_buf(),
                });
            }
            files
        } else {
            vec![path.to_path_buf()]
        };
        let mut merged = ConfigFile {
            api_version: API_VERSION.into(),
            ..Default::default()
        };
        let mut model_files: BTreeMap<String, PathBuf> = BTreeMap::new();
        let mut profile_files: BTreeMap<String, PathBuf> = BTreeMap::new();
        for file_path in &files {
            let file = ConfigFile::parse(file_path, &read(file_path)?)?;
            if files.len() == 1 {
                merged.revision = file.revision;
            } else {
                merged.revision = match (merged.revision, file.revision) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            for model in file.models {
                if let Some(other) = model_files.insert(model.name.clone(), file_path.clone()) {
                    return Err(FileError::Duplicate {
                        path: file_path.clone(),
                        other,
                        kind: "model",
                        name: model.name,
                    });
                }
                merged.models.push(model);
            }
            for profile in file.profiles {
                if let Some(other) = profile_files.insert(profile.name.clone(), file_path.clone()) {
                    return Err(FileError::Duplicate {
                        path: file_path.clone(),
                        other,
                        kind: "profile",
                        name: profile.name,
                    });
                }
                merged.profiles.push(profile);
            }
        }
        Ok((merged, model_files))
    }

    /// The file an export writes: everything, no keys.
    pub fn from_config(revision: u64, models: &[Model], profiles: &[Profile]) -> ConfigFile {
        ConfigFile {
            api_version: API_VERSION.into(),
            revision: Some(revision),
            models: models.iter().map(ModelSpec::from_model).collect(),
            profiles: profiles.iter().map(ProfileSpec::from_profile).collect(),
        }
    }

    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("the file serializes")
    }

    /// The request's models, with keys read from where the file says
    /// (`fromFile` paths relative to the file that names them).
    pub fn models(&self, sources: &BTreeMap<String, PathBuf>) -> Result<Vec<Model>, FileError> {
        self.models
            .iter()
            .map(|spec| {
                let origin = sources.get(&spec.name).cloned().unwrap_or_default();
                let api_key = match &spec.api_key {
                    None => String::new(),
                    Some(source) => read_key(&origin, &spec.name, source)?,
                };
                Ok(Model {
                    name: spec.name.clone(),
                    family: spec.family.clone(),
                    endpoint: spec.endpoint.clone(),
                    identifier: spec.identifier.clone(),
                    provider: spec.provider.clone(),
                    api_key,
                    ..Default::default()
                })
            })
            .collect()
    }

    pub fn profiles(&self) -> Vec<Profile> {
        self.profiles.iter().map(ProfileSpec::to_profile).collect()
    }
}

/// Reads an API key from the environment or a file; never empty.
pub fn read_key(origin: &Path, model: &str, source: &KeySource) -> Result<String, FileError> {
    let failed = |reason: String| FileError::Key {
        path: origin.to_path_buf(),
        model: model.to_string(),
        reason,
    };
    let key = match source {
        KeySource::FromEnv(var) => std::env::var(var)
            .map_err(|_| failed(format!("the environment variable {var} is not set")))?,
        KeySource::FromFile(file) => {
            let file = match origin.parent() {
                Some(dir) if file.is_relative() => dir.join(file),
                _ => file.clone(),
            };
            std::fs::read_to_string(&file)
                .map_err(|e| failed(format!("cannot read {}: {e}", file.display())))?
        }
    };
    let key = key.trim().to_string();
    if key.is_empty() {
        return Err(failed("the key is empty".into()));
    }
    Ok(key)
}

impl ModelSpec {
    pub fn from_model(model: &Model) -> ModelSpec {
        ModelSpec {
            name: model.name.clone(),
            family: model.family.clone(),
            endpoint: model.endpoint.clone(),
            identifier: model.identifier.clone(),
            provider: model.provider.clone(),
            api_key: None,
        }
    }
}

impl ProfileSpec {
    pub fn from_profile(profile: &Profile) -> ProfileSpec {
        ProfileSpec {
            name: profile.name.clone(),
            parent: profile.parent.clone(),
            reconfigure_window: profile.reconfigure_window.as_ref().map(|w| WindowSpec {
                days: w.days.clone(),
                start: w.start.clone(),
                end: w.end.clone(),
                time_zone: w.time_zone.clone(),
            }),
            selector: profile.selector.clone(),
            priority: profile.priority,
            ai_gateway_url: profile.ai_gateway_url.clone(),
            ai_gateway_internal_url: profile.ai_gateway_internal_url.clone(),
            ai_gateway_timeout_seconds: profile.ai_gateway_timeout_seconds,
            duo_agent_platform_service_url: profile.duo_agent_platform_service_url.clone(),
            features: profile
                .features
                .iter()
                .filter_map(|s| {
                    let provider = match s.provider() {
                        Provider::SelfHosted => ProviderName::SelfHosted,
                        Provider::Vendor => ProviderName::Vendor,
                        Provider::Disabled => ProviderName::Disabled,
                        Provider::Unspecified => return None,
                    };
                    Some(FeatureSpec {
                        feature: s.feature.clone(),
                        provider,
                        model: s.model.clone(),
                    })
                })
                .collect(),
        }
    }

    pub fn to_profile(&self) -> Profile {
        Profile {
            name: self.name.clone(),
            parent: self.parent.clone(),
            reconfigure_window: self.reconfigure_window.as_ref().map(|w| ReconfigureWindow {
                days: w.days.clone(),
                start: w.start.clone(),
                end: w.end.clone(),
                time_zone: w.time_zone.clone(),
            }),
            selector: self.selector.clone(),
            priority: self.priority,
            ai_gateway_url: self.ai_gateway_url.clone(),
            ai_gateway_internal_url: self.ai_gateway_internal_url.clone(),
            ai_gateway_timeout_seconds: self.ai_gateway_timeout_seconds,
            duo_agent_platform_service_url: self.duo_agent_platform_service_url.clone(),
            features: self
                .features
                .iter()
                .map(|f| FeatureSetting {
                    feature: f.feature.clone(),
                    provider: match f.provider {
                        ProviderName::SelfHosted => Provider::SelfHosted,
                        ProviderName::Vendor => Provider::Vendor,
                        ProviderName::Disabled => Provider::Disabled,
                    } as i32,
                    model: f.model.clone(),
                })
                .collect(),
            ..Default::default()
        }
    }
}
