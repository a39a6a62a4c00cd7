//! Rollouts with replicas (an etcd store). Every replica holds instances
//! back the same way, so every replica knows every rollout:
//!
//! - a rollout's record is committed with its revision; a replica that
//!   learns of a revision another one committed reads the rollout that
//!   came with it *before* it publishes the revision, so that no instance
//!   connected to it gets the new configuration ahead of its wave;
//! - every transition (a wave opening, a pause, a resume, an abort) is a
//!   compare-and-swap of the record, which every replica follows: a
//!   writer whose swap fails (another replica wrote first) takes up the
//!   stored record and decides again on it.
//!
//! Every replica counts each open wave's progress (each sees the whole
//! fleet), so any of them shows it as it goes; the gates move on one
//! replica only, the leader (`Store::leads`). Pause, resume and abort are
//! answered by whichever replica an operator asks.

use super::{Entry, Rollouts, digest, id_of, pinned_of};
use crate::store::TableChange;
use duofleet_proto::v1::Rollout;
use prost::Message;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

impl Rollouts {
    /// Follows the rollouts other replicas start and change. Nothing to
    /// do on sled.
    pub fn follow(self: &Arc<Self>) {
        let learner: Weak<Rollouts> = Arc::downgrade(self);
        self.store.before_publish(Box::new(move |revision| {
            if let Some(rollouts) = learner.upgrade() {
                rollouts.learn(revision.revision);
            }
        }));
        self.store
            .follow_table(crate::store::Table::Rollouts, self, Rollouts::merge);
    }

    /// A revision another replica committed: the rollout that came with it,
    /// if any.
    fn learn(&self, revision: u64) {
        if self.lock().contains_key(&revision) {
            return;
        }
        match self.store.load_rollout(&id_of(revision)) {
            Ok(Some(raw)) => self.take(&id_of(revision), &raw),
            Ok(None) => {}
            Err(error) => {
                tracing::error!(revision, error = %crate::error::error_chain(&error), "cannot read the rollout of a revision another replica committed")
            }
        }
    }

    fn merge(&self, change: TableChange) {
        match change {
            TableChange::Snapshot(all) => {
                for (id, raw) in all {
                    self.take(&id, &raw);
                }
            }
            TableChange::Put(id, raw) => self.take(&id, &raw),
            // Rollouts are kept; nothing deletes them.
            TableChange::Deleted(_) => {}
        }
    }

    /// A rollout's record as a replica wrote it (this one included: what a
    /// failed swap found): new here, or a transition.
    pub(super) fn take(&self, id: &str, raw: &[u8]) {
        let record = match Rollout::decode(raw) {
            Ok(record) => record,
            Err(_) => {
                tracing::warn!(rollout = %id, "a stored rollout does not decode; ignored");
                return;
            }
        };
        let waiting = pinned_of(&record);
        // The configuration held instances keep: read before the lock.
        let known = self.lock().contains_key(&record.revision);
        let base = if known {
            None
        } else {
            match self.store.config_at_revision(record.base_revision) {
                Ok(base) => Some(Arc::new(base)),
                Err(error) => {
                    tracing::error!(rollout = %id, error = %crate::error::error_chain(&error), "cannot read the configuration a rollout holds instances at");
                    return;
                }
            }
        };
        let released = {
            let mut entries = self.lock();
            match entries.get_mut(&record.revision) {
                // The echo of a record this process has since replaced.
                Some(entry) if entry.replaced.contains(&digest(raw)) => return,
                Some(entry) if entry.record == record => {
                    entry.stored = raw.to_vec();
                    return;
                }
                Some(entry) => {
                    let released = entry.pinned != waiting;
                    entry.record = record.clone();
                    entry.stored = raw.to_vec();
                    entry.pinned = waiting;
                    if released {
                        self.rebaseline(entry);
                    }
                    released
                }
                None => {
                    let mut entry = Entry {
                        record: record.clone(),
                        base,
                        pinned: waiting,
                        baseline: HashMap::new(),
                        aborting: false,
                        stored: raw.to_vec(),
                        replaced: Vec::new(),
                    };
                    self.rebaseline(&mut entry);
                    entries.insert(record.revision, entry);
                    true
                }
            }
        };
        if released {
            self.bump();
        }
        tracing::info!(rollout = %record.id, state = ?record.state(), "rollout changed through another replica");
        self.announce(&record);
    }
}
