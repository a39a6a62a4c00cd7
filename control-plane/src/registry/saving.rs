//! Saving the fleet's state: which instances are due, and the saver's run.
//!
//! An instance that changes is queued once, at the time it falls due, and
//! the saver takes from the queue what has fallen due. A run touches the
//! instances it saves, not the fleet: a quiet fleet of 50,000 costs the
//! saver nothing, and a busy one costs it no walk over every entry twice a
//! second.

use super::{Entry, Handle, Registry, lock_entry};
use crate::store::StoreError;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The instances waiting to be saved, earliest due first. An instance may
/// be in it more than once (urgency brings its save forward): what is
/// taken out is checked against the entry, and a stale one is passed over.
#[derive(Default)]
pub(super) struct Queue(Mutex<BinaryHeap<Due>>);

struct Due {
    at: Instant,
    handle: Handle,
}

impl Ord for Due {
    /// Reversed: the heap's greatest is the earliest due.
    fn cmp(&self, other: &Self) -> Ordering {
        other.at.cmp(&self.at)
    }
}

impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}

impl Eq for Due {}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, BinaryHeap<Due>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Everything due by `now`, taken out.
    fn take_due(&self, now: Instant) -> Vec<Handle> {
        let mut queue = self.lock();
        let mut due = Vec::new();
        while queue.peek().is_some_and(|d| d.at <= now) {
            if let Some(d) = queue.pop() {
                due.push(d.handle);
            }
        }
        due
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Registry {
    /// Marks `entry` (behind `handle`) as changed: it is saved at the next
    /// run when urgent, and otherwise once its oldest unsaved change is as
    /// old as its own point in the interval (`saved_after`). Called with
    /// the entry locked; the queue's lock comes after it.
    pub(super) fn mark_changed(&self, entry: &mut Entry, handle: &Handle) {
        // Already queued, and not to be brought forward: the usual case
        // for an ack or a report, which reads no clock.
        if entry.queued.is_some() && !entry.urgent {
            return;
        }
        let now = Instant::now();
        let since = *entry.dirty.get_or_insert(now);
        let at = if entry.urgent {
            now
        } else {
            since + saved_after(&entry.instance.instance_id, self.progress_after)
        };
        if entry.queued.is_some_and(|queued| queued <= at) {
            return;
        }
        entry.queued = Some(at);
        self.due.lock().push(Due {
            at,
            handle: handle.clone(),
        });
    }

    /// Writes changed instances in one batch. Runs every 500 ms, and with
    /// `all` at shutdown. A new instance (or a refused claim) is written at
    /// the next run; progress (acks, health, connections) only once it is
    /// between half of [`super::PROGRESS_SAVED_AFTER`] and all of it old
    /// (each instance has its own point in that range, `saved_after`), so
    /// that a fleet's acks and heartbeats cost one write per instance per
    /// interval, not one per message, and a fleet that acked one change
    /// together is saved over several runs, not in one burst beside the
    /// next change's fan-out. A crash loses at most that much progress,
    /// which every agent reports again when it reconnects.
    pub fn save_changed(&self, all: bool) -> Result<usize, StoreError> {
        let _saving = self.saving.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // An entry's `queued` is when it falls due (set whenever it turns
        // unsaved, brought forward when urgent): a turn taken from the queue
        // for an earlier, already saved change finds a later time, or none.
        let due = |e: &Entry| {
            if all {
                e.dirty.is_some()
            } else {
                e.queued.is_some_and(|at| at <= now)
            }
        };
        // Encoded under the entry's lock: no copy of each instance on the
        // way.
        let take = |handle: &Handle| {
            let mut e = lock_entry(handle);
            if !due(&e) {
                return None;
            }
            e.dirty = None;
            e.urgent = false;
            e.queued = None;
            Some((e.instance.instance_id.clone(), e.encode_record()))
        };
        let changed: Vec<(String, Vec<u8>)> = if all {
            self.lock().values().filter_map(take).collect()
        } else {
            self.due.take_due(now).iter().filter_map(take).collect()
        };
        let count = changed.len();
        self.store.save_encoded_instances(changed)?;
        if self.shared {
            let changed = std::mem::take(&mut *self.lock_presence());
            let (arrived, left): (Vec<String>, Vec<String>) = {
                let entries = self.lock();
                changed
                    .iter()
                    .cloned()
                    .partition(|id| entries.get(id).is_some_and(|e| lock_entry(e).here))
            };
            if let Err(error) = self.store.present(arrived, left) {
                // Tried again at the next save.
                self.lock_presence().extend(changed);
                return Err(error);
            }
        }
        Ok(count)
    }
}

/// How old an instance's unsaved progress may get: its own point between
/// half of `after` and all of it, fixed by its id (FNV-1a), so that
/// instances changed at the same moment are saved spread over that time.
fn saved_after(instance_id: &str, after: Duration) -> Duration {
    let hash = instance_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    after / 2 + (after / 2).mul_f64((hash % 1024) as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::LabelGrant;
    use crate::registry::PROGRESS_SAVED_AFTER;
    use crate::registry::tests::{hello, registry};
    use duofleet_proto::v1::Hello;

    #[test]
    fn a_fleet_changed_at_once_is_saved_spread_over_the_second_half_of_the_interval() {
        let after = PROGRESS_SAVED_AFTER;
        let mut tenths = std::collections::BTreeSet::new();
        for i in 0..1000 {
            let age = saved_after(&format!("gitlab-{i:05}"), after);
            assert!(age >= after / 2 && age <= after, "{age:?}");
            assert_eq!(age, saved_after(&format!("gitlab-{i:05}"), after));
            tenths.insert((age.as_secs_f64() / after.as_secs_f64() * 10.0) as u32);
        }
        // Every 500 ms run of the saver from 2.5 s to 5 s takes a share.
        assert_eq!(tenths, (5..10).collect(), "{tenths:?}");
    }

    #[test]
    fn progress_is_saved_once_at_its_point_and_urgency_brings_it_forward() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = registry(dir.path());
        registry.progress_after = Duration::from_millis(400);
        let a = registry
            .connect(&hello("gitlab-a"), &LabelGrant::all())
            .unwrap();
        assert_eq!(registry.save_changed(false).unwrap(), 1, "a new instance");
        assert_eq!(registry.due.len(), 0);

        // Many changes, one queued save, made when its point has passed
        // (counted from after the first change, so never early).
        for revision in 5..50 {
            registry.set_desired(&a, "default", revision, true);
        }
        let changed = Instant::now();
        assert_eq!(registry.due.len(), 1);
        assert_eq!(registry.save_changed(false).unwrap(), 0);
        std::thread::sleep(
            (changed + saved_after("gitlab-a", registry.progress_after))
                .saturating_duration_since(Instant::now()),
        );
        assert_eq!(registry.save_changed(false).unwrap(), 1);
        assert_eq!(
            registry.store.load_instances().unwrap()[0].desired_revision,
            49
        );
        assert_eq!(registry.save_changed(false).unwrap(), 0);
        assert_eq!(registry.due.len(), 0, "a quiet fleet leaves nothing queued");

        // Queued for later, then a refused claim on it: saved at the next
        // run, and the later turn in the queue finds nothing to do.
        let queued_at = Instant::now();
        registry.set_desired(&a, "default", 50, true);
        assert!(
            registry
                .connect(
                    &Hello {
                        hostname: "another-host".into(),
                        ..hello("gitlab-a")
                    },
                    &LabelGrant::all(),
                )
                .is_err()
        );
        assert_eq!(registry.due.len(), 2);
        assert_eq!(registry.save_changed(false).unwrap(), 1);
        let saved = registry.store.load_instances().unwrap();
        assert_eq!(saved[0].desired_revision, 50);
        assert!(saved[0].conflict.contains("another-host"), "{saved:?}");

        // Changed again meanwhile: the earlier turn, when it comes, is
        // not this change's, which waits for its own point.
        let point = saved_after("gitlab-a", registry.progress_after);
        std::thread::sleep(point / 2);
        registry.set_desired(&a, "default", 51, true);
        let changed = Instant::now();
        std::thread::sleep((queued_at + point).saturating_duration_since(Instant::now()));
        assert_eq!(registry.save_changed(false).unwrap(), 0, "not due yet");
        assert_eq!(registry.due.len(), 1);
        std::thread::sleep((changed + point).saturating_duration_since(Instant::now()));
        assert_eq!(registry.save_changed(false).unwrap(), 1);
        assert_eq!(
            registry.store.load_instances().unwrap()[0].desired_revision,
            51
        );
        assert_eq!(registry.due.len(), 0);
    }
}
