//! The only module that knows sled.
//!
//! Layout (one sled database under `DATA_DIR/db`):
//!
//! ```text
//! meta       schema_version -> u32, revision -> u64 (big endian)
//! models     name -> Model (prost, API key inside)
//! profiles   name -> Profile (prost)
//! revisions  revision (u64 BE) -> Revision record (time, actor, summary, changes)
//! history    kind | name | 0x00 | revision (u64 BE) -> HistoryEntry (value, or empty = deleted)
//! instances  instance id -> Instance (what agents reported; not versioned)
//! tokens     name -> StoredToken (operator tokens: metadata and keyed hash)
//! certs      SHA-256 fingerprint -> IssuedCert (agent certificates in force)
//! ```
//!
//! `history` is a multi-version log of every model and profile, so the full
//! configuration at any revision can be rebuilt (GetRevision, Rollback).
//! Every mutation is one sled transaction over all five trees, flushed to
//! disk before the caller hears OK, and only then published to readers
//! through a `tokio::sync::watch` of the current [`Config`] and a broadcast
//! of revision records. Writers are serialised by one mutex: configuration
//! changes are rare and small, and serialising them keeps "exactly one of 50
//! concurrent creates wins" trivially true.
//!
//! After each commit the revision is also written to `DATA_DIR/revision.hwm`
//! (`high_water`), outside sled's files: a database found behind it at start
//! is refused, never served. `check` walks every record and revision.

use crate::catalog::Catalog;
use crate::config::{self, Config};
use crate::error::ConfigError;
use crate::secrets::{SealError, Sealer};
use duofleet_proto::v1::{self as pb, ChangeAction, Model, Profile, ResourceKind};
use prost::Message;
use sled::Transactional;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;
use tokio::sync::{broadcast, watch};

mod check;
mod high_water;
mod trees;

pub use check::{CheckReport, Damage};
use trees::Trees;

/// The on-disk layout version this binary writes. A newer database is
/// refused; an older one is migrated at open. Version 2 seals API keys.
pub const SCHEMA_VERSION: u32 = 2;

const SCHEMA_KEY: &[u8] = b"schema_version";
const REVISION_KEY: &[u8] = b"revision";
const MODEL_KIND: u8 = b'm';
const PROFILE_KIND: u8 = b'p';

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("storage I/O failed")]
    Storage(#[from] sled::Error),
    #[error("stored {what} is corrupt")]
    Corrupt {
        what: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error(
        "the database has schema version {found}, newer than this duofleetd supports ({SCHEMA_VERSION}); run a newer duofleetd"
    )]
    SchemaTooNew { found: u32 },
    #[error(transparent)]
    Sealed(#[from] SealError),
    #[error(
        "the database holds revision {found}, but revision {acknowledged} was acknowledged (recorded in {}): database files are missing or an older copy was put in place. Restore the data dir from a backup (start duofleetd with --data-dir on the backup's directory), or, to accept the loss, delete {}",
        .path.display(), .path.display()
    )]
    BehindAcknowledged {
        found: u64,
        acknowledged: u64,
        path: PathBuf,
    },
    #[error(
        "storage is unavailable: the database is being reopened after a failed write; retry, and see the duofleetd log if this persists"
    )]
    Unavailable,
    #[error(
        "after a storage failure the database reopened at revision {found}, behind the acknowledged revision {acknowledged}: stop duofleetd and run `duofleetd check`"
    )]
    LostOnReopen { found: u64, acknowledged: u64 },
    #[error("cannot record the acknowledged revision in {}", .path.display())]
    HighWater {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// The file system is out of space (ENOSPC), or a quota or file-size
    /// limit is reached (EDQUOT, EFBIG).
    /// sled re-creates the I/O errors it passes on, keeping only their
    /// kind, so the kind is what is checked.
    pub fn is_disk_full(&self) -> bool {
        use std::io::ErrorKind::{FileTooLarge, QuotaExceeded, StorageFull};
        matches!(self, StoreError::Storage(sled::Error::Io(io))
            if matches!(io.kind(), StorageFull | QuotaExceeded | FileTooLarge))
    }
}

/// A stored model or profile at one revision; neither set means deleted.
#[derive(Clone, PartialEq, prost::Message)]
struct HistoryEntry {
    #[prost(message, optional, tag = "1")]
    model: Option<Model>,
    #[prost(message, optional, tag = "2")]
    profile: Option<Profile>,
}

/// An operator token as stored: never its secret, only a keyed hash.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredToken {
    #[prost(message, optional, tag = "1")]
    pub token: Option<pb::Token>,
    #[prost(string, tag = "2")]
    pub hash: String,
}

/// What a successful mutation produced.
pub struct Commit {
    /// The configuration after the change (with `validate_only`: as it
    /// would be; the current one is unchanged).
    pub config: Arc<Config>,
    /// The new revision, or `None` when the operation changed nothing.
    /// With `validate_only`: the record it would commit.
    pub revision: Option<pb::Revision>,
    /// The configuration the change started from.
    pub previous: Arc<Config>,
}

/// A check of every change against rules the store does not own (the
/// profiles an active rollout holds): old and new configuration.
pub type Guard = Arc<dyn Fn(&Config, &Config) -> Result<(), ConfigError> + Send + Sync>;

/// A record committed in the same transaction as a revision: a rollout
/// starts exactly when its revision does.
pub struct Attached {
    pub key: String,
    pub value: Vec<u8>,
}

/// The staged-change check: old and new configuration, and the revision
/// number the change will get; it may attach a record to the commit.
pub type StageFn<'a> =
    Box<dyn FnOnce(&Config, &Config, u64) -> Result<Option<Attached>, ConfigError> + 'a>;

/// What checks a change besides its own operation.
pub enum Stage<'a> {
    /// The store's guard (the default for every change).
    Guarded,
    /// No guard: the caller owns the rules (a rollout's own abort).
    Unguarded,
    /// A staged change: this runs instead of the guard.
    Staged(StageFn<'a>),
}

/// A change about to be committed: from `old` to `new`; `always` makes a
/// revision even when nothing differs (a rollback).
struct Pending {
    old: Arc<Config>,
    new: Config,
    summary: String,
    always: bool,
}

/// How a change is made.
#[derive(Debug, Clone, Copy, Default)]
pub struct Write {
    /// Run and check everything, then write nothing.
    pub validate_only: bool,
    /// Refuse (`ConfigError::Stale`) unless the configuration is still at
    /// this revision.
    pub expected_revision: Option<u64>,
}

pub struct Store {
    /// `DATA_DIR/revision.hwm`: the newest acknowledged revision.
    high_water: Option<PathBuf>,
    /// The database directory, for a reopen (see `trees`).
    dir: PathBuf,
    /// `None` only while a reopen after a failed write has not succeeded.
    trees: RwLock<Option<Arc<Trees>>>,
    /// A write failed: the next one reopens the database first.
    failed: AtomicBool,
    catalog: &'static Catalog,
    sealer: Sealer,
    guard: RwLock<Option<Guard>>,
    writer: Mutex<()>,
    current: watch::Sender<Arc<Config>>,
    revision_events: broadcast::Sender<pb::Revision>,
}

impl Store {
    /// Opens (or creates) the database in `dir` and loads the configuration.
    pub fn open(dir: &Path, catalog: &'static Catalog, sealer: Sealer) -> Result<Self, StoreError> {
        Store::open_guarded(dir, None, catalog, sealer)
    }

    /// Opens the database and checks it against `high_water`, a file outside
    /// sled's own that holds the newest acknowledged revision: a database
    /// behind it (lost or replaced files) is refused before anything is
    /// written to it.
    pub fn open_guarded(
        dir: &Path,
        high_water: Option<&Path>,
        catalog: &'static Catalog,
        sealer: Sealer,
    ) -> Result<Self, StoreError> {
        let store = Store::open_sled(dir, high_water, catalog, sealer)?;
        if let Some(path) = high_water {
            let acknowledged = high_water::read(path)?;
            let found = store.stored_revision()?;
            if found < acknowledged {
                return Err(StoreError::BehindAcknowledged {
                    found,
                    acknowledged,
                    path: path.to_path_buf(),
                });
            }
        }
        store.prepare()?;
        let config = store.load()?;
        store.record_high_water(config.revision)?;
        store.current.send_replace(Arc::new(config));
        Ok(store)
    }

    /// A small durable write, for readiness: fails while storage cannot
    /// write.
    /// After a failed write this is what reopens the database, so a probing
    /// readiness check brings storage back once there is space again.
    pub fn probe_write(&self) -> Result<(), StoreError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        self.write(|t| {
            t.meta.insert(b"ready_probe", &now.to_be_bytes())?;
            t.db.flush()?;
            Ok(())
        })
    }

    /// The newest revision the database itself records (0 when empty).
    fn stored_revision(&self) -> Result<u64, StoreError> {
        self.trees()?.revision()
    }

    fn record_high_water(&self, revision: u64) -> Result<(), StoreError> {
        match &self.high_water {
            Some(path) => high_water::write(path, revision),
            None => Ok(()),
        }
    }

    fn open_sled(
        dir: &Path,
        high_water: Option<&Path>,
        catalog: &'static Catalog,
        sealer: Sealer,
    ) -> Result<Self, StoreError> {
        let store = Store {
            trees: RwLock::new(Some(Arc::new(Trees::open(dir)?))),
            dir: dir.to_path_buf(),
            failed: AtomicBool::new(false),
            guard: RwLock::new(None),
            catalog,
            sealer,
            writer: Mutex::new(()),
            current: watch::Sender::new(Arc::new(Config::default())),
            revision_events: broadcast::Sender::new(256),
            high_water: high_water.map(Path::to_path_buf),
        };
        Ok(store)
    }

    /// A new database gets its schema and the default profile; an older
    /// one is migrated; a key rotation re-seals.
    fn prepare(&self) -> Result<(), StoreError> {
        match self.trees()?.meta.get(SCHEMA_KEY)? {
            None => self.initialize()?,
            Some(raw) => {
                let found = u32::from_be_bytes(raw.as_ref().try_into().unwrap_or([0xff; 4]));
                if found > SCHEMA_VERSION {
                    return Err(StoreError::SchemaTooNew { found });
                }
                if found < SCHEMA_VERSION || self.sealer.has_previous() {
                    self.reseal_all()?;
                }
            }
        }
        Ok(())
    }

    fn initialize(&self) -> Result<(), StoreError> {
        let now = prost_types::Timestamp::from(SystemTime::now());
        let default = Profile {
            create_time: Some(now),
            update_time: Some(now),
            ..config::default_profile()
        };
        let name = default.name.clone();
        let entry = HistoryEntry {
            model: None,
            profile: Some(default.clone()),
        };
        let t = self.trees()?;
        (&t.meta, &t.profiles, &t.history)
            .transaction(|(meta, profiles, history)| {
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                meta.insert(REVISION_KEY, &0u64.to_be_bytes())?;
                profiles.insert(name.as_bytes(), default.encode_to_vec())?;
                history.insert(history_key(PROFILE_KIND, &name, 0), entry.encode_to_vec())?;
                Ok(())
            })
            .map_err(unabortable)?;
        t.db.flush()?;
        Ok(())
    }

    /// Seals every stored API key, current and historical, under the
    /// current key (migration from version 1, or key rotation), in one
    /// transaction.
    fn reseal_all(&self) -> Result<(), StoreError> {
        let t = self.trees()?;
        let mut models = Vec::new();
        for item in t.models.iter() {
            let (key, value) = item?;
            let model: Model = decode(&value, || "model".to_string())?;
            models.push((key, self.seal_model(&self.open_model(model)?)));
        }
        let mut history = Vec::new();
        for item in t.history.iter() {
            let (key, value) = item?;
            let mut entry: HistoryEntry = decode(&value, || "history".to_string())?;
            if let Some(model) = entry.model.take() {
                entry.model = Some(self.seal_model(&self.open_model(model)?));
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
                meta.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                Ok(())
            })
            .map_err(unabortable)?;
        t.db.flush()?;
        tracing::info!(
            models = models.len(),
            history = history.len(),
            "API keys sealed under the current secret key"
        );
        Ok(())
    }

    fn seal_model(&self, model: &Model) -> Model {
        Model {
            api_key: self.sealer.seal(&model.name, &model.api_key),
            ..model.clone()
        }
    }

    fn open_model(&self, mut model: Model) -> Result<Model, StoreError> {
        model.api_key = self.sealer.open(&model.name, &model.api_key)?;
        Ok(model)
    }

    fn load(&self) -> Result<Config, StoreError> {
        let t = self.trees()?;
        let revision = t.revision()?;
        let models = load_tree::<Model>(&t.models, "model")?
            .into_iter()
            .map(|(name, model)| Ok((name, self.open_model(model)?)))
            .collect::<Result<_, StoreError>>()?;
        Ok(Config {
            revision,
            models,
            profiles: load_tree(&t.profiles, "profile")?,
        })
    }

    /// The configuration as of the newest committed revision.
    pub fn current(&self) -> Arc<Config> {
        self.current.borrow().clone()
    }

    /// Follows the current configuration; it changes only after a flushed commit.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Config>> {
        self.current.subscribe()
    }

    /// Every new revision record, as it is committed.
    pub fn revision_events(&self) -> broadcast::Receiver<pb::Revision> {
        self.revision_events.subscribe()
    }

    pub fn catalog(&self) -> &'static Catalog {
        self.catalog
    }

    /// Runs `op` on a copy of the current configuration and commits what it
    /// changed as one new revision, durable before this returns. A refused
    /// operation changes nothing; one that changes nothing makes no revision.
    pub fn mutate(
        &self,
        actor: &str,
        op: impl FnOnce(&mut Config, &'static Catalog) -> Result<String, ConfigError>,
    ) -> Result<Commit, StoreError> {
        self.change(actor, Write::default(), op)
    }

    /// Sets the check every later change must pass (see [`Guard`]).
    pub fn set_guard(&self, guard: Guard) {
        *self.guard.write().unwrap_or_else(|e| e.into_inner()) = Some(guard);
    }

    /// [`Store::mutate`], with a dry run or a check of the revision the
    /// caller saw.
    pub fn change(
        &self,
        actor: &str,
        how: Write,
        op: impl FnOnce(&mut Config, &'static Catalog) -> Result<String, ConfigError>,
    ) -> Result<Commit, StoreError> {
        self.change_with(actor, how, Stage::Guarded, op)
    }

    /// [`Store::change`] with another [`Stage`] than the guard.
    pub fn change_with(
        &self,
        actor: &str,
        how: Write,
        stage: Stage<'_>,
        op: impl FnOnce(&mut Config, &'static Catalog) -> Result<String, ConfigError>,
    ) -> Result<Commit, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.recover_locked()?;
        let old = self.current();
        if let Some(expected) = how.expected_revision
            && expected != old.revision
        {
            return Err(ConfigError::Stale {
                expected,
                current: old.revision,
            }
            .into());
        }
        let mut new = (*old).clone();
        let summary = op(&mut new, self.catalog)?;
        let change = Pending {
            old,
            new,
            summary,
            always: false,
        };
        self.commit_locked(actor, change, how.validate_only, stage)
    }

    /// Makes a new revision whose models and profiles equal those at
    /// `target`. It restores configuration, never credentials: every model
    /// keeps its current API key (a rotated key stays rotated), and a model
    /// brought back from deletion comes back without one.
    pub fn rollback(
        &self,
        actor: &str,
        target: u64,
        validate_only: bool,
    ) -> Result<Commit, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.recover_locked()?;
        let old = self.current();
        if target == 0 || self.trees()?.revisions.get(target.to_be_bytes())?.is_none() {
            return Err(ConfigError::RevisionNotFound(target).into());
        }
        let mut restored = self.config_at(target)?;
        let mut keyless = Vec::new();
        for (name, model) in restored.models.iter_mut() {
            match old.models.get(name) {
                Some(current) => model.api_key = current.api_key.clone(),
                None => {
                    if !model.api_key.is_empty() {
                        keyless.push(name.clone());
                    }
                    model.api_key.clear();
                }
            }
        }
        let new = Config {
            revision: old.revision,
            ..restored
        };
        let mut summary = format!("rollback to revision {target}");
        if !keyless.is_empty() {
            summary.push_str(&format!(
                "; {} restored without an API key (set it with UpdateModel)",
                keyless.join(", ")
            ));
        }
        let change = Pending {
            old,
            new,
            summary,
            always: true,
        };
        self.commit_locked(actor, change, validate_only, Stage::Guarded)
    }

    fn commit_locked(
        &self,
        actor: &str,
        pending: Pending,
        validate_only: bool,
        stage: Stage<'_>,
    ) -> Result<Commit, StoreError> {
        let Pending {
            old,
            mut new,
            summary,
            always,
        } = pending;
        let model_changes = diff(&old.models, &new.models, config::same_model);
        let profile_changes = diff(&old.profiles, &new.profiles, config::same_profile);
        if model_changes.is_empty() && profile_changes.is_empty() && !always {
            return Ok(Commit {
                config: old.clone(),
                revision: None,
                previous: old,
            });
        }
        let revision = old.revision + 1;
        let now = prost_types::Timestamp::from(SystemTime::now());
        new.revision = revision;
        for (name, action) in &model_changes {
            if let Some(model) = new.models.get_mut(name) {
                model.revision = revision;
                model.update_time = Some(now);
                if *action == ChangeAction::Created {
                    model.create_time = model.create_time.or(Some(now));
                }
            }
        }
        for (name, action) in &profile_changes {
            if let Some(profile) = new.profiles.get_mut(name) {
                profile.revision = revision;
                profile.update_time = Some(now);
                if *action == ChangeAction::Created {
                    profile.create_time = profile.create_time.or(Some(now));
                }
            }
        }
        let changes = model_changes
            .iter()
            .map(|(name, action)| change(ResourceKind::Model, name, *action))
            .chain(
                profile_changes
                    .iter()
                    .map(|(name, action)| change(ResourceKind::Profile, name, *action)),
            )
            .collect();
        let record = pb::Revision {
            revision,
            create_time: Some(now),
            actor: actor.to_string(),
            summary,
            changes,
            models: Vec::new(),
            profiles: Vec::new(),
        };
        let attached = match stage {
            Stage::Guarded => {
                let guard = self.guard.read().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(guard) = guard {
                    guard(&old, &new)?;
                }
                None
            }
            Stage::Unguarded => None,
            Stage::Staged(stage) => stage(&old, &new, revision)?,
        };
        if validate_only {
            return Ok(Commit {
                config: Arc::new(new),
                revision: Some(record),
                previous: old,
            });
        }
        let revision_key = revision.to_be_bytes();
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
                meta.insert(REVISION_KEY, &revision_key)?;
                if let Some(attached) = &attached {
                    rollouts.insert(attached.key.as_bytes(), attached.value.as_slice())?;
                }
                for (name, _) in &model_changes {
                    let model = new.models.get(name);
                    match model {
                        Some(model) => models
                            .insert(name.as_bytes(), self.seal_model(model).encode_to_vec())?,
                        None => models.remove(name.as_bytes())?,
                    };
                    let entry = HistoryEntry {
                        model: model.map(|m| self.seal_model(m)),
                        profile: None,
                    };
                    history.insert(
                        history_key(MODEL_KIND, name, revision),
                        entry.encode_to_vec(),
                    )?;
                }
                for (name, _) in &profile_changes {
                    let profile = new.profiles.get(name);
                    match profile {
                        Some(profile) => {
                            profiles.insert(name.as_bytes(), profile.encode_to_vec())?
                        }
                        None => profiles.remove(name.as_bytes())?,
                    };
                    let entry = HistoryEntry {
                        model: None,
                        profile: profile.cloned(),
                    };
                    history.insert(
                        history_key(PROFILE_KIND, name, revision),
                        entry.encode_to_vec(),
                    )?;
                }
                revisions.insert(&revision_key, record.encode_to_vec())?;
                Ok(())
            })
            .map_err(unabortable)
            // Durable before anyone hears of it: a revision number that was
            // published must never be reused after a crash.
            .and_then(|()| t.db.flush().map(drop))
            .map_err(StoreError::from);
        self.noting_failure(written)?;
        // Outside sled: a start on a database behind this is refused. The
        // revision is durable already, so a failure here only weakens that
        // guard; it is logged, and the commit stands.
        if let Err(error) = self.record_high_water(record.revision) {
            tracing::error!(error = %crate::error::error_chain(&error), "cannot record the acknowledged revision");
        }
        let config = Arc::new(new);
        self.current.send_replace(config.clone());
        let _ = self.revision_events.send(record.clone());
        Ok(Commit {
            config,
            revision: Some(record),
            previous: old,
        })
    }

    /// Revision records, newest first, strictly below `before` (all when `None`).
    pub fn list_revisions(
        &self,
        before: Option<u64>,
        limit: usize,
    ) -> Result<Vec<pb::Revision>, StoreError> {
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

    /// One revision record and the configuration as it stood at it.
    pub fn get_revision(&self, revision: u64) -> Result<(pb::Revision, Config), StoreError> {
        Ok((self.revision_record(revision)?, self.config_at(revision)?))
    }

    /// The configuration as it stood at `revision` (0: the initial one,
    /// with only `default`).
    pub fn config_at_revision(&self, revision: u64) -> Result<Config, StoreError> {
        if revision > 0
            && self
                .trees()?
                .revisions
                .get(revision.to_be_bytes())?
                .is_none()
        {
            return Err(ConfigError::RevisionNotFound(revision).into());
        }
        self.config_at(revision)
    }

    /// One revision record: time, actor, summary and changes.
    pub fn revision_record(&self, revision: u64) -> Result<pb::Revision, StoreError> {
        let raw = self
            .trees()?
            .revisions
            .get(revision.to_be_bytes())?
            .ok_or(ConfigError::RevisionNotFound(revision))?;
        decode(&raw, || format!("revision {revision}"))
    }

    /// Rebuilds the configuration at `revision` from the history log.
    fn config_at(&self, revision: u64) -> Result<Config, StoreError> {
        let mut config = Config {
            revision,
            ..Config::default()
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
                MODEL_KIND => {
                    let model = entry.model.map(|m| self.open_model(m)).transpose()?;
                    set_or_remove(&mut config.models, name, model)
                }
                _ => set_or_remove(&mut config.profiles, name, entry.profile),
            }
        }
        Ok(config)
    }

    /// Records what an agent reported. Instance state is rebuilt by agents
    /// on reconnect, so it rides sled's periodic flush instead of a flush
    /// per report.
    /// Saves instance records in one atomic batch. Not flushed: the
    /// fleet's live state reaches disk with sled's periodic flush (and at
    /// shutdown); agents resend it on reconnect.
    pub fn save_instances(&self, instances: &[pb::Instance]) -> Result<(), StoreError> {
        self.save_encoded_instances(
            instances
                .iter()
                .map(|i| (i.instance_id.clone(), i.encode_to_vec())),
        )
    }

    /// Like `save_instances`, with each record already encoded, by id.
    pub fn save_encoded_instances(
        &self,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (id, record) in records {
            batch.insert(id.as_bytes(), record);
        }
        self.write(|t| Ok(t.instances.apply_batch(batch)?))
    }

    /// Forgets an instance, durably (an operator asked for it).
    pub fn delete_instance(&self, instance_id: &str) -> Result<(), StoreError> {
        self.write(|t| {
            t.instances.remove(instance_id.as_bytes())?;
            t.db.flush()?;
            Ok(())
        })
    }

    pub fn load_instances(&self) -> Result<Vec<pb::Instance>, StoreError> {
        Ok(load_tree(&self.trees()?.instances, "instance")?
            .into_values()
            .collect())
    }

    /// Stores a new token, durably; false when the name is taken.
    pub fn insert_token(&self, name: &str, token: &StoredToken) -> Result<bool, StoreError> {
        self.write(|t| {
            let inserted = t
                .tokens
                .compare_and_swap(
                    name.as_bytes(),
                    None as Option<&[u8]>,
                    Some(token.encode_to_vec()),
                )?
                .is_ok();
            t.db.flush()?;
            Ok(inserted)
        })
    }

    /// Replaces a token's record, durably (a join token's uses).
    pub fn put_token(&self, name: &str, token: &StoredToken) -> Result<(), StoreError> {
        self.write(|t| {
            t.tokens.insert(name.as_bytes(), token.encode_to_vec())?;
            t.db.flush()?;
            Ok(())
        })
    }

    /// Removes a token, durably; false when there was none.
    pub fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        self.write(|t| {
            let removed = t.tokens.remove(name.as_bytes())?.is_some();
            t.db.flush()?;
            Ok(removed)
        })
    }

    pub fn load_tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        Ok(load_tree(&self.trees()?.tokens, "token")?
            .into_values()
            .collect())
    }

    /// Remembers an issued agent certificate, durably.
    pub fn put_cert(
        &self,
        fingerprint: &str,
        cert: &crate::ca::IssuedCert,
    ) -> Result<(), StoreError> {
        self.write(|t| {
            t.certs
                .insert(fingerprint.as_bytes(), cert.encode_to_vec())?;
            t.db.flush()?;
            Ok(())
        })
    }

    /// Forgets an agent certificate, durably.
    pub fn delete_cert(&self, fingerprint: &str) -> Result<(), StoreError> {
        self.write(|t| {
            t.certs.remove(fingerprint.as_bytes())?;
            t.db.flush()?;
            Ok(())
        })
    }

    /// Replaces a rollout's record, durably.
    pub fn put_rollout(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.write(|t| {
            t.rollouts.insert(key.as_bytes(), value)?;
            t.db.flush()?;
            Ok(())
        })
    }

    /// Every rollout record, by key.
    pub fn load_rollouts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.trees()?
            .rollouts
            .iter()
            .map(|item| {
                let (key, value) = item?;
                Ok((String::from_utf8_lossy(&key).into_owned(), value.to_vec()))
            })
            .collect()
    }

    pub fn load_certs(&self) -> Result<Vec<(String, crate::ca::IssuedCert)>, StoreError> {
        Ok(load_tree(&self.trees()?.certs, "certificate")?
            .into_iter()
            .collect())
    }

    /// Copies the whole database into a new sled database at `dest`, with
    /// configuration writes held off so the copy is one consistent revision.
    /// Returns that revision.
    pub fn backup(&self, dest: &Path) -> Result<u64, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let revision = self.current().revision;
        let source = self.trees()?;
        let target = sled::Config::new().path(dest).open()?;
        target.import(source.db.export());
        target.flush()?;
        Ok(revision)
    }

    /// Flushes everything to disk (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.trees()?.db.flush()?;
        Ok(())
    }
}

fn change(kind: ResourceKind, name: &str, action: ChangeAction) -> pb::Change {
    pb::Change {
        kind: kind as i32,
        name: name.to_string(),
        action: action as i32,
    }
}

fn diff<T>(
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
    same: fn(&T, &T) -> bool,
) -> Vec<(String, ChangeAction)> {
    let mut changes = Vec::new();
    for (name, value) in new {
        match old.get(name) {
            None => changes.push((name.clone(), ChangeAction::Created)),
            Some(before) if !same(before, value) => {
                changes.push((name.clone(), ChangeAction::Updated))
            }
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|name| !new.contains_key(*name)) {
        changes.push((name.clone(), ChangeAction::Deleted));
    }
    changes
}

fn set_or_remove<T>(map: &mut BTreeMap<String, T>, name: String, value: Option<T>) {
    match value {
        Some(value) => map.insert(name, value),
        None => map.remove(&name),
    };
}

fn history_key(kind: u8, name: &str, revision: u64) -> Vec<u8> {
    // Names never hold control characters, so 0x00 separates unambiguously.
    let mut key = Vec::with_capacity(name.len() + 10);
    key.push(kind);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(&revision.to_be_bytes());
    key
}

fn split_history_key(key: &[u8]) -> Option<(u8, String, u64)> {
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

fn decode<T: Message + Default>(
    raw: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    T::decode(raw).map_err(|source| StoreError::Corrupt {
        what: what(),
        source,
    })
}

fn unabortable(error: sled::transaction::TransactionError<()>) -> sled::Error {
    match error {
        sled::transaction::TransactionError::Storage(e) => e,
        sled::transaction::TransactionError::Abort(()) => {
            unreachable!("no transaction here aborts")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;

    fn mk_model(name: &str) -> Model {
        Model {
            name: name.into(),
            family: "mixtral".into(),
            endpoint: "https://vllm:8000/v1".into(),
            api_key: format!("key-of-{name}"),
            ..Default::default()
        }
    }

    /// Opens the store. sled's flusher thread lets go of the file lock a
    /// moment after the previous handle is dropped, so a reopen in the same
    /// process retries briefly on a lock error.
    fn open(dir: &Path) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir, catalog::get(), Sealer::new(&[9; 32], None)) {
                Err(StoreError::Storage(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn create(store: &Store, name: &str) -> Commit {
        store
            .mutate("test", |c, cat| c.create_model(cat, mk_model(name)))
            .unwrap()
    }

    #[test]
    fn revisions_survive_reopen_and_continue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).unwrap();
            assert_eq!(store.current().revision, 0);
            assert!(store.current().profiles.contains_key("default"));
            for name in ["a", "b", "c"] {
                create(&store, name);
            }
        }
        let store = open(dir.path()).unwrap();
        assert_eq!(store.current().revision, 3);
        assert_eq!(store.current().models["b"].api_key, "key-of-b");
        let commit = create(&store, "d");
        assert_eq!(commit.revision.unwrap().revision, 4);
        assert_eq!(commit.config.models["d"].revision, 4);
    }

    #[test]
    fn refused_and_no_op_changes_make_no_revision() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        create(&store, "a");
        let refused = store.mutate("test", |c, cat| c.create_model(cat, mk_model("a")));
        assert!(matches!(
            refused,
            Err(StoreError::Config(ConfigError::AlreadyExists { .. }))
        ));
        let same = Model {
            name: "a".into(),
            endpoint: "https://vllm:8000/v1".into(),
            ..Default::default()
        };
        let commit = store
            .mutate("test", |c, cat| c.update_model(cat, same, &[]))
            .unwrap();
        assert!(commit.revision.is_none());
        assert_eq!(store.current().revision, 1);
        assert_eq!(store.list_revisions(None, 10).unwrap().len(), 1);
    }

    #[test]
    fn rollback_restores_configuration_but_never_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        create(&store, "a"); // 1
        create(&store, "b"); // 2
        store.mutate("test", |c, _| c.delete_model("a")).unwrap(); // 3
        let rotated = Model {
            name: "b".into(),
            api_key: "rotated".into(),
            ..Default::default()
        };
        store
            .mutate("test", |c, cat| c.update_model(cat, rotated, &[]))
            .unwrap(); // 4
        let commit = store.rollback("ops", 2, false).unwrap();
        let record = commit.revision.unwrap();
        assert_eq!(record.revision, 5);
        assert_eq!(record.actor, "ops");
        assert_eq!(
            record.summary,
            "rollback to revision 2; a restored without an API key (set it with UpdateModel)"
        );
        let config = store.current();
        assert_eq!(config.models.keys().collect::<Vec<_>>(), ["a", "b"]);
        // Brought back from deletion: no key. Rotated: the new key stays.
        assert_eq!(config.models["a"].api_key, "");
        assert_eq!(config.models["b"].api_key, "rotated");
        let (_, at_three) = store.get_revision(3).unwrap();
        assert_eq!(at_three.models.keys().collect::<Vec<_>>(), ["b"]);
        assert!(matches!(
            store.rollback("ops", 99, false),
            Err(StoreError::Config(ConfigError::RevisionNotFound(99)))
        ));
    }

    #[test]
    fn a_newer_schema_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("meta")
                .unwrap()
                .insert(SCHEMA_KEY, &99u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = open(dir.path()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "the database has schema version 99, newer than this duofleetd supports (2); run a newer duofleetd"
        );
    }

    #[test]
    fn history_keys_round_trip() {
        let key = history_key(MODEL_KIND, "a/b c", 42);
        assert_eq!(
            split_history_key(&key),
            Some((MODEL_KIND, "a/b c".into(), 42))
        );
    }
}
