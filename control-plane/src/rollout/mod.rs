//! Staged changes. A change made with a rollout commits its revision at
//! once, together with the rollout's record, in one transaction; the
//! instances it changes are split into waves, and until its wave opens an
//! instance keeps receiving the configuration of the revision before (the
//! agent protocol is unchanged: this decides each instance's
//! DesiredConfig). A gate between waves waits until every instance of the
//! open wave applied the revision, then for the bake time; a FAILED
//! instance beyond `max_failed`, or a health target that got worse, pauses
//! the rollout by itself, with the reason.
//!
//! While a rollout is active, the profiles it changes are held: any other
//! change that would alter what their instances receive is refused with
//! FAILED_PRECONDITION naming the rollout (the store's guard). Aborting
//! makes a revision that puts the changed models and profiles back.
//!
//! The records live in the store (`rollouts`) and are written on every
//! transition, so a restart resumes a rollout where it was; only the
//! health baseline of the open wave is taken afresh. A transition is a
//! compare-and-swap on the record as this process last read or wrote it,
//! and takes effect here only once the store has it: a gate that opens a
//! wave and an operator's pause through another replica cannot both
//! land, and an operator hears OK only for a transition that is stored.

use crate::config::Config;
use crate::effective::{self, Labels};
use crate::error::{ConfigError, quoted};
use crate::registry::Registry;
use crate::store::{Attached, Guard, Stage, Store, StoreError, Write};
use duofleet_proto::v1::{
    EndpointHealth, FleetEvent, HealthState, ResourceKind, Rollout, RolloutChanged, RolloutSpec,
    RolloutState, SyncState, TargetKind, WaveState, WaveStatus, fleet_event,
};
use prost::Message;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{broadcast, watch};

mod shared;

/// The bake time when the gate does not say.
pub const DEFAULT_BAKE: Duration = Duration::from_secs(300);
/// The longest bake time (and `offline_after`) accepted.
const MAX_BAKE: Duration = Duration::from_secs(7 * 24 * 3600);

/// How many of the instances a wave waits for its status names.
const WAITING_LISTED: usize = 10;

/// How often an operator's transition is tried again when another
/// writer changed the record first.
const WRITE_ATTEMPTS: usize = 5;

/// How many replaced records an entry remembers (see `Entry::replaced`):
/// more than a watch can lag behind by.
const REPLACED_KEPT: usize = 16;

/// A health target of an instance: (kind, target).
type TargetKey = (i32, String);

struct Entry {
    record: Rollout,
    /// The record's bytes as the store holds them, as this process last
    /// read or wrote them: what the next write expects to replace.
    stored: Vec<u8>,
    /// Hashes of records this process's writes replaced. The store moved
    /// past them, so when a watch still brings one (the echo of a write
    /// made just before, arriving after) it is old news, not a change.
    replaced: Vec<u64>,
    /// The configuration instances keep until their wave opens.
    base: Option<Arc<Config>>,
    /// Instances still on `base`.
    pinned: HashSet<String>,
    /// The open wave's health at its opening (or resumption).
    baseline: HashMap<String, HashMap<TargetKey, i32>>,
    /// An abort is committing: its own revision passes the guard.
    aborting: bool,
}

impl Entry {
    fn active(&self) -> bool {
        matches!(
            self.record.state(),
            RolloutState::Progressing | RolloutState::Paused
        )
    }
}

pub struct Rollouts {
    store: Arc<Store>,
    registry: Arc<Registry>,
    entries: Mutex<BTreeMap<u64, Entry>>,
    /// Bumped whenever instances are released (or pinned again), so that
    /// their streams recompute what they receive.
    epoch: watch::Sender<u64>,
    updates: broadcast::Sender<Rollout>,
    /// When this daemon started: an instance cannot have been seen while
    /// it was down, so OFFLINE time counts from here at the earliest.
    started: SystemTime,
    /// Held from reading a record to installing what replaced it, so that
    /// this process's own writers (the gates, operators) take turns.
    writes: Mutex<()>,
}

pub fn id_of(revision: u64) -> String {
    format!("r-{revision}")
}

fn revision_of(id: &str) -> Option<u64> {
    id.strip_prefix("r-")?.parse().ok()
}

fn now() -> prost_types::Timestamp {
    SystemTime::now().into()
}

fn not_found(id: &str) -> StoreError {
    ConfigError::NotFound {
        kind: "rollout",
        name: id.to_string(),
    }
    .into()
}

/// FNV-1a: a hash that is the same in every process and release, so that
/// "25 % of the fleet" is the same instances after a restart.
fn stable_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The profiles whose instances would receive something else: every
/// profile whose resolved values, or the models they use, differ.
pub fn touched_profiles(old: &Config, new: &Config) -> BTreeSet<String> {
    let names: BTreeSet<&String> = old.profiles.keys().chain(new.profiles.keys()).collect();
    names
        .into_iter()
        .filter(|name| {
            // What the profile's instances receive: its resolved values and
            // the models they use.
            let view = |config: &Config| {
                config.profiles.get(*name).map(|p| {
                    let mut resolved = effective::resolve(config, p);
                    resolved.sources.clear();
                    let models: Vec<_> = resolved
                        .features
                        .iter()
                        .filter_map(|s| config.models.get(&s.model))
                        .map(|m| {
                            (
                                m.name.clone(),
                                m.family.clone(),
                                m.endpoint.clone(),
                                m.identifier.clone(),
                                m.provider.clone(),
                                m.api_key.clone(),
                            )
                        })
                        .collect();
                    (resolved, models)
                })
            };
            view(old) != view(new)
        })
        .cloned()
        .collect()
}

fn invalid(field: String, rule: impl Into<String>) -> ConfigError {
    ConfigError::invalid(field, rule)
}

/// Checks a rollout spec; every refusal names its field.
pub fn validate_spec(spec: &RolloutSpec) -> Result<(), ConfigError> {
    if spec.waves.is_empty() {
        return Err(invalid(
            "rollout.waves".into(),
            "at least one wave: a selector, a percent or a count",
        ));
    }
    if spec.waves.len() > 20 {
        return Err(invalid("rollout.waves".into(), "at most 20 waves"));
    }
    for (i, wave) in spec.waves.iter().enumerate() {
        let set = [!wave.selector.is_empty(), wave.percent > 0, wave.count > 0]
            .iter()
            .filter(|s| **s)
            .count();
        if set != 1 {
            return Err(invalid(
                format!("rollout.waves[{i}]"),
                "exactly one of selector, percent or count",
            ));
        }
        if wave.percent > 100 {
            return Err(invalid(
                format!("rollout.waves[{i}].percent"),
                format!("must be 1 to 100 (got {})", wave.percent),
            ));
        }
        crate::validate::selector(&format!("rollout.waves[{i}].selector"), &wave.selector)?;
    }
    let gate = spec.gate.as_ref();
    for (field, value) in [
        ("rollout.gate.bake", gate.and_then(|g| g.bake)),
        (
            "rollout.gate.offline_after",
            gate.and_then(|g| g.offline_after),
        ),
    ] {
        let Some(value) = value else { continue };
        let value =
            Duration::try_from(value).map_err(|_| invalid(field.into(), "must not be negative"))?;
        if value > MAX_BAKE {
            return Err(invalid(field.into(), "must be at most 7 days"));
        }
    }
    Ok(())
}

/// How long an instance may be OFFLINE before the gate counts it as
/// FAILED; `None`: the gate waits for it.
fn offline_after(spec: &RolloutSpec) -> Option<Duration> {
    spec.gate
        .as_ref()
        .and_then(|g| g.offline_after)
        .and_then(|d| Duration::try_from(d).ok())
}

fn bake_of(spec: &RolloutSpec) -> Duration {
    spec.gate
        .as_ref()
        .and_then(|g| g.bake)
        .and_then(|b| Duration::try_from(b).ok())
        .unwrap_or(DEFAULT_BAKE)
}

/// How long an instance has been away: since it was last seen, or since
/// `started` when that is later (a restart of the daemon is not time the
/// host was down); zero when it was never seen.
fn offline_for(last_seen: Option<prost_types::Timestamp>, started: SystemTime) -> Duration {
    last_seen
        .and_then(|t| SystemTime::try_from(t).ok())
        .map(|t| t.max(started))
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .unwrap_or_default()
}

fn max_failed(spec: &RolloutSpec) -> u32 {
    spec.gate.as_ref().map_or(0, |g| g.max_failed)
}

/// Splits `instances` (id, labels) into the spec's waves, in order; what
/// no wave takes goes with the last.
fn assign_waves(spec: &RolloutSpec, instances: &[(String, Labels)]) -> Vec<Vec<String>> {
    let mut remaining: Vec<&(String, Labels)> = instances.iter().collect();
    remaining.sort_by_key(|(id, _)| (stable_hash(id), id.clone()));
    let mut waves = Vec::new();
    for wave in &spec.waves {
        let take: Vec<String> = if !wave.selector.is_empty() {
            remaining
                .iter()
                .filter(|(_, labels)| wave.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))
                .map(|(id, _)| id.clone())
                .collect()
        } else {
            let n = if wave.percent > 0 {
                (remaining.len() * wave.percent as usize).div_ceil(100)
            } else {
                (wave.count as usize).min(remaining.len())
            };
            remaining.iter().take(n).map(|(id, _)| id.clone()).collect()
        };
        remaining.retain(|(id, _)| !take.contains(id));
        waves.push(take);
    }
    if let Some(last) = waves.last_mut() {
        last.extend(remaining.into_iter().map(|(id, _)| id.clone()));
        last.sort();
    }
    for wave in &mut waves {
        wave.sort();
    }
    waves
}

/// A target as the gate compares it: a gateway by its kind (a change of
/// URL is the same gateway, better or worse), a model by its name.
fn logical(kind: i32, target: &str) -> TargetKey {
    match TargetKind::try_from(kind) {
        Ok(TargetKind::AiGateway | TargetKind::AiGatewayInternal) => (kind, String::new()),
        _ => (kind, target.to_string()),
    }
}

/// The health of an instance's targets, by logical target.
fn health_of(health: &[EndpointHealth]) -> HashMap<TargetKey, i32> {
    health
        .iter()
        .map(|h| (logical(h.kind, &h.target), h.state))
        .collect()
}

impl Rollouts {
    /// Loads the rollouts the store holds and resumes the active ones.
    pub fn open(store: Arc<Store>, registry: Arc<Registry>) -> Result<Arc<Rollouts>, StoreError> {
        let mut entries = BTreeMap::new();
        for (key, value) in store.load_rollouts()? {
            let record =
                Rollout::decode(value.as_slice()).map_err(|source| StoreError::Corrupt {
                    what: format!("rollout {key}"),
                    source,
                })?;
            let mut entry = Entry {
                base: None,
                pinned: pinned_of(&record),
                baseline: HashMap::new(),
                aborting: false,
                record,
                stored: value,
                replaced: Vec::new(),
            };
            if entry.active() {
                entry.base = Some(Arc::new(
                    store.config_at_revision(entry.record.base_revision)?,
                ));
                tracing::info!(rollout = %entry.record.id, state = ?entry.record.state(), "resuming rollout");
            }
            entries.insert(entry.record.revision, entry);
        }
        let rollouts = Arc::new(Rollouts {
            store,
            registry,
            entries: Mutex::new(entries),
            epoch: watch::Sender::new(0),
            updates: broadcast::Sender::new(256),
            started: SystemTime::now(),
            writes: Mutex::new(()),
        });
        // Baselines for the open waves, from what the registry knows now.
        {
            let mut entries = rollouts.lock();
            for entry in entries.values_mut().filter(|e| e.active()) {
                rollouts.rebaseline(entry);
            }
        }
        Ok(rollouts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The check every change passes (see `Store::set_guard`): one that
    /// alters what a held profile's instances receive is refused.
    pub fn guard(self: &Arc<Self>) -> Guard {
        let rollouts = Arc::downgrade(self);
        Arc::new(move |old: &Config, new: &Config| {
            let Some(rollouts) = rollouts.upgrade() else {
                return Ok(());
            };
            rollouts.check_unheld(&touched_profiles(old, new))
        })
    }

    fn check_unheld(&self, touched: &BTreeSet<String>) -> Result<(), ConfigError> {
        let entries = self.lock();
        for entry in entries.values().filter(|e| e.active() && !e.aborting) {
            if let Some(profile) = entry.record.profiles.iter().find(|p| touched.contains(*p)) {
                return Err(ConfigError::Blocked(format!(
                    "profile {} is being rolled out by rollout {} ({}): change it through that rollout, or pause, abort or finish it first",
                    quoted(profile),
                    entry.record.id,
                    entry
                        .record
                        .state()
                        .as_str_name()
                        .trim_start_matches("ROLLOUT_STATE_")
                )));
            }
        }
        Ok(())
    }

    /// A staged change's stage (see `Stage::Staged`): checks the spec and
    /// the holds, plans the waves, and (unless `validate_only`) registers
    /// the rollout before its revision is published. Returns the record to
    /// commit with the revision; `None` when the change alters no
    /// instance's configuration (it then applies as an ordinary change).
    pub fn stage<'a>(
        self: &'a Arc<Self>,
        spec: RolloutSpec,
        actor: String,
        validate_only: bool,
        planned: &'a Mutex<Option<Rollout>>,
    ) -> Stage<'a> {
        Stage::Staged(Box::new(
            move |old: &Config, new: &Config, revision: u64| {
                validate_spec(&spec)?;
                let touched = touched_profiles(old, new);
                self.check_unheld(&touched)?;
                let affected: Vec<(String, Labels)> = self
                    .registry
                    .list(&Labels::new())
                    .into_iter()
                    .filter(|i| {
                        let labels: Labels = i.labels.clone();
                        !effective::same_content(
                            &effective::desired_config(old, &labels),
                            &effective::desired_config(new, &labels),
                        )
                    })
                    .map(|i| (i.instance_id, i.labels))
                    .collect();
                let waves = assign_waves(&spec, &affected);
                let opened = now();
                let record = Rollout {
                    id: id_of(revision),
                    state: if affected.is_empty() {
                        RolloutState::Succeeded
                    } else {
                        RolloutState::Progressing
                    } as i32,
                    revision,
                    base_revision: old.revision,
                    profiles: touched.into_iter().collect(),
                    actor: actor.clone(),
                    summary: String::new(),
                    waves: waves
                        .iter()
                        .enumerate()
                        .map(|(index, instances)| WaveStatus {
                            index: index as u32,
                            state: if affected.is_empty() {
                                WaveState::Passed
                            } else if index == 0 {
                                WaveState::Applying
                            } else {
                                WaveState::Waiting
                            } as i32,
                            instances: instances.clone(),
                            open_time: (index == 0).then_some(opened),
                            ..Default::default()
                        })
                        .collect(),
                    spec: Some(spec.clone()),
                    create_time: Some(opened),
                    update_time: Some(opened),
                    ..Default::default()
                };
                *planned.lock().unwrap_or_else(|e| e.into_inner()) = Some(record.clone());
                if validate_only {
                    return Ok(None);
                }
                let value = record.encode_to_vec();
                let mut entry = Entry {
                    base: Some(Arc::new(old.clone())),
                    pinned: pinned_of(&record),
                    baseline: HashMap::new(),
                    aborting: false,
                    record: record.clone(),
                    stored: value.clone(),
                    replaced: Vec::new(),
                };
                self.rebaseline(&mut entry);
                self.lock().insert(revision, entry);
                Ok(Some(Attached {
                    key: record.id.clone(),
                    value,
                }))
            },
        ))
    }

    /// After the commit: the record gets the revision's summary; on a
    /// failed commit the registered rollout goes away.
    pub fn committed(
        &self,
        revision: Option<&duofleet_proto::v1::Revision>,
        planned: Option<Rollout>,
    ) -> Option<Rollout> {
        let planned = planned?;
        let Some(revision) = revision else {
            // Nothing changed: no revision, no rollout.
            self.lock().remove(&planned.revision);
            return None;
        };
        let summary = revision.summary.clone();
        let record = match self.write(revision.revision, |record| {
            record.summary = summary.clone();
            Ok(())
        }) {
            Ok(record) => record,
            Err(error) => {
                // The change and its rollout are committed; only the
                // summary is missing from the stored record.
                tracing::error!(rollout = %id_of(revision.revision), error = %crate::error::error_chain(&error), "cannot save the rollout's summary");
                self.get(&id_of(revision.revision)).ok()?
            }
        };
        tracing::info!(rollout = %record.id, waves = record.waves.len(), profiles = ?record.profiles, "rollout started");
        Some(record)
    }

    /// The commit failed: forget what `stage` registered.
    pub fn forget(&self, planned: Option<Rollout>) {
        if let Some(planned) = planned {
            self.lock().remove(&planned.revision);
        }
    }

    /// The configuration `instance_id` follows now: the previous one while
    /// a rollout holds it back, otherwise `current`.
    pub fn config_for(&self, instance_id: &str, current: &Arc<Config>) -> Arc<Config> {
        self.lock()
            .values()
            .filter(|e| e.active() && e.pinned.contains(instance_id))
            .find_map(|e| e.base.clone())
            .unwrap_or_else(|| current.clone())
    }

    pub fn subscribe_epoch(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Rollout> {
        self.updates.subscribe()
    }

    fn bump(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    /// Changes a rollout's record durably: `change` edits a copy of the
    /// record as stored, which replaces it only if no one wrote it since;
    /// otherwise the stored record is read again and `change` runs on that
    /// (it may refuse now: a rollout another replica paused cannot be
    /// paused again). This process's memory changes once the store has.
    fn write(
        &self,
        revision: u64,
        mut change: impl FnMut(&mut Rollout) -> Result<(), ConfigError>,
    ) -> Result<Rollout, StoreError> {
        let _writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let id = id_of(revision);
        for _ in 0..WRITE_ATTEMPTS {
            let (expected, mut record) = {
                let entries = self.lock();
                let entry = entries.get(&revision).ok_or_else(|| not_found(&id))?;
                (entry.stored.clone(), entry.record.clone())
            };
            change(&mut record)?;
            record.update_time = Some(now());
            if let Some(record) = self.swap(revision, &expected, record)? {
                return Ok(record);
            }
        }
        Err(StoreError::RolloutContended {
            id,
            attempts: WRITE_ATTEMPTS,
        })
    }

    /// Writes `record` over the stored `expected`, then takes it up here
    /// (instances released or held, the baseline, watchers told). `None`
    /// when another writer came first: the stored record is read again and
    /// taken up instead.
    fn swap(
        &self,
        revision: u64,
        expected: &[u8],
        record: Rollout,
    ) -> Result<Option<Rollout>, StoreError> {
        let new = record.encode_to_vec();
        if !self.store.swap_rollout(&record.id, expected, &new)? {
            match self.store.load_rollout(&record.id)? {
                Some(raw) => self.take(&record.id, &raw),
                None => return Err(not_found(&record.id)),
            }
            return Ok(None);
        }
        let released = {
            let mut entries = self.lock();
            let entry = entries
                .get_mut(&revision)
                .ok_or_else(|| not_found(&record.id))?;
            let pinned = pinned_of(&record);
            let released = entry.pinned != pinned;
            let state_changed = entry.record.state != record.state;
            entry.pinned = pinned;
            entry.record = record.clone();
            entry.replaced.push(digest(expected));
            if entry.replaced.len() > REPLACED_KEPT {
                entry.replaced.remove(0);
            }
            entry.stored = new;
            if released || state_changed {
                self.rebaseline(entry);
            }
            released
        };
        if released {
            self.bump();
        }
        self.announce(&record);
        Ok(Some(record))
    }

    /// Tells WatchRollout and WatchFleet.
    fn announce(&self, record: &Rollout) {
        let _ = self.updates.send(record.clone());
        let wave = record
            .waves
            .iter()
            .position(|w| w.state() != WaveState::Passed)
            .unwrap_or(record.waves.len().saturating_sub(1)) as u32;
        self.registry.announce(FleetEvent {
            time: Some(now()),
            event: Some(fleet_event::Event::RolloutChanged(RolloutChanged {
                id: record.id.clone(),
                state: record.state,
                wave,
                reason: record.reason.clone(),
            })),
        });
    }

    /// The open wave's health baseline, from the registry now.
    fn rebaseline(&self, entry: &mut Entry) {
        entry.baseline.clear();
        if let Some(wave) = entry
            .record
            .waves
            .iter()
            .find(|w| matches!(w.state(), WaveState::Applying | WaveState::Baking))
        {
            for id in &wave.instances {
                if let Some(health) = self.registry.peek(id, |i| health_of(&i.health)) {
                    entry.baseline.insert(id.clone(), health);
                }
            }
        }
    }

    pub fn get(&self, id: &str) -> Result<Rollout, StoreError> {
        let revision = revision_of(id).ok_or_else(|| not_found(id))?;
        self.lock()
            .get(&revision)
            .map(|e| e.record.clone())
            .ok_or_else(|| not_found(id))
    }

    /// [`Rollouts::get`] for an operator: a rollout started through
    /// another replica moments ago is found even before this replica's
    /// watch brought its revision.
    pub fn get_fresh(&self, id: &str) -> Result<Rollout, StoreError> {
        match self.get(id) {
            Err(StoreError::Config(ConfigError::NotFound { .. })) => {
                self.store.fresh()?;
                self.get(id)
            }
            found => found,
        }
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Rollout> {
        self.lock()
            .values()
            .rev()
            .map(|e| e.record.clone())
            .collect()
    }

    /// Runs the gates once: counts, pauses, bake times, waves opening.
    /// With replicas every replica counts (each sees the whole fleet), so
    /// that any of them shows a wave's progress as it goes; only the leader
    /// moves a gate.
    pub fn tick(&self) {
        let leads = self.store.leads();
        let _writes = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        // Transitions: (revision, the stored bytes, the new record).
        let mut transitions = Vec::new();
        let mut counted = Vec::new();
        {
            let mut entries = self.lock();
            for (revision, entry) in entries.iter_mut() {
                if entry.record.state() != RolloutState::Progressing {
                    continue;
                }
                let mut record = entry.record.clone();
                let transition = self.evaluate(&mut record, &mut entry.baseline);
                if record == entry.record {
                    continue;
                }
                record.update_time = Some(now());
                if transition.persist {
                    if leads {
                        transitions.push((*revision, entry.stored.clone(), record));
                    }
                } else {
                    // Counts only: kept in memory, shown to watchers.
                    entry.record = record.clone();
                    counted.push(record);
                }
            }
        }
        for record in counted {
            let _ = self.updates.send(record);
        }
        for (revision, expected, record) in transitions {
            let id = record.id.clone();
            match self.swap(revision, &expected, record) {
                Ok(Some(record)) => log_gate(&record),
                // Another writer came first; the next tick looks again.
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(rollout = %id, error = %crate::error::error_chain(&error), "cannot save the rollout's gate transition; the gate tries again")
                }
            }
        }
    }

    /// The gate of the open wave, on `record`: its counts, and the
    /// transition they call for (`persist`). `baseline` is the open wave's
    /// health at its opening; instances without one get their first
    /// report as theirs.
    fn evaluate(
        &self,
        record: &mut Rollout,
        baseline: &mut HashMap<String, HashMap<TargetKey, i32>>,
    ) -> Transition {
        let mut transition = Transition::default();
        let spec = record.spec.clone().unwrap_or_default();
        let Some(index) = record
            .waves
            .iter()
            .position(|w| w.state() != WaveState::Passed)
        else {
            record.state = RolloutState::Succeeded as i32;
            transition.persist = true;
            return transition;
        };
        let revision = record.revision;
        let mut applied = 0;
        let mut failed = Vec::new();
        let mut regressions = Vec::new();
        let mut present = 0;
        let mut waiting = Vec::new();
        let offline = offline_after(&spec);
        for id in &record.waves[index].instances {
            // An instance deleted meanwhile no longer counts.
            // What the gate reads, without copying the whole record.
            let Some((state, applied_revision, last_error, health, last_seen)) =
                self.registry.peek(id, |i| {
                    (
                        i.sync_state(),
                        i.applied_revision,
                        (i.sync_state() == SyncState::Failed).then(|| i.last_error.clone()),
                        i.health.clone(),
                        i.last_seen,
                    )
                })
            else {
                continue;
            };
            present += 1;
            match state {
                SyncState::Synced if applied_revision >= revision => applied += 1,
                SyncState::Failed => {
                    failed.push(format!("{id} ({})", last_error.unwrap_or_default()))
                }
                SyncState::Offline
                    if offline
                        .is_some_and(|after| offline_for(last_seen, self.started) >= after) =>
                {
                    failed.push(format!(
                        "{id} (OFFLINE for {}s)",
                        offline_for(last_seen, self.started).as_secs()
                    ))
                }
                SyncState::Synced => waiting.push(format!("{id} (SYNCED at {applied_revision})")),
                other => waiting.push(format!("{id} ({})", other.word())),
            }
            // No report yet at the opening: the first one is the baseline.
            if baseline.get(id).is_none_or(|b| b.is_empty()) {
                baseline.insert(id.clone(), health_of(&health));
            }
            let baseline = &baseline[id];
            for h in &health {
                if h.state() != HealthState::Unhealthy {
                    continue;
                }
                let before = baseline.get(&logical(h.kind, &h.target));
                let worse = match before {
                    Some(before) => *before != HealthState::Unhealthy as i32,
                    // A model the change brought that does not answer.
                    None => h.kind() == TargetKind::Model,
                };
                if worse {
                    let was = match before.map(|s| HealthState::try_from(*s)) {
                        Some(Ok(HealthState::Healthy)) => "healthy",
                        Some(_) => "unknown",
                        None => "not probed",
                    };
                    regressions.push(format!(
                        "{id}: {} {was} -> unhealthy ({})",
                        h.target, h.error
                    ));
                }
            }
        }
        let wave = &mut record.waves[index];
        wave.applied = applied;
        wave.failed = failed.len() as u32;
        wave.regressions = regressions.clone();
        // The wave's instances are kept sorted by id.
        wave.waiting_count = waiting.len() as u32;
        waiting.truncate(WAITING_LISTED);
        wave.waiting = waiting;
        let limit = max_failed(&spec);
        if failed.len() as u32 > limit {
            record.state = RolloutState::Paused as i32;
            record.reason = format!(
                "wave {} gate: {} instances FAILED, more than max_failed {limit}: {}",
                index + 1,
                failed.len(),
                failed.join("; ")
            );
            transition.persist = true;
            return transition;
        }
        if !regressions.is_empty() {
            record.state = RolloutState::Paused as i32;
            record.reason = format!(
                "wave {} gate: health got worse: {}",
                index + 1,
                regressions.join("; ")
            );
            transition.persist = true;
            return transition;
        }
        let settled = applied + failed.len() as u32 >= present;
        match wave.state() {
            WaveState::Applying if settled => {
                wave.state = WaveState::Baking as i32;
                wave.bake_until = Some((SystemTime::now() + bake_of(&spec)).into());
                transition.persist = true;
            }
            WaveState::Baking if !settled => {
                // Someone fell back (e.g. a new revision is applying): wait again.
                wave.state = WaveState::Applying as i32;
                wave.bake_until = None;
                transition.persist = true;
            }
            WaveState::Baking => {
                let due = wave
                    .bake_until
                    .and_then(|t| SystemTime::try_from(t).ok())
                    .is_none_or(|t| SystemTime::now() >= t);
                if due {
                    wave.state = WaveState::Passed as i32;
                    transition.persist = true;
                    if let Some(next) = record.waves.get_mut(index + 1) {
                        next.state = WaveState::Applying as i32;
                        next.open_time = Some(now());
                    } else {
                        record.state = RolloutState::Succeeded as i32;
                    }
                }
            }
            _ => {}
        }
        transition
    }

    pub fn pause(&self, id: &str, reason: &str) -> Result<Rollout, StoreError> {
        self.transition(id, |record| {
            if record.state() != RolloutState::Progressing {
                return Err(not_active(record, "pause"));
            }
            record.state = RolloutState::Paused as i32;
            record.reason = if reason.is_empty() {
                "paused by an operator".into()
            } else {
                reason.to_string()
            };
            Ok(())
        })
    }

    /// The open wave's gate starts over: a new health baseline, a new bake.
    pub fn resume(&self, id: &str) -> Result<Rollout, StoreError> {
        self.transition(id, |record| {
            if record.state() != RolloutState::Paused {
                return Err(not_active(record, "resume"));
            }
            record.state = RolloutState::Progressing as i32;
            record.reason.clear();
            if let Some(wave) = record
                .waves
                .iter_mut()
                .find(|w| w.state() == WaveState::Baking)
            {
                wave.state = WaveState::Applying as i32;
                wave.bake_until = None;
            }
            Ok(())
        })
        .inspect(|_| self.tick())
    }

    /// An operator's pause or resume, durably (see [`Rollouts::write`]).
    fn transition(
        &self,
        id: &str,
        change: impl FnMut(&mut Rollout) -> Result<(), ConfigError>,
    ) -> Result<Rollout, StoreError> {
        let revision = revision_of(id).ok_or_else(|| not_found(id))?;
        let record = self.write(revision, change)?;
        tracing::info!(rollout = %record.id, state = ?record.state(), reason = %record.reason, "rollout changed");
        Ok(record)
    }

    /// Ends the rollout with a revision that puts back what it changed.
    pub fn abort(&self, id: &str, actor: &str) -> Result<Rollout, StoreError> {
        let revision = revision_of(id).ok_or_else(|| not_found(id))?;
        let base = {
            let mut entries = self.lock();
            let entry = entries.get_mut(&revision).ok_or_else(|| not_found(id))?;
            if !entry.active() {
                return Err(not_active(&entry.record, "abort").into());
            }
            entry.aborting = true;
            entry.base.clone().expect("active rollouts have a base")
        };
        let record = self.store.revision_record(revision);
        let result = record.and_then(|record| {
            let changes = record.changes.clone();
            self.store.change_with(
                actor,
                Write::default(),
                Stage::Unguarded,
                move |config, _| {
                    let mut restored = Vec::new();
                    for change in &changes {
                        match change.kind() {
                            ResourceKind::Model => {
                                match base.models.get(&change.name) {
                                    Some(model) => {
                                        let mut model = model.clone();
                                        // Credentials are never put back (as Rollback).
                                        model.api_key = config
                                            .models
                                            .get(&change.name)
                                            .map(|m| m.api_key.clone())
                                            .unwrap_or_default();
                                        config.models.insert(change.name.clone(), model);
                                    }
                                    None => {
                                        config.models.remove(&change.name);
                                    }
                                }
                                restored.push(format!("model {}", change.name));
                            }
                            ResourceKind::Profile => {
                                match base.profiles.get(&change.name) {
                                    Some(profile) => {
                                        config
                                            .profiles
                                            .insert(change.name.clone(), profile.clone());
                                    }
                                    None => {
                                        config.profiles.remove(&change.name);
                                    }
                                }
                                restored.push(format!("profile {}", change.name));
                            }
                            ResourceKind::Unspecified => {}
                        }
                    }
                    Ok(format!(
                        "abort rollout {}: {} back as at revision {}",
                        id_of(revision),
                        restored.join(", "),
                        base.revision
                    ))
                },
            )
        });
        let commit = match result {
            Ok(commit) => commit,
            Err(error) => {
                if let Some(entry) = self.lock().get_mut(&revision) {
                    entry.aborting = false;
                }
                return Err(error);
            }
        };
        let abort_revision = commit.revision.as_ref().map_or(0, |r| r.revision);
        let written = self.write(revision, |record| {
            record.state = RolloutState::Aborted as i32;
            record.reason = format!("aborted by {actor}");
            record.abort_revision = abort_revision;
            Ok(())
        });
        if let Some(entry) = self.lock().get_mut(&revision) {
            entry.aborting = false;
        }
        let record = written?;
        tracing::info!(rollout = %record.id, abort_revision = record.abort_revision, "rollout aborted");
        Ok(record)
    }

    /// `duofleet_rollout_instances{rollout,state}` for the active rollouts:
    /// waiting (not released), applying, applied, failed.
    pub fn render_metrics(&self, out: &mut String) {
        let mut series = Vec::new();
        for entry in self.lock().values().filter(|e| e.active()) {
            let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
            for wave in &entry.record.waves {
                let total = wave.instances.len() as u64;
                match wave.state() {
                    WaveState::Waiting => *counts.entry("waiting").or_default() += total,
                    WaveState::Passed => *counts.entry("applied").or_default() += total,
                    _ => {
                        *counts.entry("applied").or_default() += wave.applied as u64;
                        *counts.entry("failed").or_default() += wave.failed as u64;
                        *counts.entry("applying").or_default() +=
                            total.saturating_sub(wave.applied as u64 + wave.failed as u64);
                    }
                }
            }
            for state in ["waiting", "applying", "applied", "failed"] {
                series.push((
                    format!("rollout=\"{}\",state=\"{state}\"", entry.record.id),
                    counts.get(state).copied().unwrap_or(0),
                ));
            }
        }
        let values: Vec<(&str, u64)> = series.iter().map(|(l, v)| (l.as_str(), *v)).collect();
        crate::metrics::gauge(
            out,
            "duofleet_rollout_instances",
            "Instances of each active rollout by state: waiting (not released yet), applying, applied, failed.",
            &values,
        );
    }
}

/// What a gate did, once it is stored.
fn log_gate(record: &Rollout) {
    let open = record
        .waves
        .iter()
        .position(|w| w.state() != WaveState::Passed);
    match (record.state(), open) {
        (RolloutState::Paused, _) => {
            tracing::warn!(rollout = %record.id, reason = %record.reason, "rollout paused")
        }
        (RolloutState::Succeeded, _) => tracing::info!(rollout = %record.id, "rollout succeeded"),
        (_, Some(index)) => {
            let wave = &record.waves[index];
            tracing::info!(rollout = %record.id, wave = index + 1, state = ?wave.state(), instances = wave.instances.len(), "rollout wave")
        }
        (state, None) => tracing::info!(rollout = %record.id, ?state, "rollout changed"),
    }
}

#[derive(Default)]
struct Transition {
    persist: bool,
}

/// A record's bytes, hashed (within this process).
fn digest(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// The instances a rollout holds on its base configuration: those of its
/// waves still waiting, while it is active.
fn pinned_of(record: &Rollout) -> HashSet<String> {
    if !matches!(
        record.state(),
        RolloutState::Progressing | RolloutState::Paused
    ) {
        return HashSet::new();
    }
    record
        .waves
        .iter()
        .filter(|w| w.state() == WaveState::Waiting)
        .flat_map(|w| w.instances.iter().cloned())
        .collect()
}

fn not_active(record: &Rollout, action: &str) -> ConfigError {
    ConfigError::Blocked(format!(
        "cannot {action} rollout {}: it is {}",
        record.id,
        record
            .state()
            .as_str_name()
            .trim_start_matches("ROLLOUT_STATE_")
    ))
}

/// Runs the gates every `period` until the process ends.
pub fn spawn_gates(rollouts: Arc<Rollouts>, period: Duration) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        loop {
            ticker.tick().await;
            let rollouts = rollouts.clone();
            let _ = tokio::task::spawn_blocking(move || rollouts.tick()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use duofleet_proto::v1::{Gate, Wave};

    fn instances(n: usize) -> Vec<(String, Labels)> {
        (0..n)
            .map(|i| {
                let mut labels = Labels::new();
                if i < 2 {
                    labels.insert("ring".into(), "canary".into());
                }
                (format!("gitlab-{i:02}"), labels)
            })
            .collect()
    }

    #[test]
    fn offline_time_counts_from_the_daemons_start_at_the_earliest() {
        let now = SystemTime::now();
        let ago = |secs: u64| Some((now - Duration::from_secs(secs)).into());
        let long_ago = now - Duration::from_secs(3600);
        let away = offline_for(ago(600), long_ago);
        assert!((600..605).contains(&away.as_secs()), "{away:?}");
        // Seen 10 minutes ago, but the daemon started a minute ago.
        let away = offline_for(ago(600), now - Duration::from_secs(60));
        assert!((60..65).contains(&away.as_secs()), "{away:?}");
        assert_eq!(offline_for(None, long_ago), Duration::ZERO);
    }

    #[test]
    fn gate_durations_are_refused_by_name_when_negative_or_over_a_week() {
        let with_gate = |gate: Gate| RolloutSpec {
            waves: vec![Wave {
                percent: 100,
                ..Default::default()
            }],
            gate: Some(gate),
        };
        let secs = |seconds: i64| Some(prost_types::Duration { seconds, nanos: 0 });
        let refusal = |gate: Gate| validate_spec(&with_gate(gate)).unwrap_err().to_string();
        let week = 7 * 24 * 3600;
        assert!(
            validate_spec(&with_gate(Gate {
                bake: secs(600),
                offline_after: secs(week),
                ..Default::default()
            }))
            .is_ok()
        );
        for (gate, field, rule) in [
            (
                Gate {
                    offline_after: secs(week + 1),
                    ..Default::default()
                },
                "rollout.gate.offline_after",
                "must be at most 7 days",
            ),
            (
                Gate {
                    offline_after: secs(-1),
                    ..Default::default()
                },
                "rollout.gate.offline_after",
                "must not be negative",
            ),
            (
                Gate {
                    bake: secs(week + 1),
                    ..Default::default()
                },
                "rollout.gate.bake",
                "must be at most 7 days",
            ),
        ] {
            let refusal = refusal(gate);
            assert!(
                refusal.contains(field) && refusal.contains(rule),
                "{refusal}"
            );
        }
    }

    #[test]
    fn waves_take_a_selector_then_a_stable_share_then_the_rest() {
        let spec = RolloutSpec {
            waves: vec![
                Wave {
                    selector: [("ring".to_string(), "canary".to_string())].into(),
                    ..Default::default()
                },
                Wave {
                    percent: 25,
                    ..Default::default()
                },
                Wave {
                    count: 2,
                    ..Default::default()
                },
            ],
            gate: None,
        };
        let waves = assign_waves(&spec, &instances(10));
        assert_eq!(waves[0], ["gitlab-00", "gitlab-01"]);
        assert_eq!(waves[1].len(), 2, "25 % of the 8 left");
        // The last wave takes what is left: 2 + the 4 no wave took.
        assert_eq!(waves[2].len(), 6);
        // The same instances every time.
        assert_eq!(assign_waves(&spec, &instances(10)), waves);
        let all: BTreeSet<&String> = waves.iter().flatten().collect();
        assert_eq!(all.len(), 10);
    }

    #[test]
    fn specs_are_checked_field_by_field() {
        let err = validate_spec(&RolloutSpec::default()).unwrap_err();
        assert!(err.to_string().starts_with("rollout.waves:"), "{err}");
        let err = validate_spec(&RolloutSpec {
            waves: vec![Wave {
                percent: 20,
                count: 3,
                ..Default::default()
            }],
            gate: None,
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rollout.waves[0]: exactly one of selector, percent or count"
        );
        let err = validate_spec(&RolloutSpec {
            waves: vec![Wave {
                percent: 120,
                ..Default::default()
            }],
            gate: None,
        })
        .unwrap_err();
        assert!(
            err.to_string().starts_with("rollout.waves[0].percent:"),
            "{err}"
        );
    }
}
