//! Applying a DesiredConfig to this node: the gateway URL in gitlab.rb and
//! `gitlab-ctl reconfigure` (Linux package), or the agent's Helm values file
//! and the helm command (Helm). A reconfigure runs only when the gateway
//! actually changes; when it fails, the previous file is put back and the
//! command runs again to bring the previous state back.

use crate::command::{self, Outcome, shell_quote};
use crate::gitlab::api::since;
use crate::gitlab::{GitLab, SyncError};
use crate::gitlab_rb;
use crate::state::{self, Gateway, State, StateFile};
use duofleet_proto::GitLabVersion;
use duofleet_proto::v1::{Ack, AckResult, DesiredConfig, GitLabSync, HostSync};
use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub enum Target {
    LinuxPackage {
        gitlab_rb: PathBuf,
        reconfigure_command: String,
    },
    Helm {
        values: PathBuf,
        helm_command: String,
    },
}

pub struct Applier {
    pub target: Target,
    pub timeout: Duration,
    pub state_file: StateFile,
    pub state: State,
    /// Models and feature settings through GitLab's API; `None` when off.
    pub gitlab: Option<GitLab>,
    /// The GitLab version last seen, which decides where the gateway URL
    /// takes effect.
    pub gitlab_version: Option<GitLabVersion>,
    /// The last API sync could not reach GitLab (not a refusal): worth
    /// trying again by itself.
    pub gitlab_unreachable: bool,
    /// Where a running reconfigure (or helm) records its process group, so
    /// that the next agent can stop it if this one dies during the run.
    pub run_record: PathBuf,
}

/// The result of looking for hand edits.
pub enum Drift {
    None,
    Found(String),
}

impl Applier {
    /// Applies `desired` and says how it went, as the ack to send. The two
    /// layers apply independently: the host (gitlab.rb and reconfigure, or
    /// Helm) and GitLab's API; the ack says how each went.
    pub async fn apply(&mut self, desired: &DesiredConfig) -> Ack {
        let revision = desired.revision;
        let digest = duofleet_proto::wire::content_digest(desired);
        let want = Gateway::of(desired);
        // An empty URL means "not set yet": leave AI_GATEWAY_URL as found.
        let gateway_changes =
            !want.url.is_empty() && (self.state.pending.is_some() || want != self.state.gateway);
        let unchanged = digest == self.state.applied_digest && !gateway_changes;
        if unchanged && self.gitlab.is_none() {
            let host = self.host_sync(revision, None, false);
            return self.record(revision, digest, AckResult::Unchanged, None, host);
        }
        // Outside the profile's window the host change waits (it restarts
        // Puma); the API layer goes ahead.
        let waiting = if gateway_changes {
            closed_until(desired, jiff::Timestamp::now())
        } else {
            None
        };
        let gateway_changes = gateway_changes && waiting.is_none();
        let host_error = if gateway_changes {
            self.put_gateway(&want).await.err()
        } else {
            None
        };
        if let Some(error) = &host_error {
            tracing::warn!(revision, %error, "host step failed");
        }
        let mut sync_status = None;
        let mut api_error = None;
        let mut mutations = 0;
        self.gitlab_unreachable = false;
        if let Some(gitlab) = &self.gitlab {
            let mut created = self.state.gitlab.clone();
            let result = gitlab.reconcile(desired, &mut created).await;
            match result {
                Ok(report) => {
                    self.gitlab_version = GitLabVersion::parse(&report.version);
                    if report.failed() {
                        api_error = report.failure();
                    } else {
                        created.applied_revision = revision;
                    }
                    mutations = report.mutations;
                    sync_status = Some(report.status(created.applied_revision));
                }
                Err(error) => {
                    self.gitlab_unreachable = matches!(error, SyncError::Http { .. });
                    let status = GitLabSync {
                        enabled: true,
                        detail: error.to_string(),
                        applied_revision: created.applied_revision,
                        ..Default::default()
                    };
                    api_error = Some(error.to_string());
                    sync_status = Some(status);
                }
            }
            // Keep what was created even when a later step failed.
            let mut next = self.state.clone();
            next.gitlab = created;
            if let Err(error) = self.save(next) {
                return failed(revision, error, sync_status, None);
            }
            if let Some(error) = &api_error {
                tracing::warn!(revision, %error, "GitLab API sync incomplete");
            }
        }
        let mut host = self.host_sync(revision, host_error.clone(), gateway_changes);
        if let Some((opens, window)) = &waiting {
            host.applied_revision = self.state.host_revision;
            host.detail = format!(
                "AI_GATEWAY_URL {} waits for the reconfigure window ({window}), which opens at {opens}",
                want.url
            );
            host.waiting_until = Some(duofleet_proto::window::to_proto(*opens));
            tracing::info!(revision, %opens, "the host change waits for the reconfigure window");
        }
        if host_error.is_some() || api_error.is_some() {
            if host_error.is_none() {
                let mut next = self.state.clone();
                next.host_revision = revision;
                if let Err(error) = self.save(next) {
                    return failed(revision, error, sync_status, Some(host));
                }
            }
            let error = [host_error, api_error]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("\n");
            return failed(revision, error, sync_status, Some(host));
        }
        let result = if unchanged && mutations == 0 {
            AckResult::Unchanged
        } else {
            AckResult::Applied
        };
        if waiting.is_some() {
            // The revision's API layer is in place; its host layer is not.
            let mut next = self.state.clone();
            next.applied_revision = revision;
            next.applied_digest = digest;
            if let Err(e) = self.save(next) {
                return failed(revision, e, sync_status, Some(host));
            }
            return Ack {
                revision,
                result: result as i32,
                error: String::new(),
                gitlab_sync: sync_status,
                host_sync: Some(host),
            };
        }
        self.record(revision, digest, result, sync_status, host)
    }

    /// The host layer's status after an apply of `revision`.
    fn host_sync(&self, revision: u64, error: Option<String>, ran: bool) -> HostSync {
        let (file, command) = match &self.target {
            Target::LinuxPackage {
                gitlab_rb,
                reconfigure_command,
            } => (gitlab_rb, reconfigure_command),
            Target::Helm {
                values,
                helm_command,
            } => (values, helm_command),
        };
        let what = if ran {
            format!(
                "AI_GATEWAY_URL written to {} and `{command}` ran",
                file.display()
            )
        } else {
            format!("AI_GATEWAY_URL in {} already in place", file.display())
        };
        let note = gateway_source(self.gitlab_version, self.gitlab.is_some());
        HostSync {
            applied_revision: if error.is_none() {
                revision
            } else {
                self.state.host_revision
            },
            error: error.unwrap_or_default(),
            detail: if note.is_empty() {
                what
            } else {
                format!("{what}. {note}")
            },
            waiting_until: None,
        }
    }

    fn record(
        &mut self,
        revision: u64,
        digest: String,
        result: AckResult,
        gitlab_sync: Option<GitLabSync>,
        host: HostSync,
    ) -> Ack {
        let mut next = self.state.clone();
        next.applied_revision = revision;
        next.applied_digest = digest;
        next.host_revision = revision;
        if let Err(e) = self.save(next) {
            return failed(revision, e, gitlab_sync, Some(host));
        }
        Ack {
            revision,
            result: result as i32,
            error: String::new(),
            gitlab_sync,
            host_sync: Some(host),
        }
    }

    fn save(&mut self, next: State) -> Result<(), String> {
        self.state_file
            .save(&next)
            .map_err(|e| format!("cannot write the agent state file: {e}"))?;
        self.state = next;
        Ok(())
    }

    /// Writes the gateway and runs the reconfigure (or helm) command; on
    /// failure restores the previous file and runs it again.
    async fn put_gateway(&mut self, want: &Gateway) -> Result<(), String> {
        let (path, command) = match &self.target {
            Target::LinuxPackage {
                gitlab_rb,
                reconfigure_command,
            } => (gitlab_rb.clone(), reconfigure_command.clone()),
            Target::Helm {
                values,
                helm_command,
            } => (
                values.clone(),
                helm_command.replace("{values}", &shell_quote(&values.display().to_string())),
            ),
        };
        // A symlinked gitlab.rb (e.g. into a config repository): edit the
        // file it points to and keep the link.
        let path = fs::canonicalize(&path).unwrap_or(path);
        let before = match fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && matches!(self.target, Target::Helm { .. }) =>
            {
                None
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let after = match &self.target {
            Target::LinuxPackage { .. } => {
                gitlab_rb::set_gateway_url(before.as_deref().unwrap_or_default(), &want.url)
                    .map_err(|e| format!("{} left unchanged: {e}", path.display()))?
            }
            Target::Helm { .. } => helm_values(want),
        };
        let mut pending = self.state.clone();
        pending.pending = Some(want.clone());
        self.save(pending)?;
        let meta = fs::metadata(&path).ok();
        if before.as_deref() != Some(after.as_str()) {
            if let Some(before) = &before {
                let backup = backup_path(&path);
                state::write_atomic(&backup, before.as_bytes(), meta.as_ref())
                    .map_err(|e| format!("cannot write the backup {}: {e}", backup.display()))?;
            }
            state::write_atomic(&path, after.as_bytes(), meta.as_ref())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            tracing::info!(path = %path.display(), url = %want.url, "gateway URL written");
        }
        let outcome = self.run(&command).await;
        if outcome.as_ref().is_ok_and(Outcome::success) {
            let mut done = self.state.clone();
            done.gateway = want.clone();
            done.pending = None;
            return self.save(done);
        }
        let failure = match &outcome {
            Ok(outcome) => format!(
                "`{command}` failed ({}); last lines:\n{}",
                outcome.describe(self.timeout),
                outcome.tail
            ),
            Err(e) => format!("cannot run `{command}`: {e}"),
        };
        // Put the previous file back and bring the previous state back.
        let restored = match &before {
            Some(text) => state::write_atomic(&path, text.as_bytes(), meta.as_ref()),
            None => fs::remove_file(&path),
        };
        let rerun = match restored {
            Ok(()) if before.is_some() => match self.run(&command).await {
                Ok(o) if o.success() => {
                    "restored the previous file and ran it again successfully".to_string()
                }
                Ok(o) => format!(
                    "restored the previous file, but running it again also failed ({})",
                    o.describe(self.timeout)
                ),
                Err(e) => format!("restored the previous file, but could not run it again: {e}"),
            },
            Ok(()) => "removed the new values file".to_string(),
            Err(e) => format!("COULD NOT RESTORE {}: {e}", path.display()),
        };
        let mut back = self.state.clone();
        back.pending = None;
        self.save(back)?;
        Err(format!("{failure}\n{rerun}"))
    }

    async fn run(&self, command: &str) -> io::Result<Outcome> {
        tracing::info!(command, "running");
        let outcome = command::run(command, self.timeout, Some(&self.run_record)).await?;
        tracing::info!(command, success = outcome.success(), code = ?outcome.code, "finished");
        Ok(outcome)
    }

    /// gitlab.rb as it is now (Linux package); the Helm values file is the
    /// agent's own, so there is nothing an administrator would fix there.
    pub fn watched_file(&self) -> Option<String> {
        match &self.target {
            Target::LinuxPackage { gitlab_rb, .. } => fs::read_to_string(gitlab_rb).ok(),
            Target::Helm { .. } => None,
        }
    }

    /// Compares the file with what was applied.
    pub fn check_drift(&self) -> Drift {
        let applied = &self.state.gateway;
        if applied.url.is_empty() || self.state.pending.is_some() {
            return Drift::None;
        }
        match &self.target {
            Target::LinuxPackage { gitlab_rb, .. } => match fs::read_to_string(gitlab_rb) {
                Err(e) => Drift::Found(format!("cannot read {}: {e}", gitlab_rb.display())),
                Ok(text) => match gitlab_rb::read_gateway_url(&text) {
                    Ok(Some(url)) if url == applied.url => Drift::None,
                    Ok(found) => Drift::Found(format!(
                        "{} sets AI_GATEWAY_URL to {} instead of {}",
                        gitlab_rb.display(),
                        found.map_or("nothing".to_string(), |u| format!("{u:?}")),
                        applied.url
                    )),
                    Err(e) => Drift::Found(e.to_string()),
                },
            },
            Target::Helm { values, .. } => match fs::read_to_string(values) {
                Ok(text) if text == helm_values(applied) => Drift::None,
                _ => Drift::Found(format!("{} was changed or removed", values.display())),
            },
        }
    }

    /// Puts the applied gateway back after a hand edit.
    pub async fn repair(&mut self) -> Ack {
        let gateway = self.state.gateway.clone();
        let revision = self.state.applied_revision;
        match self.put_gateway(&gateway).await {
            Ok(()) => Ack {
                revision,
                result: AckResult::Applied as i32,
                error: String::new(),
                gitlab_sync: None,
                host_sync: Some(self.host_sync(revision, None, true)),
            },
            Err(error) => {
                let host = self.host_sync(revision, Some(error.clone()), true);
                failed(revision, error, None, Some(host))
            }
        }
    }
}

/// When `desired`'s reconfigure window is closed at `now`: when it opens
/// next, and the window in words. `None` when host changes may run now.
pub fn closed_until(
    desired: &DesiredConfig,
    now: jiff::Timestamp,
) -> Option<(jiff::Timestamp, String)> {
    let spec = desired.reconfigure_window.as_ref()?;
    // The control plane validated it; one that does not parse binds nothing.
    let window = duofleet_proto::window::Window::parse(spec).ok()?;
    (!window.contains(now)).then(|| {
        (
            window.next_open(now),
            duofleet_proto::window::describe(spec),
        )
    })
}

fn failed(
    revision: u64,
    error: String,
    gitlab_sync: Option<GitLabSync>,
    host_sync: Option<HostSync>,
) -> Ack {
    Ack {
        revision,
        result: AckResult::Failed as i32,
        error,
        gitlab_sync,
        host_sync,
    }
}

/// Which gateway setting takes effect on this GitLab version, in words.
/// GitLab up to 17.8 reads AI_GATEWAY_URL; 17.9 to 17.11 prefer the
/// database setting and fall back to AI_GATEWAY_URL; 18.x reads only the
/// database setting, which AI_GATEWAY_URL seeds once when it is created.
pub fn gateway_source(version: Option<GitLabVersion>, api_sync: bool) -> String {
    let Some(v) = version else {
        return String::new();
    };
    if v < since::DUO_SETTINGS {
        format!("GitLab {v} takes the gateway from AI_GATEWAY_URL")
    } else if v < since::V18 {
        let how = if api_sync {
            "the agent sets both"
        } else {
            "without --gitlab-token-file the agent cannot set the database setting"
        };
        format!(
            "GitLab {v} takes the gateway from its database setting when set, else from AI_GATEWAY_URL; {how}"
        )
    } else if api_sync {
        format!(
            "GitLab {v} takes the gateway only from its database setting, which the agent sets through the API; AI_GATEWAY_URL only seeds it on first setup"
        )
    } else {
        format!(
            "GitLab {v} takes the gateway only from its database setting; AI_GATEWAY_URL only seeds it on first setup, so without --gitlab-token-file this edit changes nothing on a running instance"
        )
    }
}

fn backup_path(path: &std::path::Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".duofleet-backup");
    path.with_file_name(name)
}

/// The agent-owned Helm values file: the external URL for webservice (it is
/// handed to editor extensions), the internal one for sidekiq and toolbox.
pub fn helm_values(gateway: &Gateway) -> String {
    let env = |url: &str| {
        BTreeMap::from([(
            "extraEnv",
            BTreeMap::from([("AI_GATEWAY_URL", url.to_string())]),
        )])
    };
    let components = BTreeMap::from([
        ("webservice", env(&gateway.url)),
        ("sidekiq", env(gateway.internal_or_url())),
        ("toolbox", env(gateway.internal_or_url())),
    ]);
    let values = BTreeMap::from([("gitlab", components)]);
    format!(
        "# Written by duofleet-agent; edit the profile in duofleet, not this file.\n{}",
        serde_norway::to_string(&values).expect("string maps serialize")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helm_values_put_internal_url_on_sidekiq_and_toolbox() {
        let text = helm_values(&Gateway {
            url: "https://aigw.example.com".into(),
            internal_url: "http://ai-gateway.gitlab.svc.cluster.local:5052".into(),
        });
        let parsed: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        let url = |c: &str| {
            parsed["gitlab"][c]["extraEnv"]["AI_GATEWAY_URL"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(url("webservice"), "https://aigw.example.com");
        assert_eq!(
            url("sidekiq"),
            "http://ai-gateway.gitlab.svc.cluster.local:5052"
        );
        assert_eq!(
            url("toolbox"),
            "http://ai-gateway.gitlab.svc.cluster.local:5052"
        );
        let same = helm_values(&Gateway {
            url: "https://gw".into(),
            internal_url: String::new(),
        });
        let parsed: serde_norway::Value = serde_norway::from_str(&same).unwrap();
        assert_eq!(
            parsed["gitlab"]["toolbox"]["extraEnv"]["AI_GATEWAY_URL"].as_str(),
            Some("https://gw")
        );
    }
}
