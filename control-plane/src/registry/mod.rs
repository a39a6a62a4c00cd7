//! The fleet: every instance whose agent has connected, its connection, the
//! revision it should have and the one it applied. Agents' sessions report
//! here; FleetService reads from here. Stale sessions (an agent replaced by
//! a newer connection with the same instance id) are ignored.

use crate::effective::Labels;
use crate::labels::LabelGrant;
use crate::metrics::{self, Metrics};
use crate::store::{Store, StoreError};
use crate::wake::TaskWaker;
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::{
    Ack, AckResult, DriftReport, EndpointHealth, FleetEvent, HealthReport, HealthState, Hello,
    Instance, InstanceEvent, LabelsChanged, SyncState,
};
use prost::Message;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, oneshot, watch};

mod saving;
mod shared;
mod transitions;

use transitions::Transitions;

/// An instance's entry. Locked after the map, when both are.
type Handle = Arc<Mutex<Entry>>;

fn lock_entry(handle: &Handle) -> std::sync::MutexGuard<'_, Entry> {
    handle.lock().unwrap_or_else(|e| e.into_inner())
}

struct Entry {
    /// Its health transitions are kept in `transitions`, not here.
    instance: Instance,
    /// The last health state changes.
    transitions: Transitions,
    session: u64,
    /// Fired when a newer connection for the same instance takes over, or
    /// the instance is deleted.
    kick: Option<oneshot::Sender<()>>,
    failed: bool,
    drifted: bool,
    /// The revision last pushed and when, for the push-to-ack histogram.
    pushed: Option<(u64, Instant)>,
    /// Changed since it was last saved: since when.
    dirty: Option<Instant>,
    /// To be saved at the next save, whatever the interval: the instance is
    /// new, or a refused claim is shown on it.
    urgent: bool,
    /// When it falls due to be saved (its turn in the saver's queue),
    /// while it is unsaved: set with `dirty`, brought forward when urgent.
    queued: Option<Instant>,
    /// The host last warned about for claiming this instance id.
    warned_conflict: Option<String>,
    /// Tells the live session when an operator changes the labels.
    labels_tx: Option<Relabels>,
    /// A DesiredConfig was sent and not acked yet.
    awaiting_ack: bool,
    /// The last results per target, oldest first, for the dashboard's
    /// latency charts (memory only).
    latency: HashMap<(i32, String), VecDeque<LatencySample>>,
    /// Its agent is connected to this replica.
    here: bool,
    /// The sync state in the last record another replica saved of it.
    reported: i32,
}

impl Entry {
    /// The instance with its health transitions, as the API and the
    /// records have it.
    fn record(&self) -> Instance {
        let mut instance = self.instance.clone();
        instance.health_transitions = self.transitions.to_records();
        instance
    }

    /// `record()`, encoded, without copying the instance.
    fn encode_record(&mut self) -> Vec<u8> {
        self.instance.health_transitions = self.transitions.to_records();
        let bytes = self.instance.encode_to_vec();
        self.instance.health_transitions = Vec::new();
        bytes
    }

    /// An instance known from a record, its agent not connected here.
    fn blank() -> Entry {
        Entry {
            instance: Instance::default(),
            transitions: Transitions::default(),
            session: 0,
            kick: None,
            failed: false,
            drifted: false,
            pushed: None,
            dirty: None,
            urgent: false,
            queued: None,
            warned_conflict: None,
            labels_tx: None,
            awaiting_ack: false,
            latency: HashMap::new(),
            here: false,
            reported: SyncState::Offline as i32,
        }
    }
}

/// One probe result, as a chart needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencySample {
    /// Seconds since the epoch.
    pub time: i64,
    pub latency_ms: u32,
    pub healthy: bool,
}

/// How many samples a target's chart keeps.
const LATENCY_SAMPLES: usize = 60;

/// One agent connection, as the registry knows it.
pub struct Session {
    pub instance_id: String,
    pub id: u64,
    /// Resolves when this session must end (replaced or deleted).
    pub kicked: oneshot::Receiver<()>,
    /// The instance's labels, which decide its profile: they change when
    /// an operator changes them.
    pub labels: watch::Receiver<Labels>,
    /// Woken when `labels` changes: the session registers its waker here.
    pub(crate) relabels: Arc<TaskWaker>,
    /// The instance's entry in the registry.
    entry: Handle,
}

/// How an operator's relabel reaches the instance's live session: the
/// new labels in a watch, and a wake-up of the session's task. The session
/// registers its waker once (it is polled with the same one all its life)
/// and reads the watch's version when it is polled: polling a watch
/// future instead takes the watch's lock on every poll, and a fleet's
/// sessions are polled on every change and every ack. Dropped with the
/// entry's hold on the session (a newer connection, or a deletion), which
/// closes the watch.
struct Relabels {
    tx: watch::Sender<Labels>,
    waker: Arc<TaskWaker>,
}

impl Relabels {
    fn send(&self, labels: Labels) {
        let _ = self.tx.send(labels);
        self.waker.wake();
    }
}

pub struct Registry {
    store: Arc<Store>,
    /// Each entry behind its own lock: a session holds its instance's
    /// (`Session::entry`), so that an agent's acks, pushes and reports
    /// take only that, not the fleet's map and a hash of the id.
    entries: Mutex<HashMap<String, Handle>>,
    /// Held while instance records are written or deleted, so that a save
    /// in flight cannot bring a deleted instance back.
    saving: Mutex<()>,
    events: broadcast::Sender<FleetEvent>,
    next_session: AtomicU64,
    /// How many instances are connected now (changed under `entries`'
    /// lock), so that admitting an agent does not count the fleet.
    connected: AtomicUsize,
    /// How many agents may be connected at once.
    max_agents: usize,
    pub metrics: Metrics,
    /// Other replicas share the fleet (an etcd store): transitions are
    /// saved at once, so that they see them.
    shared: bool,
    /// How old unsaved progress may get.
    progress_after: Duration,
    /// The changed instances, by when they fall due to be saved.
    due: saving::Queue,
    /// Instances whose presence here changed since the last save (shared
    /// backends only). What is written is decided at the save, from
    /// whether each is connected here then: an agent that came and went
    /// within one save costs nothing, and a late write cannot claim an
    /// agent that has left.
    presence: Mutex<HashSet<String>>,
    /// Which other replica each instance is connected to, as the cluster
    /// says (shared backends only), also for instances whose record has
    /// not arrived yet.
    holders: Mutex<HashMap<String, String>>,
}

/// Why a new agent connection is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("duofleetd already holds its limit of {0} connected agents (--max-agents)")]
    Full(usize),
    #[error(
        "instance {instance:?} is already connected from host {holder:?}; two hosts claim the same instance id: give each its own --instance-id (this host, {claimant:?}, was refused)"
    )]
    Conflict {
        instance: String,
        holder: String,
        claimant: String,
    },
}

/// How old unsaved progress (acks, health, connections) may get.
pub const PROGRESS_SAVED_AFTER: Duration = Duration::from_secs(5);

/// The same with replicas, where every save is a network write that every
/// replica reads: state changes are saved at once, and what is left
/// (heartbeats, latencies) this often.
pub const SHARED_PROGRESS_SAVED_AFTER: Duration = Duration::from_secs(30);

/// Counts kept by an enum's value, keyed by its name without `prefix`,
/// in lower case, as the metrics' labels are.
fn by_name(
    counts: &[u64],
    prefix: &str,
    name: impl Fn(i32) -> Option<&'static str>,
) -> std::collections::BTreeMap<String, u64> {
    counts
        .iter()
        .enumerate()
        .filter_map(|(value, count)| {
            let name = name(value as i32)?;
            Some((name.trim_start_matches(prefix).to_lowercase(), *count))
        })
        .collect()
}

/// How long a refused claim stays shown on the instance.
const CONFLICT_SHOWN: Duration = Duration::from_secs(600);

impl Registry {
    /// Loads the instances known from earlier runs, all offline until their
    /// agents reconnect.
    pub fn load(store: Arc<Store>, max_agents: usize) -> Result<Self, StoreError> {
        let entries = store
            .load_instances()?
            .into_iter()
            .map(|mut instance| {
                let transitions =
                    Transitions::from_records(std::mem::take(&mut instance.health_transitions));
                instance.connected = false;
                let failed = instance.sync_state() == SyncState::Failed;
                let drifted = instance.sync_state() == SyncState::Drifted;
                instance.sync_state = SyncState::Offline as i32;
                let entry = Entry {
                    instance,
                    transitions,
                    failed,
                    drifted,
                    ..Entry::blank()
                };
                (
                    entry.instance.instance_id.clone(),
                    Arc::new(Mutex::new(entry)),
                )
            })
            .collect();
        let shared = store.replica().is_some();
        Ok(Registry {
            store,
            shared,
            progress_after: if shared {
                SHARED_PROGRESS_SAVED_AFTER
            } else {
                PROGRESS_SAVED_AFTER
            },
            presence: Mutex::new(HashSet::new()),
            holders: Mutex::new(HashMap::new()),
            entries: Mutex::new(entries),
            saving: Mutex::new(()),
            due: saving::Queue::default(),
            events: broadcast::Sender::new(1024),
            next_session: AtomicU64::new(1),
            connected: AtomicUsize::new(0),
            max_agents,
            metrics: Metrics::default(),
        })
    }

    /// How many agents are connected now.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<FleetEvent> {
        self.events.subscribe()
    }

    /// Registers (or updates) the instance of a new agent connection. An
    /// older connection for the same instance is told to end.
    /// `grant` is what the token that admitted the agent lets its Hello set
    /// at the instance's first registration.
    pub fn connect(&self, hello: &Hello, grant: &LabelGrant) -> Result<Session, Refused> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (kick, kicked) = oneshot::channel();
        let mut entries = self.lock();
        let reconnecting = entries
            .get(&hello.instance_id)
            .is_some_and(|e| lock_entry(e).here);
        let others = self.connected.load(Ordering::Relaxed) - usize::from(reconnecting);
        if others >= self.max_agents {
            return Err(Refused::Full(self.max_agents));
        }
        // A live session from another host: two agents claim one id. The
        // same host reconnecting (a restart) takes over its old session.
        if let Some(handle) = entries.get(&hello.instance_id)
            && let mut entry = lock_entry(handle)
            && entry.instance.connected
            && entry.instance.hostname != hello.hostname
        {
            let refused = Refused::Conflict {
                instance: hello.instance_id.clone(),
                holder: entry.instance.hostname.clone(),
                claimant: hello.hostname.clone(),
            };
            if entry.warned_conflict.as_deref() != Some(hello.hostname.as_str()) {
                tracing::warn!(instance = %hello.instance_id, holder = %entry.instance.hostname, claimant = %hello.hostname, "two hosts claim the same instance id; the second is refused (logged once per host)");
                entry.warned_conflict = Some(hello.hostname.clone());
            }
            entry.instance.conflict = format!(
                "host {:?} claimed this instance id while {:?} was connected, and was refused",
                hello.hostname, entry.instance.hostname
            );
            entry.instance.conflict_time = Some(SystemTime::now().into());
            entry.urgent = true;
            self.mark_changed(&mut entry, handle);
            return Err(refused);
        }
        let first = !entries.contains_key(&hello.instance_id);
        let handle = entries
            .entry(hello.instance_id.clone())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Entry {
                    instance: Instance {
                        instance_id: hello.instance_id.clone(),
                        ..Default::default()
                    },
                    urgent: true,
                    ..Entry::blank()
                }))
            })
            .clone();
        let mut guard = lock_entry(&handle);
        let entry = &mut *guard;
        if let Some(old) = entry.kick.take() {
            let _ = old.send(());
        }
        entry.session = id;
        entry.kick = Some(kick);
        // A new connection starts clean: the agent resends what still holds
        // (it is sent what it is behind on, and reports drift again).
        entry.failed = false;
        entry.drifted = false;
        entry.awaiting_ack = false;
        let instance = &mut entry.instance;
        let stale = instance
            .conflict_time
            .and_then(|t| SystemTime::try_from(t).ok())
            .is_some_and(|t| t.elapsed().unwrap_or_default() >= CONFLICT_SHOWN);
        if stale {
            instance.conflict.clear();
            instance.conflict_time = None;
            entry.warned_conflict = None;
        }
        instance.hostname = hello.hostname.clone();
        instance.deployment = hello.deployment;
        // Labels are the control plane's: the Hello's are a claim, taken
        // once, at first registration, as far as the token allows.
        if first {
            instance.labels = grant.apply(&hello.labels);
            tracing::info!(instance = %hello.instance_id, labels = ?instance.labels, reported = ?hello.labels, "instance registered");
        }
        instance.reported_labels = hello.labels.clone();
        instance.agent_version = hello.agent_version.clone();
        instance.gitlab_version = hello.gitlab_version.clone();
        instance.applied_revision = hello.applied_revision;
        let before = instance.gitlab_sync.take();
        instance.gitlab_sync = hello.gitlab_sync.clone();
        // Hello says only that the sync is on; what the last sync did item
        // by item stands until the next ack replaces it.
        if let (Some(now), Some(before)) = (instance.gitlab_sync.as_mut(), before)
            && now.enabled
            && before.enabled
            && now.items.is_empty()
        {
            now.items = before.items;
            now.applied_revision = before.applied_revision;
            now.unmanaged_models = before.unmanaged_models;
            now.detail = before.detail;
        }
        if !entry.here {
            self.connected.fetch_add(1, Ordering::Relaxed);
            entry.here = true;
            if self.shared {
                self.lock_presence().insert(hello.instance_id.clone());
            }
        }
        entry.instance.connected = true;
        self.updated(entry, &handle, Some(Event::InstanceConnected));
        let (tx, labels) = watch::channel(entry.instance.labels.clone());
        let relabels = Arc::new(TaskWaker::default());
        entry.labels_tx = Some(Relabels {
            tx,
            waker: relabels.clone(),
        });
        Ok(Session {
            instance_id: hello.instance_id.clone(),
            id,
            kicked,
            labels,
            relabels,
            entry: handle.clone(),
        })
    }

    /// The profile the instance matched and the revision it should reach.
    /// `sent`: a DesiredConfig went out, which the agent must ack before
    /// the instance is SYNCED again, even at the same revision (a relabel
    /// changes what an instance gets without a new revision).
    pub fn set_desired(&self, session: &Session, profile: &str, desired_revision: u64, sent: bool) {
        self.with_session(session, None, |entry| {
            if entry.instance.profile != profile {
                entry.instance.profile = profile.to_string();
            }
            entry.instance.desired_revision = desired_revision;
            if sent {
                entry.awaiting_ack = true;
                entry.pushed = Some((desired_revision, Instant::now()));
            }
        });
    }

    pub fn ack(&self, session: &Session, ack: &Ack) {
        let event = match ack.result() {
            AckResult::Failed => Event::Failed,
            _ => Event::Applied,
        };
        self.metrics.ack(ack.result());
        self.with_session(session, Some(event), |entry| {
            if let Some((revision, at)) = entry.pushed
                && ack.revision >= revision
            {
                self.metrics.push_to_ack(at.elapsed());
                entry.pushed = None;
            }
            if ack.revision >= entry.instance.desired_revision {
                entry.awaiting_ack = false;
            }
            if ack.gitlab_sync.is_some() {
                entry.instance.gitlab_sync = ack.gitlab_sync.clone();
            }
            if ack.host_sync.is_some() {
                entry.instance.host_sync = ack.host_sync.clone();
            }
            match ack.result() {
                AckResult::Failed => {
                    entry.failed = true;
                    entry.instance.last_error = ack.error.clone();
                    // Only the API layer failed: the revision is in place
                    // on the host, and the instance must not say otherwise.
                    if let Some(host) = &ack.host_sync
                        && host.error.is_empty()
                        && host.applied_revision == ack.revision
                    {
                        entry.instance.applied_revision = ack.revision;
                    }
                }
                _ => {
                    entry.failed = false;
                    entry.drifted = false;
                    entry.instance.last_error.clear();
                    // A host change that waits for the window: what is in
                    // place on the host is the older revision.
                    entry.instance.applied_revision = match &ack.host_sync {
                        Some(host) if host.waiting_until.is_some() => host.applied_revision,
                        _ => ack.revision,
                    };
                }
            }
        });
    }

    pub fn drift(&self, session: &Session, report: &DriftReport) {
        self.with_session(session, Some(Event::Drifted), |entry| {
            entry.drifted = true;
            entry.instance.last_error = report.detail.clone();
        });
    }

    /// The latest result per target, and the last 100 state changes. A
    /// report that changes no target's state (a heartbeat) raises no
    /// health-changed event.
    pub fn health(&self, session: &Session, report: HealthReport) {
        self.metrics.health_report();
        let Some(mut guard) = entry_of(session) else {
            return;
        };
        let entry = &mut *guard;
        let instance = &mut entry.instance;
        // Each target whose state changed, with its new state; a target no
        // longer probed is a change too, as UNKNOWN.
        let mut changed = Vec::new();
        for result in &report.results {
            let before = instance
                .health
                .iter()
                .find(|h| h.kind == result.kind && h.target == result.target);
            if before.is_none_or(|b| b.state != result.state) {
                entry.transitions.push(result);
                changed.push(result.clone());
            }
        }
        for gone in instance.health.iter().filter(|h| {
            !report
                .results
                .iter()
                .any(|r| r.kind == h.kind && r.target == h.target)
        }) {
            changed.push(EndpointHealth {
                state: HealthState::Unknown as i32,
                error: "no longer probed".into(),
                latency_ms: 0,
                ..gone.clone()
            });
        }
        for result in &report.results {
            let samples = entry
                .latency
                .entry((result.kind, result.target.clone()))
                .or_default();
            samples.push_back(LatencySample {
                time: result.check_time.map_or(0, |t| t.seconds),
                latency_ms: result.latency_ms,
                healthy: result.state() == HealthState::Healthy,
            });
            if samples.len() > LATENCY_SAMPLES {
                samples.pop_front();
            }
        }
        entry.latency.retain(|(kind, target), _| {
            report
                .results
                .iter()
                .any(|r| r.kind == *kind && &r.target == target)
        });
        entry.instance.health = report.results;
        // Replicas see a health transition at the next save.
        entry.urgent |= self.shared && !changed.is_empty();
        self.updated(entry, &session.entry, None);
        if !changed.is_empty() {
            self.emit_with(Event::HealthChanged, &entry.instance, changed);
        }
    }

    /// The connection ended. Ignored when a newer connection took over.
    /// A disconnect alone is not saved: every instance is loaded offline,
    /// so at shutdown the fleet's disconnects cost no write.
    pub fn disconnect(&self, session: &Session) {
        let Some(mut guard) = entry_of(session) else {
            return;
        };
        let entry = &mut *guard;
        if entry.here {
            self.connected.fetch_sub(1, Ordering::Relaxed);
            entry.here = false;
            if self.shared {
                self.lock_presence().insert(session.instance_id.clone());
            }
        }
        // Still connected when its agent moved to another replica already.
        entry.instance.connected = self.held_elsewhere(&session.instance_id);
        entry.kick = None;
        self.recompute(entry, Some(Event::InstanceDisconnected));
        // Unsaved changes from before it left are still saved (sooner, if
        // the state change made them urgent for other replicas).
        if entry.dirty.is_some() {
            self.mark_changed(entry, &session.entry);
        }
    }

    /// Runs `pick` over every instance under the lock, without copying
    /// them: for pages that show a few fields of many. The instances it
    /// sees have no health transitions.
    pub fn scan<T>(&self, mut pick: impl FnMut(&Instance) -> Option<T>) -> Vec<T> {
        self.lock()
            .values()
            .filter_map(|e| pick(&lock_entry(e).instance))
            .collect()
    }

    /// Runs `look` on one instance under the lock, without copying it.
    /// The instance it sees has no health transitions (`get` has them).
    pub fn peek<T>(&self, instance_id: &str, look: impl FnOnce(&Instance) -> T) -> Option<T> {
        self.lock()
            .get(instance_id)
            .map(|e| look(&lock_entry(e).instance))
    }

    /// The recent latency samples of each target of an instance.
    pub fn latency(&self, instance_id: &str) -> Vec<((i32, String), Vec<LatencySample>)> {
        let entries = self.lock();
        let Some(entry) = entries.get(instance_id) else {
            return Vec::new();
        };
        let entry = lock_entry(entry);
        let mut series: Vec<_> = entry
            .latency
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().copied().collect()))
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        series
    }

    /// The instances whose labels match, without their health transitions
    /// (GetInstance has them).
    pub fn list(&self, selector: &Labels) -> Vec<Instance> {
        let mut instances: Vec<Instance> = self
            .lock()
            .values()
            .filter_map(|e| {
                let e = lock_entry(e);
                selector
                    .iter()
                    .all(|(k, v)| e.instance.labels.get(k) == Some(v))
                    .then(|| e.instance.clone())
            })
            .collect();
        instances.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        instances
    }

    pub fn get(&self, instance_id: &str) -> Option<Instance> {
        self.lock().get(instance_id).map(|e| lock_entry(e).record())
    }

    /// Forgets an instance and ends its connection. Returns whether it existed.
    /// An operator sets an instance's labels, durably; its live session,
    /// if any, follows at once. `None` when there is no such instance.
    pub fn update_labels(
        &self,
        instance_id: &str,
        labels: Labels,
        actor: &str,
    ) -> Result<Option<Instance>, StoreError> {
        // Held until the labels are in memory: no save or delete between.
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut record) = self.get(instance_id) else {
            return Ok(None);
        };
        record.labels = labels.clone();
        self.store.save_instances(std::slice::from_ref(&record))?;
        self.store.flush()?;
        if self.shared {
            let value = shared::LabelsValue {
                labels: labels.clone(),
                actor: actor.to_string(),
            };
            self.store.put_labels(instance_id, &value.encode_to_vec())?;
        }
        let entries = self.lock();
        let Some(handle) = entries.get(instance_id) else {
            return Ok(None);
        };
        let mut entry = lock_entry(handle);
        let old = std::mem::replace(&mut entry.instance.labels, labels.clone());
        if let Some(relabels) = &entry.labels_tx {
            relabels.send(labels.clone());
        }
        tracing::info!(instance = %instance_id, %actor, old = ?old, new = ?labels, "instance labels changed");
        let _ = self.events.send(FleetEvent {
            time: Some(SystemTime::now().into()),
            event: Some(Event::LabelsChanged(LabelsChanged {
                instance_id: instance_id.to_string(),
                actor: actor.to_string(),
                old_labels: old,
                new_labels: labels,
            })),
        });
        Ok(Some(entry.record()))
    }

    pub fn delete(&self, instance_id: &str) -> Result<bool, StoreError> {
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let Some(handle) = self.lock().remove(instance_id) else {
            return Ok(false);
        };
        let instance = self.forget(&handle);
        self.store.delete_instance(instance_id)?;
        self.emit(Event::Deleted, &instance);
        Ok(true)
    }

    /// An entry taken out of the map: its session, if any, is told to end
    /// and finds nothing from now on. Answers the instance as it was.
    fn forget(&self, handle: &Handle) -> Instance {
        let mut entry = lock_entry(handle);
        if entry.here {
            self.connected.fetch_sub(1, Ordering::Relaxed);
            entry.here = false;
        }
        if let Some(kick) = entry.kick.take() {
            let _ = kick.send(());
        }
        entry.session = 0;
        entry.labels_tx = None;
        // Its turn in the saver's queue, if it has one, finds it saved: a
        // save must not bring it back.
        entry.dirty = None;
        entry.urgent = false;
        entry.queued = None;
        std::mem::take(&mut entry.instance)
    }

    fn lock_presence(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fleet gauges for /metrics, then the counters.
    pub fn render_metrics(&self, out: &mut String) {
        let connected = self.connected() as u64;
        let entries = self.lock();
        metrics::gauge(
            out,
            "duofleet_agents_connected",
            "Agents connected now.",
            &[("", connected)],
        );
        // Counted by the enums' values under the lock, named after it: a
        // scrape of a large fleet holds up the agents' acks for as little
        // as it can.
        let mut by_state = [0u64; 8];
        let mut by_health = [0u64; 4];
        for entry in entries.values() {
            let entry = lock_entry(entry);
            by_state[entry.instance.sync_state() as usize] += 1;
            for result in &entry.instance.health {
                by_health[result.state() as usize] += 1;
            }
        }
        drop(entries);
        let states = by_name(&by_state, "SYNC_STATE_", |v| {
            SyncState::try_from(v).ok().map(|s| s.as_str_name())
        });
        let health = by_name(&by_health, "HEALTH_STATE_", |v| {
            HealthState::try_from(v).ok().map(|s| s.as_str_name())
        });
        metrics::gauge_by(
            out,
            "duofleet_instances",
            "Instances by sync state.",
            "sync_state",
            &[
                "synced",
                "pending",
                "failed",
                "drifted",
                "offline",
                "waiting_for_window",
            ],
            &states,
        );
        metrics::gauge_by(
            out,
            "duofleet_endpoint_targets",
            "Probed targets across instances, by latest state.",
            "state",
            &["healthy", "unhealthy", "unknown"],
            &health,
        );
        self.metrics.render(out);
    }

    fn with_session(
        &self,
        session: &Session,
        event: Option<fn(InstanceEvent) -> Event>,
        edit: impl FnOnce(&mut Entry),
    ) {
        self.with_session_then(session, |entry| {
            edit(entry);
            event
        });
    }

    /// Like `with_session`, with the event (if any) chosen by the edit.
    fn with_session_then(
        &self,
        session: &Session,
        edit: impl FnOnce(&mut Entry) -> Option<fn(InstanceEvent) -> Event>,
    ) {
        let Some(mut entry) = entry_of(session) else {
            return;
        };
        let event = edit(&mut entry);
        self.updated(&mut entry, &session.entry, event);
    }

    /// Recomputes the derived fields, marks the entry for saving and
    /// announces a change.
    fn updated(
        &self,
        entry: &mut Entry,
        handle: &Handle,
        event: Option<fn(InstanceEvent) -> Event>,
    ) {
        self.recompute(entry, event);
        self.mark_changed(entry, handle);
    }

    /// Recomputes the derived fields (the sync state) and announces a
    /// change.
    fn recompute(&self, entry: &mut Entry, event: Option<fn(InstanceEvent) -> Event>) {
        let before = entry.instance.sync_state;
        let instance = &mut entry.instance;
        instance.last_seen = Some(SystemTime::now().into());
        let state = if !instance.connected {
            SyncState::Offline
        } else if entry.drifted {
            SyncState::Drifted
        } else if entry.failed {
            SyncState::Failed
        } else if !entry.awaiting_ack
            && instance
                .host_sync
                .as_ref()
                .is_some_and(|h| h.waiting_until.is_some())
        {
            SyncState::WaitingForWindow
        } else if instance.applied_revision >= instance.desired_revision && !entry.awaiting_ack {
            SyncState::Synced
        } else {
            SyncState::Pending
        };
        instance.sync_state = state as i32;
        // Replicas see a state change at the next save.
        entry.urgent |= self.shared && before != instance.sync_state;
        if let Some(event) = event {
            self.emit(event, instance);
        }
    }

    /// Sends an event that is not an instance's (a rollout's) to WatchFleet.
    pub fn announce(&self, event: FleetEvent) {
        let _ = self.events.send(event);
    }

    fn emit(&self, event: fn(InstanceEvent) -> Event, instance: &Instance) {
        self.emit_with(event, instance, Vec::new());
    }

    fn emit_with(
        &self,
        event: fn(InstanceEvent) -> Event,
        instance: &Instance,
        targets: Vec<EndpointHealth>,
    ) {
        // Nobody watches the fleet: nothing to build.
        if self.events.receiver_count() == 0 {
            return;
        }
        let _ = self.events.send(FleetEvent {
            time: Some(SystemTime::now().into()),
            event: Some(event(InstanceEvent {
                instance_id: instance.instance_id.clone(),
                revision: instance.applied_revision,
                error: instance.last_error.clone(),
                sync_state: instance.sync_state,
                targets,
            })),
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Handle>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The session's entry, locked, unless a newer session took it over (or
/// the instance was deleted).
fn entry_of(session: &Session) -> Option<std::sync::MutexGuard<'_, Entry>> {
    Some(lock_entry(&session.entry)).filter(|e| e.session == session.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Sealer;

    pub(super) fn registry(dir: &std::path::Path) -> Registry {
        let store = Store::open(dir, crate::catalog::get(), Sealer::new(&[7; 32], None)).unwrap();
        Registry::load(Arc::new(store), 10).unwrap()
    }

    pub(super) fn hello(id: &str) -> Hello {
        Hello {
            instance_id: id.into(),
            applied_revision: 4,
            ..Default::default()
        }
    }

    /// Health transitions are kept compact in memory: GetInstance and the
    /// saved record still carry each one, the last 100, and a restart
    /// reads them back.
    #[test]
    fn health_transitions_are_read_saved_and_loaded_whole() {
        use duofleet_proto::v1::{EndpointHealth, HealthState, TargetKind};
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let session = registry
            .connect(&hello("gitlab-a"), &LabelGrant::all())
            .unwrap();
        let mut sent = Vec::new();
        for n in 0..130 {
            let unhealthy = n % 2 == 1;
            let result = EndpointHealth {
                kind: TargetKind::Model as i32,
                target: "mixtral".into(),
                state: if unhealthy {
                    HealthState::Unhealthy
                } else {
                    HealthState::Healthy
                } as i32,
                error: if unhealthy {
                    "HTTP 503".into()
                } else {
                    String::new()
                },
                latency_ms: n,
                check_time: Some(prost_types::Timestamp {
                    seconds: 1_800_000_000 + i64::from(n),
                    nanos: 0,
                }),
            };
            sent.push(result.clone());
            registry.health(
                &session,
                HealthReport {
                    results: vec![result],
                },
            );
        }
        let kept = registry.get("gitlab-a").unwrap().health_transitions;
        assert_eq!(kept, sent[30..]);
        assert!(
            registry.list(&Labels::new())[0]
                .health_transitions
                .is_empty(),
            "listing is slim"
        );
        registry.save_changed(true).unwrap();
        drop(registry);
        let reloaded = self::registry(dir.path());
        assert_eq!(
            reloaded.get("gitlab-a").unwrap().health_transitions,
            sent[30..]
        );
    }

    #[test]
    fn a_reconnect_keeps_what_the_last_sync_did() {
        use duofleet_proto::v1::{GitLabSync, SyncItem};
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let on = |detail: &str| GitLabSync {
            enabled: true,
            detail: detail.into(),
            ..Default::default()
        };
        let session = registry
            .connect(
                &Hello {
                    gitlab_sync: Some(on("on: https://gitlab")),
                    ..hello("gitlab-a")
                },
                &LabelGrant::all(),
            )
            .unwrap();
        let item = SyncItem {
            kind: "model".into(),
            key: "m".into(),
            ..Default::default()
        };
        registry.ack(
            &session,
            &Ack {
                revision: 4,
                result: AckResult::Applied as i32,
                gitlab_sync: Some(GitLabSync {
                    items: vec![item.clone()],
                    applied_revision: 4,
                    ..on("GitLab 18.9.0-ee")
                }),
                ..Default::default()
            },
        );
        registry.disconnect(&session);
        registry
            .connect(
                &Hello {
                    gitlab_sync: Some(on("on: https://gitlab")),
                    ..hello("gitlab-a")
                },
                &LabelGrant::all(),
            )
            .unwrap();
        let sync = registry.get("gitlab-a").unwrap().gitlab_sync.unwrap();
        assert_eq!((sync.items, sync.applied_revision), (vec![item], 4));
        assert_eq!(sync.detail, "GitLab 18.9.0-ee");
        // Turned off on the agent: nothing of the old sync is shown.
        registry
            .connect(
                &Hello {
                    gitlab_sync: Some(GitLabSync::default()),
                    ..hello("gitlab-a")
                },
                &LabelGrant::all(),
            )
            .unwrap();
        assert!(
            registry
                .get("gitlab-a")
                .unwrap()
                .gitlab_sync
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn changed_instances_are_saved_in_one_batch_and_deleted_ones_stay_gone() {
        let dir = tempfile::tempdir().unwrap();
        let registry = registry(dir.path());
        let a = registry
            .connect(&hello("gitlab-a"), &LabelGrant::all())
            .unwrap();
        let b = registry
            .connect(&hello("gitlab-b"), &LabelGrant::all())
            .unwrap();
        // Nothing reaches the store until the saver runs; new instances
        // are saved at its next run.
        assert!(registry.store.load_instances().unwrap().is_empty());
        assert_eq!(registry.save_changed(false).unwrap(), 2);
        assert_eq!(
            registry.save_changed(false).unwrap(),
            0,
            "nothing changed since"
        );

        // Progress waits for its share of PROGRESS_SAVED_AFTER, or for
        // shutdown.
        registry.set_desired(&b, "default", 5, true);
        assert_eq!(registry.save_changed(false).unwrap(), 0);
        let connected = registry.connected();
        assert!(registry.delete("gitlab-b").unwrap());
        assert_eq!(registry.connected(), connected - 1);
        // Its session holds the entry it had: what it reports now reaches
        // nothing, and its end counts nothing twice.
        registry.set_desired(&b, "default", 6, true);
        registry.ack(
            &b,
            &Ack {
                revision: 6,
                ..Default::default()
            },
        );
        registry.disconnect(&b);
        assert_eq!(registry.connected(), connected - 1);
        assert!(registry.get("gitlab-b").is_none());
        // gitlab-b changed before its deletion: the next save must not
        // bring it back.
        assert_eq!(registry.save_changed(true).unwrap(), 0);
        let saved = registry.store.load_instances().unwrap();
        let ids: Vec<&str> = saved.iter().map(|i| i.instance_id.as_str()).collect();
        assert_eq!(ids, ["gitlab-a"]);
        assert_eq!(saved[0].applied_revision, 4);

        // An operator's relabel is on disk before it is answered.
        registry
            .update_labels(
                "gitlab-a",
                Labels::from([("ring".into(), "canary".into())]),
                "op",
            )
            .unwrap()
            .unwrap();
        let saved = registry.store.load_instances().unwrap();
        assert_eq!(
            saved[0].labels.get("ring").map(String::as_str),
            Some("canary")
        );
        assert!(
            registry
                .update_labels("nobody", Labels::new(), "op")
                .unwrap()
                .is_none()
        );

        // A disconnect alone costs no write, even at shutdown: instances
        // are loaded offline anyway.
        registry.disconnect(&a);
        assert!(!registry.get("gitlab-a").unwrap().connected);
        assert_eq!(registry.save_changed(true).unwrap(), 0);
    }
}
