//! What the agent applied, kept in `<state-dir>/state.json` (mode 0600,
//! written atomically) so that a restart reconfigures nothing that is
//! already in place, and finishes what a crash interrupted.

use duofleet_proto::v1::DesiredConfig;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The gateway URLs as the agent put them in place.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    pub url: String,
    /// Helm sidekiq and toolbox; empty means `url`.
    pub internal_url: String,
}

impl Gateway {
    pub fn of(desired: &DesiredConfig) -> Gateway {
        Gateway {
            url: desired.ai_gateway_url.clone(),
            internal_url: desired.ai_gateway_internal_url.clone(),
        }
    }

    pub fn internal_or_url(&self) -> &str {
        if self.internal_url.is_empty() {
            &self.url
        } else {
            &self.internal_url
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The last revision acked APPLIED or UNCHANGED.
    pub applied_revision: u64,
    /// SHA-256 of the applied DesiredConfig, revision aside.
    pub applied_digest: String,
    /// The gateway last put in place with a successful reconfigure.
    pub gateway: Gateway,
    /// A gateway written but not yet reconfigured: set before the edit,
    /// cleared after the run. Found set at start, it means a crash
    /// interrupted the run, which must happen again.
    pub pending: Option<Gateway>,
    /// What the agent created in GitLab through its API.
    #[serde(default)]
    pub gitlab: GitLabState,
    /// The newest revision whose gateway is in place on the host (gitlab.rb
    /// and reconfigure, or Helm), even when the API layer failed.
    #[serde(default)]
    pub host_revision: u64,
}

/// What this agent created and set in GitLab through its API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitLabState {
    /// The self-hosted models this agent created, by name.
    pub models: BTreeMap<String, ManagedModel>,
    /// The feature settings this agent set, by feature key: what stands for
    /// GitLab's answer where it cannot be read (17.4), and what goes back to
    /// GitLab's default when a feature leaves the profile.
    #[serde(default)]
    pub features: BTreeMap<String, ManagedFeature>,
    /// Creates refused because a model GitLab hides holds the name, by
    /// model name: not tried again until the desired model changes.
    #[serde(default)]
    pub blocked: BTreeMap<String, Blocked>,
    /// Feature settings GitLab refused for its license (the agent-platform
    /// add-on), by feature key: not sent again until the setting or the
    /// GitLab version changes.
    #[serde(default)]
    pub refused_features: BTreeMap<String, Blocked>,
    /// The newest revision whose every API item held.
    #[serde(default)]
    pub applied_revision: u64,
    /// Written by agents before 0.2, which guessed the form from errors;
    /// the form now follows GitLab's version. Read and dropped.
    #[serde(default, skip_serializing, rename = "single_feature_form")]
    pub legacy_single_feature_form: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedModel {
    /// GitLab's global id, e.g. gid://gitlab/Ai::SelfHostedModel/3.
    pub id: String,
    /// HMAC-SHA256 of the API key last pushed (GitLab never returns keys).
    pub key_digest: String,
    /// SHA-256 of the fields last pushed: a model GitLab hides (a beta
    /// family before the testing terms are accepted) is compared with it.
    #[serde(default)]
    pub pushed: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagedFeature {
    /// As GitLab's enum has it, e.g. SELF_HOSTED.
    pub provider: String,
    /// The self-hosted model's global id, or empty.
    pub model_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Blocked {
    /// `ManagedModel::pushed` of the refused model.
    pub pushed: String,
    pub reason: String,
}

/// The key for API-key digests: `<state-dir>/digest.key`, made on first use.
pub fn digest_key(state_dir: &Path) -> io::Result<Vec<u8>> {
    let path = state_dir.join("digest.key");
    match fs::read(&path) {
        Ok(key) if key.len() >= 32 => Ok(key),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is too short; delete it", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mut key = vec![0u8; 32];
            getrandom::fill(&mut key).map_err(io::Error::other)?;
            write_atomic(&path, &key, None)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(state_dir: &Path) -> StateFile {
        StateFile {
            path: state_dir.join("state.json"),
        }
    }

    pub fn load(&self) -> io::Result<State> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not valid agent state: {e}", self.path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e),
        }
    }

    pub fn save(&self, state: &State) -> io::Result<()> {
        let json = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
        write_atomic(&self.path, &json, None)
    }
}

/// The last desired configuration received, so that health probes know
/// their targets after a restart even when nothing new is sent. It holds
/// API keys: mode 0600, like the rest of the state dir.
pub fn save_desired(state_dir: &Path, desired: &DesiredConfig) -> io::Result<()> {
    write_atomic(
        &state_dir.join("desired.pb"),
        &desired.encode_to_vec(),
        None,
    )
}

pub fn load_desired(state_dir: &Path) -> Option<DesiredConfig> {
    let bytes = fs::read(state_dir.join("desired.pb")).ok()?;
    DesiredConfig::decode(bytes.as_slice()).ok()
}

/// Replaces `path` atomically: temp file in the same directory, fsync,
/// rename, fsync the directory. The new file takes the old one's mode and
/// owner (`like`), or 0600 for a new file.
pub fn write_atomic(path: &Path, contents: &[u8], like: Option<&fs::Metadata>) -> io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let tmp = dir.join(format!(".{}.duofleet-tmp", name.to_string_lossy()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(contents)?;
        if let Some(meta) = like {
            file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
            // Keeping the owner needs privilege; as the file's owner it is a no-op.
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid())) {
                tracing::debug!(path = %path.display(), error = %e, "could not keep the owner");
            }
        }
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn state_round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path());
        assert_eq!(file.load().unwrap(), State::default());
        let state = State {
            applied_revision: 7,
            applied_digest: "ab".into(),
            gateway: Gateway {
                url: "https://gw".into(),
                internal_url: String::new(),
            },
            pending: None,
            gitlab: GitLabState::default(),
            host_revision: 7,
        };
        file.save(&state).unwrap();
        assert_eq!(file.load().unwrap(), state);
        let mode = fs::metadata(dir.path().join("state.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn state_of_an_older_agent_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("state.json"),
            r#"{"applied_revision": 3, "applied_digest": "ab",
                "gateway": {"url": "https://gw", "internal_url": ""}, "pending": null,
                "gitlab": {"models": {"m": {"id": "gid://gitlab/Ai::SelfHostedModel/1", "key_digest": ""}},
                           "single_feature_form": true}}"#,
        )
        .unwrap();
        let state = StateFile::new(dir.path()).load().unwrap();
        assert_eq!(state.applied_revision, 3);
        assert_eq!(
            state.gitlab.models["m"].id,
            "gid://gitlab/Ai::SelfHostedModel/1"
        );
        assert_eq!(state.host_revision, 0);
    }

    #[test]
    fn atomic_write_keeps_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gitlab.rb");
        fs::write(&path, "old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        let meta = fs::metadata(&path).unwrap();
        write_atomic(&path, b"new", Some(&meta)).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "new");
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
    }
}
