//! The whole fleet on every replica (an etcd store): each replica saves the
//! instances whose agents are connected to it, and takes in what the other
//! replicas saved, so that ListInstances, GetFleetHealth, WatchFleet and
//! the dashboard show every instance, whichever replica its agent is on.
//!
//! Who says what:
//! - an instance's record: the replica its agent is connected to (what this
//!   replica holds of its own agents is never replaced from outside);
//! - whether it is connected: the `live` keys, held by each replica's lease;
//! - its labels: the operator, through any replica (a key of their own, so
//!   that a replica's save of the record cannot undo them).

use super::{Entry, Registry, Transitions, lock_entry};
use crate::effective::Labels;
use crate::store::backend::FleetChange;
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::{
    FleetEvent, HealthState, Instance, InstanceEvent, LabelsChanged, SyncState,
};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// An operator's labels for an instance, as replicas share them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelsValue {
    #[prost(btree_map = "string, string", tag = "1")]
    pub labels: Labels,
    #[prost(string, tag = "2")]
    pub actor: String,
}

impl Registry {
    /// Takes in the other replicas' changes to the fleet until the
    /// registry is dropped. Nothing to do on sled.
    pub fn follow(self: &Arc<Self>) {
        let Some(changes) = self.store.follow_fleet() else {
            return;
        };
        crate::store::follow_on_thread("fleet-follow", changes, self, Registry::merge);
    }

    /// Applies one change another replica made (or this one: its own
    /// writes come back too, and change nothing).
    pub fn merge(&self, change: FleetChange) {
        let me = self.store.replica().map(str::to_string);
        match change {
            FleetChange::Snapshot {
                records,
                present,
                labels,
            } => {
                let known: HashSet<String> = records.iter().map(|(id, _)| id.clone()).collect();
                for (id, raw) in records {
                    self.merge_record(&id, &raw);
                }
                let mut entries = self.lock();
                // Deleted while this replica was not following.
                let gone: Vec<String> = entries
                    .iter()
                    .filter(|(id, e)| {
                        let e = lock_entry(e);
                        !e.here && !e.urgent && !known.contains(*id)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in gone {
                    if let Some(handle) = entries.remove(&id) {
                        let instance = self.forget(&handle);
                        self.emit(Event::Deleted, &instance);
                    }
                }
                let mut reassert = Vec::new();
                *self.lock_holders() = present
                    .iter()
                    .filter(|(_, r)| Some(*r) != me.as_ref())
                    .map(|(id, r)| (id.clone(), r.clone()))
                    .collect();
                for (id, entry) in entries.iter() {
                    let mut entry = lock_entry(entry);
                    let holder = present.get(id);
                    if entry.here && holder != me.as_ref() {
                        reassert.push(id.clone());
                    }
                    let elsewhere = holder.is_some_and(|r| Some(r) != me.as_ref());
                    self.show_connected(&mut entry, elsewhere);
                }
                self.lock_presence().extend(reassert);
                drop(entries);
                for (id, raw) in labels {
                    self.merge_labels(&id, &raw);
                }
            }
            FleetChange::Saved(id, raw) => self.merge_record(&id, &raw),
            FleetChange::Deleted(id) => {
                let Some(handle) = self.lock().remove(&id) else {
                    return;
                };
                let instance = self.forget(&handle);
                self.emit(Event::Deleted, &instance);
            }
            FleetChange::Present(id, holder) => {
                let elsewhere = holder.clone().filter(|r| Some(r) != me.as_ref());
                let entries = self.lock();
                // Kept also when the record has not arrived yet (a
                // replica can write presence before the record).
                match &elsewhere {
                    Some(r) => self.lock_holders().insert(id.clone(), r.clone()),
                    None => self.lock_holders().remove(&id),
                };
                let Some(entry) = entries.get(&id) else {
                    return;
                };
                let mut entry = lock_entry(entry);
                // Its agent is here, and the cluster lost that (a late
                // write of a replica it left, or an expired lease): said
                // again at the next save.
                if entry.here && holder.is_none() {
                    self.lock_presence().insert(id.clone());
                }
                self.show_connected(&mut entry, elsewhere.is_some());
            }
            FleetChange::Labels(id, raw) => self.merge_labels(&id, &raw),
        }
    }

    /// Another replica's record of an instance: taken in unless its agent
    /// is connected here.
    fn merge_record(&self, id: &str, raw: &[u8]) {
        let Ok(mut record) = Instance::decode(raw) else {
            tracing::warn!(instance = %id, "an instance record in the shared store does not decode; ignored");
            return;
        };
        let mut entries = self.lock();
        let handle = entries.entry(id.to_string()).or_insert_with(|| {
            Arc::new(Mutex::new(Entry {
                instance: Instance {
                    instance_id: id.to_string(),
                    labels: record.labels.clone(),
                    sync_state: SyncState::Offline as i32,
                    ..Default::default()
                },
                ..Entry::blank()
            }))
        });
        let mut guard = lock_entry(handle);
        let entry = &mut *guard;
        if entry.here {
            return;
        }
        // Connection and labels are not the record's to say.
        record.instance_id = id.to_string();
        record.labels = std::mem::take(&mut entry.instance.labels);
        record.connected = self.held_elsewhere(id);
        entry.reported = record.sync_state;
        if !record.connected {
            record.sync_state = SyncState::Offline as i32;
        }
        entry.transitions =
            Transitions::from_records(std::mem::take(&mut record.health_transitions));
        let old = std::mem::replace(&mut entry.instance, record);
        let now = &entry.instance;
        let health_changed: Vec<_> = now
            .health
            .iter()
            .filter(|h| {
                !old.health
                    .iter()
                    .any(|o| o.kind == h.kind && o.target == h.target && o.state == h.state)
            })
            .cloned()
            .collect();
        // One event for the change: its state and revision ride on it.
        let event = if now.connected != old.connected {
            Some(match now.connected {
                true => Event::InstanceConnected as fn(InstanceEvent) -> Event,
                false => Event::InstanceDisconnected,
            })
        } else if now.sync_state != old.sync_state || now.applied_revision != old.applied_revision {
            Some(match now.sync_state() {
                SyncState::Failed => Event::Failed as fn(InstanceEvent) -> Event,
                SyncState::Drifted => Event::Drifted,
                SyncState::Offline => Event::InstanceDisconnected,
                _ => Event::Applied,
            })
        } else {
            None
        };
        if let Some(event) = event {
            self.emit(event, now);
        }
        if !health_changed.is_empty() {
            self.emit_with(Event::HealthChanged, now, health_changed);
        }
    }

    fn lock_holders(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another replica holds the instance's agent, as the cluster
    /// says.
    pub(super) fn held_elsewhere(&self, id: &str) -> bool {
        self.lock_holders().contains_key(id)
    }

    /// Shows an instance whose agent is not here connected (through
    /// another replica) or not, with an event when that changes.
    fn show_connected(&self, entry: &mut Entry, connected: bool) {
        if entry.here || entry.instance.connected == connected {
            return;
        }
        entry.instance.connected = connected;
        if connected {
            // Its state is the holder's to report: what its record said
            // last (a record can arrive before the presence that goes
            // with it).
            entry.instance.sync_state = match SyncState::try_from(entry.reported) {
                Ok(SyncState::Offline) | Err(_) => SyncState::Pending as i32,
                Ok(_) => entry.reported,
            };
            self.emit(Event::InstanceConnected, &entry.instance);
        } else {
            entry.instance.sync_state = SyncState::Offline as i32;
            for health in &mut entry.instance.health {
                health.state = HealthState::Unknown as i32;
            }
            self.emit(Event::InstanceDisconnected, &entry.instance);
        }
    }

    /// An operator set an instance's labels through some replica.
    fn merge_labels(&self, id: &str, raw: &[u8]) {
        let Ok(value) = LabelsValue::decode(raw) else {
            tracing::warn!(instance = %id, "shared labels do not decode; ignored");
            return;
        };
        let entries = self.lock();
        let Some(handle) = entries.get(id) else {
            return;
        };
        let mut entry = lock_entry(handle);
        if entry.instance.labels == value.labels {
            return;
        }
        let old = std::mem::replace(&mut entry.instance.labels, value.labels.clone());
        if let Some(relabels) = &entry.labels_tx {
            relabels.send(value.labels.clone());
        }
        if entry.here {
            // This replica's record of it carries them from now on.
            entry.urgent = true;
            self.mark_changed(&mut entry, handle);
        }
        tracing::info!(instance = %id, actor = %value.actor, old = ?old, new = ?value.labels, "instance labels changed through another replica");
        let _ = self.events.send(FleetEvent {
            time: Some(SystemTime::now().into()),
            event: Some(Event::LabelsChanged(LabelsChanged {
                instance_id: id.to_string(),
                actor: value.actor,
                old_labels: old,
                new_labels: value.labels,
            })),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secrets::Sealer;
    use crate::store::Store;

    fn record(id: &str, state: SyncState) -> Vec<u8> {
        Instance {
            instance_id: id.into(),
            sync_state: state as i32,
            applied_revision: 7,
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Another replica's presence and record can arrive in either order;
    /// the instance shows what its replica reported, connected, either
    /// way, and OFFLINE once its presence goes.
    #[test]
    fn presence_and_records_from_another_replica_in_either_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            crate::catalog::get(),
            Sealer::new(&[5; 32], None),
        );
        let registry = Registry::load(Arc::new(store.unwrap()), 10).unwrap();
        let mut events = registry.subscribe();
        let elsewhere = || Some("replica-2".to_string());
        // Presence first (written before the record, in a save that
        // raced a connect), then the record.
        registry.merge(FleetChange::Present("a".into(), elsewhere()));
        registry.merge(FleetChange::Saved(
            "a".into(),
            record("a", SyncState::Synced),
        ));
        // The record first, then presence.
        registry.merge(FleetChange::Saved(
            "b".into(),
            record("b", SyncState::Synced),
        ));
        assert!(!registry.get("b").unwrap().connected);
        registry.merge(FleetChange::Present("b".into(), elsewhere()));
        for id in ["a", "b"] {
            let seen = registry.get(id).unwrap();
            assert!(seen.connected, "{id}");
            assert_eq!(seen.sync_state(), SyncState::Synced, "{id}");
            assert_eq!(seen.applied_revision, 7);
        }
        let mut connected = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let Some(Event::InstanceConnected(e)) = event.event {
                connected.push(e.instance_id);
            }
        }
        assert_eq!(connected, ["a", "b"], "WatchFleet hears each connect once");
        // Its replica died and its lease expired.
        registry.merge(FleetChange::Present("a".into(), None));
        let gone = registry.get("a").unwrap();
        assert!(!gone.connected);
        assert_eq!(gone.sync_state(), SyncState::Offline);
        // An operator deleted it through another replica.
        registry.merge(FleetChange::Deleted("b".into()));
        assert!(registry.get("b").is_none());
    }
}
