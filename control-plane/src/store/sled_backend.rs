//! The embedded backend: one sled database under `DATA_DIR/db`, the only
//! code that knows sled.
//!
//! ```text
//! meta       schema_version -> u32, revision -> u64 (big endian)
//! models     name -> Model (prost, API key sealed)
//! profiles   name -> Profile (prost)
//! revisions  revision (u64 BE) -> Revision record (time, actor, summary, changes)
//! history    kind | name | 0x00 | revision (u64 BE) -> HistoryEntry (value, or empty = deleted)
//! instances  instance id -> Instance (what agents reported; not versioned)
//! tokens     name -> StoredToken (operator tokens: metadata and keyed hash)
//! certs      SHA-256 fingerprint -> IssuedCert (agent certificates in force)
//! rollouts   id -> Rollout
//! ```
//!
//! `history` is a multi-version log of every model and profile, so the
//! configuration at any revision can be rebuilt. A commit is one sled
//! transaction over the trees it touches, flushed and `fdatasync`ed before
//! it returns ([`Trees::flush`]).
//!
//! sled remembers the first I/O error it meets (a full disk, typically) and
//! fails every later operation with it, even once space is back. So after a
//! failed write the backend marks itself failed, and the next write first
//! reopens the database ([`SledBackend::recover`]): it drops the failed
//! handle, opens the files again, and checks what is on disk against the
//! newest acknowledged revision. A commit that failed may still have
//! reached the disk (sled writes its log in the background as well),
//! although its caller heard an error. Such revisions were never
//! acknowledged, so recovery takes them out again: an error keeps meaning
//! "nothing changed".

use super::backend::{Backend, Changeset, Fleet, HistoryEntry, Records, Revisions, Stored, Table};
use super::{StoreError, decode};
use duofleet_proto::v1::{self as pb, Model, Profile};
use prost::Message;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

pub(super) const SCHEMA_KEY: &[u8] = b"schema_version";
pub(super) const REVISION_KEY: &[u8] = b"revision";
pub(super) const MODEL_KIND: u8 = b'm';
pub(super) const PROFILE_KIND: u8 = b'p';

/// sled's page cache. The configuration is small and the fleet's instances
/// live in the registry's memory: sled's default 1 GiB cache would only hold
/// copies of instance records (about 30 KiB per agent at 10,000).
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// How many records the saver's writes put in one sled batch. sled
/// applies a batch under its one process-wide write lock, which a
/// configuration commit (a transaction) and a flush wait for, and the
/// saver's due records at 50,000 agents (about 10,000 a run, 22 ms) held
/// commits up: in three A/B runs there, taking turns, the mean commit took
/// 10.8, 3.0 and 2.4 ms and an operator's OK up to 100 ms with one batch,
/// against 1.7, 1.4 and 1.3 ms and at most 17.5 ms in batches of this
/// many. A commit now waits for one batch at most.
const BATCH_RECORDS: usize = 256;

/// How long a reopen waits for calls still using the failed handle, and for
/// sled's flusher thread to let go of the file lock.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// One open sled database and its trees.
pub(crate) struct Trees {
    pub db: sled::Db,
    /// sled's log file (`db` in its directory), for [`Trees::flush`].
    log: std::fs::File,
    pub meta: sled::Tree,
    pub models: sled::Tree,
    pub profiles: sled::Tree,
    pub revisions: sled::Tree,
    pub history: sled::Tree,
    pub instances: sled::Tree,
    pub tokens: sled::Tree,
    pub certs: sled::Tree,
    pub rollouts: sled::Tree,
}

impl Trees {
    pub fn open(dir: &Path) -> Result<Trees, sled::Error> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()?;
        let log = durable_log(dir)?;
        Ok(Trees {
            log,
            meta: db.open_tree("meta")?,
            models: db.open_tree("models")?,
            profiles: db.open_tree("profiles")?,
            revisions: db.open_tree("revisions")?,
            history: db.open_tree("history")?,
            instances: db.open_tree("instances")?,
            tokens: db.open_tree("tokens")?,
            certs: db.open_tree("certs")?,
            rollouts: db.open_tree("rollouts")?,
            db,
        })
    }

    /// Like [`Trees::open`], retrying while the previous handle's flusher
    /// thread still holds the file lock.
    fn reopen(dir: &Path) -> Result<Trees, sled::Error> {
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            match Trees::open(dir) {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// Writes everything sled holds in memory to its log and makes it
    /// durable. sled's own flush on Linux ends in `sync_file_range`, which
    /// waits for the data pages but neither commits the file's size to the
    /// filesystem's journal nor empties the disk's write cache (sled leaves
    /// that to its flusher thread's `fsync` every 500 ms). The `fdatasync`
    /// here does both, so a write is on disk when this returns whatever the
    /// filesystem, and not only because a later `fsync` of another file
    /// (the high-water mark's) happened to commit the journal too.
    pub fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush()?;
        self.log.sync_data()?;
        Ok(())
    }

    /// The newest revision the database itself records (0 when empty).
    pub fn revision(&self) -> Result<u64, StoreError> {
        Ok(match self.meta.get(REVISION_KEY)? {
            Some(raw) => u64::from_be_bytes(raw.as_ref().try_into().unwrap_or_default()),
            None => 0,
        })
    }

    fn table(&self, table: Table) -> &sled::Tree {
        match table {
            Table::Instances => &self.instances,
            Table::Tokens => &self.tokens,
            Table::Certs => &self.certs,
            Table::Rollouts => &self.rollouts,
        }
    }

    /// The newest history entry of one model or profile at or before
    /// `revision`.
    fn entry_at(
        &self,
        kind: u8,
        name: &str,
        revision: u64,
    ) -> Result<Option<HistoryEntry>, StoreError> {
        let start = history_key(kind, name, 0);
        let end = history_key(kind, name, revision);
        match self.history.range(start..=end).next_back() {
            Some(item) => {
                let (_, value) = item?;
                Ok(Some(decode(&value, || format!("history of {name}"))?))
            }
            None => Ok(None),
        }
    }
}

pub struct SledBackend {
    /// The database directory, for a reopen.
    dir: PathBuf,
    /// `None` only while a reopen after a failed write has not succeeded.
    trees: RwLock<Option<Arc<Trees>>>,
    /// A write failed: the next one reopens the database first.
    failed: AtomicBool,
    /// The newest revision whose commit returned OK (or was loaded).
    acknowledged: AtomicU64,
    /// Held by a reopen, and by every commit.
    writer: Mutex<()>,
}

impl SledBackend {
    pub fn open(dir: &Path) -> Result<SledBackend, StoreError> {
        let trees = Trees::open(dir)?;
        let acknowledged = trees.revision()?;
        Ok(SledBackend {
            dir: dir.to_path_buf(),
            trees: RwLock::new(Some(Arc::new(trees))),
            failed: AtomicBool::new(false),
            acknowledged: AtomicU64::new(acknowledged),
            writer: Mutex::new(()),
        })
    }

    /// The open database; an error while a reopen after a storage failure
    /// has not succeeded yet.
    pub(crate) fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.trees
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Runs a write, reopening the database first if an earlier write
    /// failed, and noting a failure of this one.
    fn write<R>(&self, op: impl FnOnce(&Trees) -> Result<R, StoreError>) -> Result<R, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            self.recover_locked()?;
        }
        let trees = self.trees()?;
        self.noting_failure(op(&trees))
    }

    /// Marks the backend failed when `result` is an I/O error, so that the
    /// next write reopens the database.
    fn noting_failure<R>(&self, result: Result<R, StoreError>) -> Result<R, StoreError> {
        if let Err(error @ StoreError::Storage(sled::Error::Io(_))) = &result
            && !self.failed.swap(true, Ordering::AcqRel)
        {
            tracing::error!(
                error = %crate::error::error_chain(error),
                "a storage write failed; the database is reopened before the next write"
            );
        }
        result
    }

    /// Marks the backend failed, as a failed write does (for tests).
    #[cfg(test)]
    pub(crate) fn fail_for_test(&self, acknowledged: u64) {
        self.acknowledged.store(acknowledged, Ordering::Release);
        self.failed.store(true, Ordering::Release);
    }

    /// After a failed write: reopens the database and puts it back at the
    /// acknowledged revision. The caller holds the writer lock, so no commit
    /// runs meanwhile. On error the backend stays failed and the next write
    /// tries again.
    fn recover_locked(&self) -> Result<(), StoreError> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.trees.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.take() {
            // Calls that took the handle before the failure still hold it;
            // sled's file lock goes only with the last of them.
            let deadline = Instant::now() + RELEASE_WAIT;
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(trees) => break drop(trees),
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(shared) => {
                        *slot = Some(shared);
                        return Err(StoreError::Unavailable);
                    }
                }
            }
        }
        let trees = Trees::reopen(&self.dir)?;
        let acknowledged = self.acknowledged.load(Ordering::Acquire);
        let found = trees.revision()?;
        if found < acknowledged {
            return Err(StoreError::LostOnReopen {
                found,
                acknowledged,
            });
        }
        if found > acknowledged {
            discard_unacknowledged(&trees, acknowledged, found)?;
        }
        *slot = Some(Arc::new(trees));
        self.failed.store(false, Ordering::Release);
        tracing::info!(
            revision = acknowledged,
            "storage recovered: the database was reopened"
        );
        Ok(())
    }

    /// Copies the whole database into a new sled database at `dest`.
    /// The caller holds configuration writes off.
    pub fn backup(&self, dest: &Path) -> Result<(), StoreError> {
        let source = self.trees()?;
        let target = sled::Config::new().path(dest).open()?;
        target.import(source.db.export());
        target.flush()?;
        durable_log(dest)
            .and_then(|log| log.sync_data())
            .map_err(sled::Error::from)?;
        Ok(())
    }
}

/// Opens sled's log file in `dir`, once sled has created it, and makes the
/// file's name durable: `dir` and its parent are synced, so the database
/// a first write went to is still found after a crash.
fn durable_log(dir: &Path) -> std::io::Result<std::fs::File> {
    let log = std::fs::File::open(dir.join("db"))?;
    std::fs::File::open(dir)?.sync_all()?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(log)
}

/// Takes out revisions after `acked` (which reached the disk although
/// their commit failed): the models and profiles they touched go back to
/// their values at `acked`, in one transaction, flushed.
fn discard_unacknowledged(trees: &Trees, acked: u64, found: u64) -> Result<(), StoreError> {
    let mut touched = BTreeSet::new();
    let mut stale_history = Vec::new();
    for item in trees.history.iter() {
        let (key, _) = item?;
        if let Some((kind, name, at)) = split_history_key(&key)
            && at > acked
        {
            touched.insert((kind, name));
            stale_history.push(key);
        }
    }
    let mut restore = Vec::new();
    for (kind, name) in &touched {
        let entry = trees.entry_at(*kind, name, acked)?;
        let value = entry.and_then(|e| match *kind {
            MODEL_KIND => e.model.map(|m| m.encode_to_vec()),
            _ => e.profile.map(|p| p.encode_to_vec()),
        });
        restore.push((*kind, name.clone(), value));
    }
    let first_stale = (acked + 1).to_be_bytes();
    let stale_revisions = trees
        .revisions
        .range(first_stale..)
        .keys()
        .collect::<Result<Vec<_>, _>>()?;
    (
        &trees.meta,
        &trees.models,
        &trees.profiles,
        &trees.revisions,
        &trees.history,
    )
        .transaction(|(meta, models, profiles, revisions, history)| {
            meta.insert(REVISION_KEY, &acked.to_be_bytes())?;
            for (kind, name, value) in &restore {
                let tree = if *kind == MODEL_KIND {
                    &models
                } else {
                    &profiles
                };
                match value {
                    Some(value) => tree.insert(name.as_bytes(), value.as_slice())?,
                    None => tree.remove(name.as_bytes())?,
                };
            }
            for key in &stale_history {
                history.remove(key)?;
            }
            for key in &stale_revisions {
                revisions.remove(key)?;
            }
            Ok(())
        })
        .map_err(unabortable)?;
    trees.flush()?;
    tracing::warn!(
        from = acked + 1,
        to = found,
        "revisions that reached the disk although their commit failed were taken out again: they were never acknowledged"
    );
    Ok(())
}

impl Revisions for SledBackend {
    fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .trees()?
            .meta
            .get(SCHEMA_KEY)?
            .map(|raw| u32::from_be_bytes(raw.as_ref().try_into().unwrap_or([0xff; 4]))))
    }

    fn initialize(&self, schema: u32, default: &Profile) -> Result<(), StoreError> {
        let name = default.name.clone();
        let entry = HistoryEntry {
            model: None,
            profile: Some(default.clone()),
        };
        self.write(|t| {
            (&t.meta, &t.profiles, &t.history)
                .transaction(|(meta, profiles, history)| {
                    if meta.get(SCHEMA_KEY)?.is_some() {
                        return Ok(());
                    }
                    meta.insert(SCHEMA_KEY, &schema.to_be_bytes())?;
                    meta.insert(REVISION_KEY, &0u64.to_be_bytes())?;
                    profiles.insert(name.as_bytes(), default.encode_to_vec())?;
                    history.insert(history_key(PROFILE_KIND, &name, 0), entry.encode_to_vec())?;
                    Ok(())
                })
                .map_err(unabortable)?;
            t.flush()?;
            Ok(())
        })
    }

    fn reseal(
        &self,
        schema: u32,
        reseal: &dyn Fn(Model) -> Result<Model, StoreError>,
    ) -> Result<(usize, usize), StoreError> {
        self.write(|t| {
            let mut models = Vec::new();
            for item in t.models.iter() {
                let (key, value) = item?;
                let model: Model = decode(&value, || "model".to_string())?;
                models.push((key, reseal(model)?));
            }
            let mut history = Vec::new();
            for item in t.history.iter() {
                let (key, value) = item?;
                let mut entry: HistoryEntry = decode(&value, || "history".to_string())?;
                if let Some(model) = entry.model.take() {
                    entry.model = Some(reseal(model)?);
                    history.push((key, entry));
                }
            }
            (&t.meta, &t.models, &t.history)
                .transaction(|(meta, models_tree, history_tree)| {
                    for (key, model) in &models {
                        models_tree.insert(key, model.encode_to_vec())?;
                    }
                    for (key, entry) in &history {
                        history_tree.insert(key, entry.encode_to_vec())?;
                    }
                    meta.insert(SCHEMA_KEY, &schema.to_be_bytes())?;
                    Ok(())
                })
                .map_err(unabortable)?;
            t.flush()?;
            Ok((models.len(), history.len()))
        })
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.trees()?.revision()
    }

    fn load(&self) -> Result<Stored, StoreError> {
        let t = self.trees()?;
        Ok(Stored {
            revision: t.revision()?,
            models: load_tree(&t.models, "model")?,
            profiles: load_tree(&t.profiles, "profile")?,
        })
    }

    fn commit(&self, change: Changeset<'_>) -> Result<(), StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.recover_locked()?;
        let revision = change.record.revision;
        let revision_key = revision.to_be_bytes();
        let expected = revision.wrapping_sub(1).to_be_bytes();
        let t = self.trees()?;
        let written = (
            &t.meta,
            &t.models,
            &t.profiles,
            &t.revisions,
            &t.history,
            &t.rollouts,
        )
            .transaction(|(meta, models, profiles, revisions, history, rollouts)| {
                let stored = meta.get(REVISION_KEY)?;
                if stored.as_deref() != Some(&expected[..]) {
                    let current = stored
                        .and_then(|raw| raw.as_ref().try_into().ok())
                        .map_or(0, u64::from_be_bytes);
                    return Err(ConflictableTransactionError::Abort(current));
                }
                meta.insert(REVISION_KEY, &revision_key)?;
                if let Some(attached) = change.attached {
                    rollouts.insert(attached.key.as_bytes(), attached.value.as_slice())?;
                }
                for (name, model) in &change.models {
                    match model {
                        Some(model) => models.insert(name.as_bytes(), model.encode_to_vec())?,
                        None => models.remove(name.as_bytes())?,
                    };
                    let entry = HistoryEntry {
                        model: model.clone(),
                        profile: None,
                    };
                    history.insert(
                        history_key(MODEL_KIND, name, revision),
                        entry.encode_to_vec(),
                    )?;
                }
                for (name, profile) in &change.profiles {
                    match profile {
                        Some(profile) => {
                            profiles.insert(name.as_bytes(), profile.encode_to_vec())?
                        }
                        None => profiles.remove(name.as_bytes())?,
                    };
                    let entry = HistoryEntry {
                        model: None,
                        profile: profile.clone(),
                    };
                    history.insert(
                        history_key(PROFILE_KIND, name, revision),
                        entry.encode_to_vec(),
                    )?;
                }
                revisions.insert(&revision_key, change.record.encode_to_vec())?;
                Ok(())
            });
        let written = match written {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(current)) => {
                return Err(StoreError::Conflict { revision, current });
            }
            Err(TransactionError::Storage(e)) => Err(StoreError::from(e)),
        }
        // Durable before anyone hears of it: a revision number that was
        // published must never be reused after a crash.
        .and_then(|()| t.flush().map_err(StoreError::from));
        self.noting_failure(written)?;
        self.acknowledged.store(revision, Ordering::Release);
        Ok(())
    }

    fn record(&self, revision: u64) -> Result<Option<pb::Revision>, StoreError> {
        self.trees()?
            .revisions
            .get(revision.to_be_bytes())?
            .map(|raw| decode(&raw, || format!("revision {revision}")))
            .transpose()
    }

    fn records(&self, before: Option<u64>, limit: usize) -> Result<Vec<pb::Revision>, StoreError> {
        let end = before.unwrap_or(u64::MAX).to_be_bytes();
        self.trees()?
            .revisions
            .range(..end)
            .rev()
            .take(limit)
            .map(|item| {
                let (key, value) = item?;
                decode(&value, || format!("revision {:?}", key.as_ref()))
            })
            .collect()
    }

    fn config_at(&self, revision: u64) -> Result<Stored, StoreError> {
        let mut config = Stored {
            revision,
            ..Stored::default()
        };
        for item in self.trees()?.history.iter() {
            let (key, value) = item?;
            let Some((kind, name, at)) = split_history_key(&key) else {
                continue;
            };
            if at > revision {
                continue;
            }
            // Keys sort by (kind, name, revision): the last one seen wins.
            let entry: HistoryEntry = decode(&value, || format!("history of {name}"))?;
            match kind {
                MODEL_KIND => set_or_remove(&mut config.models, name, entry.model),
                _ => set_or_remove(&mut config.profiles, name, entry.profile),
            }
        }
        Ok(config)
    }
}

impl Records for SledBackend {
    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|t| {
            t.table(table).insert(key.as_bytes(), value)?;
            t.flush()?;
            Ok(())
        })
    }

    fn insert_new(&self, table: Table, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        self.write(|t| {
            let inserted = t
                .table(table)
                .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(value))?
                .is_ok();
            t.flush()?;
            Ok(inserted)
        })
    }

    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: &[u8],
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        self.write(|t| {
            let swapped = t
                .table(table)
                .compare_and_swap(key.as_bytes(), Some(expected), new)?
                .is_ok();
            t.flush()?;
            Ok(swapped)
        })
    }

    fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        self.write(|t| {
            let removed = t.table(table).remove(key.as_bytes())?.is_some();
            t.flush()?;
            Ok(removed)
        })
    }

    fn put_batch(&self, table: Table, records: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let mut batch = sled::Batch::default();
            for (key, value) in records.by_ref().take(BATCH_RECORDS) {
                batch.insert(key.as_bytes(), value);
            }
            self.write(|t| Ok(t.table(table).apply_batch(batch)?))?;
        }
        Ok(())
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .trees()?
            .table(table)
            .get(key.as_bytes())?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.trees()?
            .table(table)
            .iter()
            .map(|item| {
                let (key, value) = item?;
                Ok((String::from_utf8_lossy(&key).into_owned(), value.to_vec()))
            })
            .collect()
    }
}

/// One duofleetd: nothing to share.
impl Fleet for SledBackend {}

impl Backend for SledBackend {
    fn probe_write(&self) -> Result<(), StoreError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        self.write(|t| {
            t.meta.insert(b"ready_probe", &now.to_be_bytes())?;
            t.flush()?;
            Ok(())
        })
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.trees()?.flush()?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!("sled at {}", self.dir.display())
    }

    fn as_sled(&self) -> Option<&SledBackend> {
        Some(self)
    }
}

fn set_or_remove<T>(map: &mut BTreeMap<String, T>, name: String, value: Option<T>) {
    match value {
        Some(value) => map.insert(name, value),
        None => map.remove(&name),
    };
}

pub(super) fn history_key(kind: u8, name: &str, revision: u64) -> Vec<u8> {
    // Names never hold control characters, so 0x00 separates unambiguously.
    let mut key = Vec::with_capacity(name.len() + 10);
    key.push(kind);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&revision.to_be_bytes());
    key
}

pub(super) fn split_history_key(key: &[u8]) -> Option<(u8, String, u64)> {
    let (&kind, rest) = key.split_first()?;
    let (name, tail) = rest.split_at(rest.len().checked_sub(9)?);
    let (&0, revision) = tail.split_first()? else {
        return None;
    };
    Some((
        kind,
        String::from_utf8(name.to_vec()).ok()?,
        u64::from_be_bytes(revision.try_into().ok()?),
    ))
}

fn load_tree<T: Message + Default>(
    tree: &sled::Tree,
    what: &str,
) -> Result<BTreeMap<String, T>, StoreError> {
    tree.iter()
        .map(|item| {
            let (key, value) = item?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let decoded = decode(&value, || format!("{what} {name}"))?;
            Ok((name, decoded))
        })
        .collect()
}

fn unabortable(error: TransactionError<()>) -> sled::Error {
    match error {
        TransactionError::Storage(e) => e,
        TransactionError::Abort(()) => unreachable!("no transaction here aborts"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;
    use crate::secrets::Sealer;
    use crate::store::Store;

    fn model(name: &str) -> Model {
        Model {
            name: name.into(),
            family: "mixtral".into(),
            endpoint: "https://vllm:8000/v1".into(),
            api_key: format!("key-of-{name}"),
            ..Default::default()
        }
    }

    /// A commit whose caller heard an error, but which reached the disk
    /// anyway, is taken out again when the database is reopened.
    #[test]
    fn a_reopen_takes_out_revisions_that_were_never_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), catalog::get(), Sealer::new(&[3; 32], None)).unwrap();
        let create = |name: &str| {
            store
                .mutate("test", |c, cat| c.create_model(cat, model(name)))
                .unwrap()
        };
        create("a");
        let updated = Model {
            api_key: "rotated".into(),
            ..model("a")
        };
        store
            .mutate("test", |c, cat| c.update_model(cat, updated.clone(), &[]))
            .unwrap();
        let acknowledged = store.current();
        // Revisions 3 and 4 reach the disk; their callers hear an error.
        create("b");
        store.mutate("test", |c, _| c.delete_model("a")).unwrap();
        store.current.send_replace(acknowledged.clone());
        store
            .backend
            .as_sled()
            .unwrap()
            .fail_for_test(acknowledged.revision);

        let commit = create("c");
        assert_eq!(commit.revision.unwrap().revision, 3);
        let config = store.current();
        assert_eq!(config.models.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(config.models["a"].api_key, "rotated");
        let revisions: Vec<_> = store
            .list_revisions(None, 10)
            .unwrap()
            .into_iter()
            .map(|r| (r.revision, r.summary))
            .collect();
        assert_eq!(
            revisions,
            [
                (3, "create model c".to_string()),
                (2, "update model a (family, endpoint, api_key)".to_string()),
                (1, "create model a".to_string())
            ]
        );
        let (_, at_three) = store.get_revision(3).unwrap();
        assert_eq!(at_three.models.keys().collect::<Vec<_>>(), ["a", "c"]);
        // And what was taken out stays out on disk.
        assert_eq!(store.load().unwrap().models, config.models);
    }

    #[test]
    fn history_keys_round_trip() {
        for (kind, name, revision) in [(MODEL_KIND, "a", 0), (PROFILE_KIND, "x.y-z", u64::MAX)] {
            let key = history_key(kind, name, revision);
            assert_eq!(
                split_history_key(&key),
                Some((kind, name.to_string(), revision))
            );
        }
        assert_eq!(split_history_key(b"short"), None);
    }
}
