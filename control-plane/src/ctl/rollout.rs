//! `rollout list|status|pause|resume|abort`, and the waves file that
//! `apply --rollout` reads:
//!
//! ```yaml
//! waves:
//!   - selector: {ring: canary}
//!   - percent: 25
//!   - count: 10
//!   - percent: 100
//! gate:
//!   bake: 5m
//!   maxFailed: 0
//! ```

use crate::table::{Table, WIDTH};
use crate::{Failure, Outcome, Output, parse_duration, refused, view};
use clap::Subcommand;
use duofleet_control_plane::client::Clients;
use duofleet_proto::v1::{
    AbortRolloutRequest, Gate, GetRolloutRequest, ListRolloutsRequest, PauseRolloutRequest,
    ResumeRolloutRequest, Rollout, RolloutSpec, RolloutState, WatchRolloutRequest, Wave, WaveState,
};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Every rollout, newest first.
    List,
    /// Per wave: instances, applied, failed, health regressions, the
    /// instances the gate waits for, and its countdown.
    Status {
        id: String,
        /// Follow it with a progress bar until it ends: exit 0 SUCCEEDED,
        /// 1 PAUSED or ABORTED.
        #[arg(long)]
        watch: bool,
    },
    Pause {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// The open wave's gate starts over.
    Resume { id: String },
    /// A revision that puts back what the rollout changed.
    Abort { id: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SpecFile {
    waves: Vec<WaveFile>,
    #[serde(default)]
    gate: Option<GateFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WaveFile {
    #[serde(default)]
    selector: BTreeMap<String, String>,
    #[serde(default)]
    percent: u32,
    #[serde(default)]
    count: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GateFile {
    #[serde(default)]
    bake: Option<String>,
    #[serde(default)]
    max_failed: u32,
    #[serde(default)]
    offline_after: Option<String>,
}

/// The waves file, as the spec the server checks.
pub fn load_spec(path: &Path) -> Result<RolloutSpec, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?;
    let file: SpecFile =
        serde_norway::from_str(&text).map_err(|e| Failure(format!("{}: {e}", path.display())))?;
    let duration = |field: &str, text: Option<&str>| match text {
        None => Ok(None),
        Some(text) => {
            let d = parse_duration(text)
                .map_err(|e| Failure(format!("{}: gate.{field}: {e}", path.display())))?;
            Ok::<_, Failure>(Some(prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: 0,
            }))
        }
    };
    let gate = file.gate.as_ref();
    let bake = duration("bake", gate.and_then(|g| g.bake.as_deref()))?;
    let offline_after = duration(
        "offlineAfter",
        gate.and_then(|g| g.offline_after.as_deref()),
    )?;
    Ok(RolloutSpec {
        waves: file
            .waves
            .into_iter()
            .map(|w| Wave {
                selector: w.selector,
                percent: w.percent,
                count: w.count,
            })
            .collect(),
        gate: Some(Gate {
            bake,
            max_failed: file.gate.map_or(0, |g| g.max_failed),
            offline_after,
        }),
    })
}

fn state_name(rollout: &Rollout) -> &'static str {
    rollout
        .state()
        .as_str_name()
        .trim_start_matches("ROLLOUT_STATE_")
}

fn wave_name(state: WaveState) -> &'static str {
    state.as_str_name().trim_start_matches("WAVE_STATE_")
}

/// "wave 2 of 3" style progress: waves passed / all.
fn progress(rollout: &Rollout) -> String {
    let passed = rollout
        .waves
        .iter()
        .filter(|w| w.state() == WaveState::Passed)
        .count();
    format!("{passed}/{}", rollout.waves.len())
}

pub fn status_text(rollout: &Rollout) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout {}: {} (revision {}, from {}; by {})",
        rollout.id,
        state_name(rollout),
        rollout.revision,
        rollout.base_revision,
        rollout.actor
    );
    let _ = writeln!(out, "change:   {}", rollout.summary);
    let _ = writeln!(out, "profiles: {}", rollout.profiles.join(", "));
    if !rollout.reason.is_empty() {
        let _ = writeln!(out, "reason:   {}", rollout.reason);
    }
    if rollout.abort_revision > 0 {
        let _ = writeln!(
            out,
            "aborted:  revision {} put things back",
            rollout.abort_revision
        );
    }
    let mut table = Table::new(&[
        "WAVE",
        "STATE",
        "INSTANCES",
        "APPLIED",
        "FAILED",
        "REGRESSIONS",
        "GATE",
    ]);
    let now = std::time::SystemTime::now();
    for wave in &rollout.waves {
        let gate = match (wave.state(), &wave.bake_until) {
            (WaveState::Baking, Some(until)) => match std::time::SystemTime::try_from(*until) {
                Ok(until) => match until.duration_since(now) {
                    Ok(left) => format!("bake ends in {}s", left.as_secs()),
                    Err(_) => "bake done".into(),
                },
                Err(_) => "-".into(),
            },
            (WaveState::Applying, _) if wave.waiting_count > 0 => {
                format!("waits for {}", wave.waiting_count)
            }
            (WaveState::Applying, _) => "every instance applied".into(),
            _ => "-".into(),
        };
        table.row(vec![
            (wave.index + 1).to_string(),
            wave_name(wave.state()).into(),
            wave.instances.len().to_string(),
            wave.applied.to_string(),
            wave.failed.to_string(),
            wave.regressions.len().to_string(),
            gate,
        ]);
    }
    out.push_str(&table.render(WIDTH));
    for wave in &rollout.waves {
        for regression in &wave.regressions {
            let _ = writeln!(out, "  wave {}: {regression}", wave.index + 1);
        }
        if wave.state() == WaveState::Applying && !wave.waiting.is_empty() {
            let more = (wave.waiting_count as usize).saturating_sub(wave.waiting.len());
            let _ = writeln!(
                out,
                "  wave {} waits for: {}{}",
                wave.index + 1,
                wave.waiting.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
        }
    }
    out
}

pub async fn run(
    c: &mut Clients,
    command: RolloutCommand,
    output: Output,
) -> Result<Outcome, Failure> {
    let structured = matches!(output, Output::Json | Output::Yaml);
    match command {
        RolloutCommand::List => {
            let rollouts = c
                .rollouts
                .list_rollouts(ListRolloutsRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .rollouts;
            if structured {
                let values = rollouts
                    .iter()
                    .map(|r| serde_json::json!({
                        "id": r.id,
                        "state": r.state().as_str_name(),
                        "revision": r.revision,
                        "baseRevision": r.base_revision,
                        "profiles": r.profiles,
                        "wavesPassed": r.waves.iter().filter(|w| w.state() == WaveState::Passed).count(),
                        "waves": r.waves.len(),
                        "reason": r.reason,
                        "createTime": view::time(&r.create_time),
                    }))
                    .collect();
                view::print_list("rollouts", values, output == Output::Yaml);
                return Ok(Outcome::Done);
            }
            let mut table = Table::new(&["ID", "STATE", "REVISION", "WAVES", "PROFILES", "REASON"]);
            for r in &rollouts {
                table.row(vec![
                    r.id.clone(),
                    state_name(r).into(),
                    r.revision.to_string(),
                    progress(r),
                    r.profiles.join(","),
                    if r.reason.is_empty() {
                        "-".into()
                    } else {
                        r.reason.clone()
                    },
                ]);
            }
            print!("{}", table.render(WIDTH));
            Ok(Outcome::Done)
        }
        RolloutCommand::Status { id, watch } => {
            if !watch {
                let rollout = c
                    .rollouts
                    .get_rollout(GetRolloutRequest { id })
                    .await
                    .map_err(refused)?
                    .into_inner();
                print!("{}", status_text(&rollout));
                return Ok(Outcome::Done);
            }
            let mut updates = c
                .rollouts
                .watch_rollout(WatchRolloutRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} instances applied {msg}",
                )
                .expect("a valid template"),
            );
            let mut last = None;
            while let Some(rollout) = updates.message().await.map_err(refused)? {
                let total: usize = rollout.waves.iter().map(|w| w.instances.len()).sum();
                let applied: usize = rollout
                    .waves
                    .iter()
                    .map(|w| {
                        if w.state() == WaveState::Passed {
                            w.instances.len()
                        } else {
                            w.applied as usize
                        }
                    })
                    .sum();
                bar.set_length(total as u64);
                bar.set_position(applied as u64);
                bar.set_message(format!(
                    "(waves {} {})",
                    progress(&rollout),
                    state_name(&rollout)
                ));
                let state = rollout.state();
                last = Some(rollout);
                if state != RolloutState::Progressing {
                    break;
                }
            }
            bar.finish_and_clear();
            let Some(rollout) = last else {
                return Err(Failure("the rollout stream ended early".into()));
            };
            print!("{}", status_text(&rollout));
            Ok(if rollout.state() == RolloutState::Succeeded {
                Outcome::Done
            } else {
                Outcome::Negative
            })
        }
        RolloutCommand::Pause { id, reason } => {
            let r = c
                .rollouts
                .pause_rollout(PauseRolloutRequest { id, reason })
                .await
                .map_err(refused)?
                .into_inner();
            println!("rollout {} PAUSED: {}", r.id, r.reason);
            Ok(Outcome::Done)
        }
        RolloutCommand::Resume { id } => {
            let r = c
                .rollouts
                .resume_rollout(ResumeRolloutRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "rollout {} {} (waves {})",
                r.id,
                state_name(&r),
                progress(&r)
            );
            Ok(Outcome::Done)
        }
        RolloutCommand::Abort { id } => {
            let r = c
                .rollouts
                .abort_rollout(AbortRolloutRequest { id })
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "rollout {} ABORTED: revision {} puts back what it changed",
                r.id, r.abort_revision
            );
            Ok(Outcome::Done)
        }
    }
}
