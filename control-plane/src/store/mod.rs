//! The configuration store: revisions, history, rollback, and the records
//! kept beside them (instances, tokens, certificates, rollouts).
//!
//! Every rule lives here: what a change is, its revision number and record,
//! guards, rollback, sealing API keys. Where the bytes go is a
//! [`Backend`](backend::Backend): embedded sled by default
//! (`sled_backend`), or an etcd cluster shared by several replicas (`etcd`).
//!
//! Every mutation is one atomic backend write, durable before the caller
//! hears OK, and only then published to readers through a
//! `tokio::sync::watch` of the current [`Config`] and a broadcast of
//! revision records. Writers in one process are serialised by one mutex:
//! configuration changes are rare and small, and serialising them keeps
//! "exactly one of 50 concurrent creates wins" trivially true. Across
//! replicas the backend's compare-and-swap on the revision does the same:
//! two replicas can never both commit revision N.
//!
//! After each commit the revision is also written to `DATA_DIR/revision.hwm`
//! (`high_water`), outside the database: a database found behind it at
//! start is refused, never served. `check` walks every record and revision.

use crate::catalog::Catalog;
use crate::config::{self, Config};
use crate::error::ConfigError;
use crate::secrets::{SealError, Sealer};
use duofleet_proto::v1::{self as pb, ChangeAction, Model, Profile, ResourceKind};
use prost::Message;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{broadcast, watch};

pub mod backend;
mod check;
pub mod etcd;
mod high_water;
pub mod sled_backend;

use backend::{Backend, Changeset, Stored};
pub use backend::{Table, TableChange};
pub use check::{CheckReport, Damage};
pub use sled_backend::SledBackend;

/// How many times a change that lost a race with another replica is run
/// again before the conflict is answered.
pub const CONFLICT_RETRIES: u32 = 5;

const NO_BACKUP_ON_ETCD: &str = "Backup copies duofleetd's embedded sled database; with --store etcd the configuration lives in etcd: back up the etcd cluster (etcdctl snapshot save) and the data dir's key files instead";

/// The on-disk layout version this binary writes. A newer database is
/// refused; an older one is migrated at open. Version 2 seals API keys.
pub const SCHEMA_VERSION: u32 = 2;

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
    #[error("stored {what} is corrupt: {detail}")]
    Damaged {
        what: &'static str,
        detail: &'static str,
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
    /// Another writer (a duofleetd replica) committed first.
    #[error(
        "revision {revision} was committed by another duofleetd replica first (the configuration is now at revision {current}); nothing was written: retry"
    )]
    Conflict { revision: u64, current: u64 },
    /// A rollout's record kept changing under a transition.
    #[error(
        "rollout {id} was changed by other writers (another replica's gate, or an operator) each of the {attempts} times this change was tried; nothing was written: retry"
    )]
    RolloutContended { id: String, attempts: usize },
    /// The etcd cluster did not answer, or refused.
    #[error("etcd {action} failed")]
    Etcd {
        action: &'static str,
        #[source]
        source: etcd::EtcdError,
    },
    #[error("cannot start the etcd client's threads")]
    Runtime(#[source] std::io::Error),
    /// What this backend cannot do; the message says what to do instead.
    #[error("{0}")]
    Unsupported(&'static str),
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

/// Learns of a revision another replica committed, before it is published.
pub type PublishHook = Box<dyn Fn(&pb::Revision) + Send + Sync>;

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
    backend: Arc<dyn Backend>,
    /// `DATA_DIR/revision.hwm`: the newest acknowledged revision.
    high_water: Option<PathBuf>,
    catalog: &'static Catalog,
    sealer: Sealer,
    guard: RwLock<Option<Guard>>,
    /// Runs on each revision another replica committed, before it is
    /// published here.
    before_publish: RwLock<Option<PublishHook>>,
    writer: Mutex<()>,
    current: watch::Sender<Arc<Config>>,
    revision_events: broadcast::Sender<pb::Revision>,
    /// How long each revision took to become durable here: the backend's
    /// commit and the high-water mark, before it is published.
    pub commits: crate::metrics::Histogram,
}

/// A commit that takes this long is logged: the disk (or etcd) is slow,
/// and every operator's change and every agent's update waits on it.
const SLOW_COMMIT: Duration = Duration::from_millis(500);

impl Store {
    /// Opens (or creates) a sled database in `dir` and loads the
    /// configuration.
    pub fn open(dir: &Path, catalog: &'static Catalog, sealer: Sealer) -> Result<Self, StoreError> {
        Store::open_guarded(dir, None, catalog, sealer)
    }

    /// Opens a sled database and checks it against `high_water` (see
    /// [`Store::open_backend`]).
    pub fn open_guarded(
        dir: &Path,
        high_water: Option<&Path>,
        catalog: &'static Catalog,
        sealer: Sealer,
    ) -> Result<Self, StoreError> {
        let backend = Arc::new(SledBackend::open(dir)?);
        Store::open_backend(backend, high_water, catalog, sealer)
    }

    /// Opens the store on `backend` and checks it against `high_water`, a
    /// file outside the database that holds the newest acknowledged
    /// revision: a database behind it (lost or replaced files, an etcd
    /// restored from an old snapshot) is refused before anything is
    /// written to it. A new database gets its schema and the default
    /// profile; an older one is migrated; a key rotation re-seals.
    pub fn open_backend(
        backend: Arc<dyn Backend>,
        high_water: Option<&Path>,
        catalog: &'static Catalog,
        sealer: Sealer,
    ) -> Result<Self, StoreError> {
        let store = Store::unprepared(backend, high_water, catalog, sealer);
        if let Some(path) = high_water {
            let acknowledged = high_water::read(path)?;
            let found = store.backend.revision()?;
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

    fn unprepared(
        backend: Arc<dyn Backend>,
        high_water: Option<&Path>,
        catalog: &'static Catalog,
        sealer: Sealer,
    ) -> Store {
        Store {
            backend,
            high_water: high_water.map(Path::to_path_buf),
            guard: RwLock::new(None),
            before_publish: RwLock::new(None),
            catalog,
            sealer,
            writer: Mutex::new(()),
            current: watch::Sender::new(Arc::new(Config::default())),
            revision_events: broadcast::Sender::new(256),
            commits: crate::metrics::Histogram::default(),
        }
    }

    /// Follows revisions other writers commit (other replicas on a shared
    /// backend), publishing each as if it were committed here. Nothing to
    /// do on sled. Stops when the store is dropped.
    pub fn follow(self: &Arc<Self>) {
        let Some(wakes) = self.backend.follow() else {
            return;
        };
        follow_on_thread("store-follow", wakes, self, |store, ()| {
            let _writer = store.writer.lock().unwrap_or_else(|e| e.into_inner());
            if let Err(error) = store.catch_up_locked() {
                tracing::warn!(error = %crate::error::error_chain(&error), "cannot read revisions committed by another replica; retrying on the next change");
            }
        });
    }

    /// This replica's name when several share the backend (etcd).
    pub fn replica(&self) -> Option<&str> {
        self.backend.replica()
    }

    /// Records that instances connected to this replica, or left it (on
    /// a shared backend; nothing on sled).
    pub fn present(&self, arrived: Vec<String>, left: Vec<String>) -> Result<(), StoreError> {
        self.backend.present(arrived, left)
    }

    /// Records an operator's labels where every replica sees them (on a
    /// shared backend; on sled the instance record is enough).
    pub fn put_labels(&self, instance_id: &str, value: &[u8]) -> Result<(), StoreError> {
        self.backend.put_labels(instance_id, value)
    }

    /// Every replica's changes to the fleet; `None` on sled.
    pub fn follow_fleet(&self) -> Option<std::sync::mpsc::Receiver<backend::FleetChange>> {
        self.backend.follow_fleet()
    }

    /// Runs `apply` on `target` for every change any replica makes to
    /// `table`, starting with a snapshot, on a thread of its own, for as
    /// long as `target` lives (shared backends; nothing on sled, where this
    /// process makes every change itself).
    pub fn follow_table<S: Send + Sync + 'static>(
        &self,
        table: Table,
        target: &Arc<S>,
        apply: impl Fn(&S, TableChange) + Send + 'static,
    ) {
        if let Some(changes) = self.backend.follow_table(table) {
            follow_on_thread(&format!("follow-{}", table.name()), changes, target, apply);
        }
    }

    /// At shutdown: this replica's instances are no longer connected.
    pub fn leave(&self) {
        self.backend.leave()
    }

    /// What the store runs on, for logs.
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// A small durable write, for readiness: fails while storage cannot
    /// write. After a failed sled write this is what reopens the database,
    /// so a probing readiness check brings storage back once there is
    /// space again.
    pub fn probe_write(&self) -> Result<(), StoreError> {
        self.backend.probe_write()
    }

    fn record_high_water(&self, revision: u64) -> Result<(), StoreError> {
        match &self.high_water {
            Some(path) => high_water::write(path, revision),
            None => Ok(()),
        }
    }

    fn prepare(&self) -> Result<(), StoreError> {
        match self.backend.schema_version()? {
            None => {
                let now = prost_types::Timestamp::from(SystemTime::now());
                let default = Profile {
                    create_time: Some(now),
                    update_time: Some(now),
                    ..config::default_profile()
                };
                self.backend.initialize(SCHEMA_VERSION, &default)?;
            }
            Some(found) if found > SCHEMA_VERSION => {
                return Err(StoreError::SchemaTooNew { found });
            }
            Some(found) if found < SCHEMA_VERSION || self.sealer.has_previous() => {
                let (models, history) = self.backend.reseal(SCHEMA_VERSION, &|model| {
                    Ok(self.seal_model(&self.open_model(model)?))
                })?;
                tracing::info!(
                    models,
                    history,
                    "API keys sealed under the current secret key"
                );
            }
            Some(_) => {}
        }
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

    /// A stored configuration with its API keys opened.
    fn opened(&self, stored: Stored) -> Result<Config, StoreError> {
        let models = stored
            .models
            .into_iter()
            .map(|(name, model)| Ok((name, self.open_model(model)?)))
            .collect::<Result<_, StoreError>>()?;
        Ok(Config {
            revision: stored.revision,
            models,
            profiles: stored.profiles,
        })
    }

    fn load(&self) -> Result<Config, StoreError> {
        self.opened(self.backend.load()?)
    }

    /// Publishes what other writers committed since the current revision.
    /// The caller holds the writer lock.
    fn catch_up_locked(&self) -> Result<(), StoreError> {
        let known = self.current().revision;
        if self.backend.revision()? <= known {
            return Ok(());
        }
        let config = self.load()?;
        if config.revision <= known {
            return Ok(());
        }
        let mut records = Vec::new();
        for revision in known + 1..=config.revision {
            records.extend(self.backend.record(revision)?);
        }
        if let Some(hook) = &*self
            .before_publish
            .read()
            .unwrap_or_else(|e| e.into_inner())
        {
            for record in &records {
                hook(record);
            }
        }
        if let Err(error) = self.record_high_water(config.revision) {
            tracing::error!(error = %crate::error::error_chain(&error), "cannot record the acknowledged revision");
        }
        tracing::info!(
            from = known,
            to = config.revision,
            "revisions committed by another replica"
        );
        self.current.send_replace(Arc::new(config));
        for record in records {
            let _ = self.revision_events.send(record);
        }
        Ok(())
    }

    /// The configuration as of the newest committed revision.
    pub fn current(&self) -> Arc<Config> {
        self.current.borrow().clone()
    }

    /// The configuration as of the newest revision any replica committed,
    /// for an operator's read: what a write acknowledged through another
    /// replica is seen by the next read here, even before this replica's
    /// watch brought it (one read of the backend's revision; only when this
    /// replica is behind does it take the writer lock and load the
    /// configuration, so a read does not wait behind a commit in progress).
    /// The same as [`Store::current`] on sled.
    pub fn fresh(&self) -> Result<Arc<Config>, StoreError> {
        if self.backend.is_shared() && self.backend.revision()? > self.current().revision {
            drop(self.writing()?);
        }
        Ok(self.current())
    }

    /// Follows the current configuration; it changes only after a durable commit.
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
        op: impl Fn(&mut Config, &'static Catalog) -> Result<String, ConfigError>,
    ) -> Result<Commit, StoreError> {
        self.change(actor, Write::default(), op)
    }

    /// Sets what learns of other replicas' revisions before they are
    /// published (see [`PublishHook`]).
    pub fn before_publish(&self, hook: PublishHook) {
        *self
            .before_publish
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Whether this replica does the work that must happen once.
    pub fn leads(&self) -> bool {
        self.backend.leads()
    }

    /// One rollout record, by id.
    pub fn load_rollout(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.backend.get(Table::Rollouts, key)
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
        op: impl Fn(&mut Config, &'static Catalog) -> Result<String, ConfigError>,
    ) -> Result<Commit, StoreError> {
        self.change_with(actor, how, Stage::Guarded, op)
    }

    /// The writer lock, with the current configuration brought up to date
    /// on a shared backend (another replica may have committed since).
    fn writing(&self) -> Result<std::sync::MutexGuard<'_, ()>, StoreError> {
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if self.backend.is_shared() {
            self.catch_up_locked()?;
        }
        Ok(writer)
    }

    /// [`Store::change`] with another [`Stage`] than the guard.
    ///
    /// With replicas, another one may commit first (a conflict): the
    /// change is then run again on what it committed, up to
    /// [`CONFLICT_RETRIES`] times, so that unrelated writes through two
    /// replicas both succeed. A staged change (a rollout) is not run again:
    /// its conflict is answered, and nothing was written.
    pub fn change_with(
        &self,
        actor: &str,
        how: Write,
        stage: Stage<'_>,
        op: impl Fn(&mut Config, &'static Catalog) -> Result<String, ConfigError>,
    ) -> Result<Commit, StoreError> {
        match stage {
            staged @ Stage::Staged(_) => self.change_once(actor, how, staged, &op),
            Stage::Guarded => {
                self.retrying_conflicts(|| self.change_once(actor, how, Stage::Guarded, &op))
            }
            Stage::Unguarded => {
                self.retrying_conflicts(|| self.change_once(actor, how, Stage::Unguarded, &op))
            }
        }
    }

    /// One attempt of [`Store::change_with`].
    fn change_once(
        &self,
        actor: &str,
        how: Write,
        stage: Stage<'_>,
        op: &impl Fn(&mut Config, &'static Catalog) -> Result<String, ConfigError>,
    ) -> Result<Commit, StoreError> {
        let _writer = self.writing()?;
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

    /// Runs `attempt` again while another replica commits first, up to
    /// [`CONFLICT_RETRIES`] more times; then answers the conflict.
    fn retrying_conflicts(
        &self,
        mut attempt: impl FnMut() -> Result<Commit, StoreError>,
    ) -> Result<Commit, StoreError> {
        let mut retries = 0;
        loop {
            match attempt() {
                Err(StoreError::Conflict { revision, .. }) if retries < CONFLICT_RETRIES => {
                    retries += 1;
                    tracing::info!(
                        revision,
                        retries,
                        "another replica committed first; running the change again on its revision"
                    );
                }
                other => return other,
            }
        }
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
        self.retrying_conflicts(|| self.rollback_once(actor, target, validate_only))
    }

    fn rollback_once(
        &self,
        actor: &str,
        target: u64,
        validate_only: bool,
    ) -> Result<Commit, StoreError> {
        let _writer = self.writing()?;
        let old = self.current();
        if target == 0 || self.backend.record(target)?.is_none() {
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
        let changeset = Changeset {
            record: &record,
            models: model_changes
                .iter()
                .map(|(name, _)| {
                    (
                        name.clone(),
                        new.models.get(name).map(|m| self.seal_model(m)),
                    )
                })
                .collect(),
            profiles: profile_changes
                .iter()
                .map(|(name, _)| (name.clone(), new.profiles.get(name).cloned()))
                .collect(),
            attached: attached.as_ref(),
        };
        let started = Instant::now();
        match self.backend.commit(changeset) {
            Ok(()) => {}
            Err(conflict @ StoreError::Conflict { .. }) => {
                // Another replica got there first: take in what it
                // committed, so that a retry starts from it.
                if let Err(error) = self.catch_up_locked() {
                    tracing::warn!(error = %crate::error::error_chain(&error), "cannot read the revision another replica committed");
                }
                return Err(conflict);
            }
            Err(error) => return Err(error),
        }
        // Outside the database: a start on a database behind this is
        // refused. The revision is durable already, so a failure here only
        // weakens that guard; it is logged, and the commit stands.
        if let Err(error) = self.record_high_water(record.revision) {
            tracing::error!(error = %crate::error::error_chain(&error), "cannot record the acknowledged revision");
        }
        let took = started.elapsed();
        self.commits.observe(took);
        if took >= SLOW_COMMIT {
            tracing::warn!(
                revision = record.revision,
                ms = took.as_millis() as u64,
                store = %self.backend.describe(),
                "a revision took long to become durable: the store's disk (or etcd) is slow, and changes and agents wait on it"
            );
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
        self.backend.records(before, limit)
    }

    /// One revision record and the configuration as it stood at it.
    pub fn get_revision(&self, revision: u64) -> Result<(pb::Revision, Config), StoreError> {
        Ok((self.revision_record(revision)?, self.config_at(revision)?))
    }

    /// The configuration as it stood at `revision` (0: the initial one,
    /// with only `default`).
    pub fn config_at_revision(&self, revision: u64) -> Result<Config, StoreError> {
        if revision > 0 && self.backend.record(revision)?.is_none() {
            return Err(ConfigError::RevisionNotFound(revision).into());
        }
        self.config_at(revision)
    }

    /// One revision record: time, actor, summary and changes.
    pub fn revision_record(&self, revision: u64) -> Result<pb::Revision, StoreError> {
        Ok(self
            .backend
            .record(revision)?
            .ok_or(ConfigError::RevisionNotFound(revision))?)
    }

    /// Rebuilds the configuration at `revision` from the history.
    fn config_at(&self, revision: u64) -> Result<Config, StoreError> {
        self.opened(self.backend.config_at(revision)?)
    }

    /// Saves instance records, each whole, in batches. Not flushed: the
    /// fleet's live state reaches disk with the backend's periodic flush
    /// (and at shutdown); agents resend it on reconnect.
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
        self.backend
            .put_batch(Table::Instances, records.into_iter().collect())
    }

    /// Forgets an instance, durably (an operator asked for it).
    pub fn delete_instance(&self, instance_id: &str) -> Result<(), StoreError> {
        self.backend.delete(Table::Instances, instance_id).map(drop)
    }

    pub fn load_instances(&self) -> Result<Vec<pb::Instance>, StoreError> {
        self.load_table(Table::Instances, "instance")
    }

    /// Stores a new token, durably; false when the name is taken.
    pub fn insert_token(&self, name: &str, token: &StoredToken) -> Result<bool, StoreError> {
        self.backend
            .insert_new(Table::Tokens, name, &token.encode_to_vec())
    }

    /// Replaces a token's record, durably (a join token's uses).
    pub fn put_token(&self, name: &str, token: &StoredToken) -> Result<(), StoreError> {
        self.backend
            .put(Table::Tokens, name, &token.encode_to_vec())
    }

    /// Removes a token, durably; false when there was none.
    pub fn delete_token(&self, name: &str) -> Result<bool, StoreError> {
        self.backend.delete(Table::Tokens, name)
    }

    /// Spends one use of the join token `name`, exactly once however many
    /// replicas enroll at the same moment (compare-and-swap, retried on a
    /// lost race). Returns the token as it stands after (`None`: that was
    /// its last use, and it is gone), or `Ok(Err(()))` when it is used up
    /// or unknown.
    pub fn spend_token(&self, name: &str) -> Result<Result<Option<StoredToken>, ()>, StoreError> {
        loop {
            let Some(raw) = self.backend.get(Table::Tokens, name)? else {
                return Ok(Err(()));
            };
            let mut stored: StoredToken = decode(&raw, || format!("token {name}"))?;
            let Some(token) = stored.token.as_mut() else {
                return Ok(Err(()));
            };
            let after = match token.uses_left {
                // Unlimited.
                0 => return Ok(Ok(Some(stored))),
                1 => None,
                n => {
                    token.uses_left = n - 1;
                    Some(stored)
                }
            };
            let new = after.as_ref().map(|t| t.encode_to_vec());
            if self
                .backend
                .compare_and_swap(Table::Tokens, name, &raw, new.as_deref())?
            {
                return Ok(Ok(after));
            }
        }
    }

    pub fn load_tokens(&self) -> Result<Vec<StoredToken>, StoreError> {
        self.load_table(Table::Tokens, "token")
    }

    /// Remembers an issued agent certificate, durably.
    pub fn put_cert(
        &self,
        fingerprint: &str,
        cert: &crate::ca::IssuedCert,
    ) -> Result<(), StoreError> {
        self.backend
            .put(Table::Certs, fingerprint, &cert.encode_to_vec())
    }

    /// Forgets an agent certificate, durably.
    pub fn delete_cert(&self, fingerprint: &str) -> Result<(), StoreError> {
        self.backend.delete(Table::Certs, fingerprint).map(drop)
    }

    pub fn load_certs(&self) -> Result<Vec<(String, crate::ca::IssuedCert)>, StoreError> {
        self.backend
            .scan(Table::Certs)?
            .into_iter()
            .map(|(key, value)| {
                let cert = decode(&value, || format!("certificate {key}"))?;
                Ok((key, cert))
            })
            .collect()
    }

    /// Replaces a rollout's record, durably, if it is still `expected`
    /// (byte for byte): false, and nothing written, when another writer
    /// (a replica's gate, an operator through another replica) changed it
    /// first.
    pub fn swap_rollout(&self, key: &str, expected: &[u8], new: &[u8]) -> Result<bool, StoreError> {
        self.backend
            .compare_and_swap(Table::Rollouts, key, expected, Some(new))
    }

    /// Every rollout record, by key.
    pub fn load_rollouts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.backend.scan(Table::Rollouts)
    }

    fn load_table<T: Message + Default>(
        &self,
        table: Table,
        what: &str,
    ) -> Result<Vec<T>, StoreError> {
        self.backend
            .scan(table)?
            .into_iter()
            .map(|(key, value)| decode(&value, || format!("{what} {key}")))
            .collect()
    }

    /// Copies the whole database into a new sled database at `dest`, with
    /// configuration writes held off so the copy is one consistent revision.
    /// Returns that revision.
    pub fn backup(&self, dest: &Path) -> Result<u64, StoreError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let revision = self.current().revision;
        let Some(sled) = self.backend.as_sled() else {
            return Err(StoreError::Unsupported(NO_BACKUP_ON_ETCD));
        };
        sled.backup(dest)?;
        Ok(revision)
    }

    /// Whether [`Store::backup`] can copy this store (a sled one).
    pub fn check_backup(&self) -> Result<(), StoreError> {
        match self.backend.as_sled() {
            Some(_) => Ok(()),
            None => Err(StoreError::Unsupported(NO_BACKUP_ON_ETCD)),
        }
    }

    /// Makes every write durable (at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.backend.flush()
    }
}

/// Runs `apply` on `target` for each item `changes` delivers, on a thread
/// of its own, until the sender is gone or `target` is dropped.
pub fn follow_on_thread<S: Send + Sync + 'static, T: Send + 'static>(
    name: &str,
    changes: std::sync::mpsc::Receiver<T>,
    target: &Arc<S>,
    apply: impl Fn(&S, T) + Send + 'static,
) {
    let target: Weak<S> = Arc::downgrade(target);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            while let Ok(item) = changes.recv() {
                let Some(target) = target.upgrade() else {
                    break;
                };
                apply(&target, item);
            }
        })
        .expect("a thread to follow the store");
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

pub(crate) fn decode<T: Message + Default>(
    raw: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    T::decode(raw).map_err(|source| StoreError::Corrupt {
        what: what(),
        source,
    })
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
            .mutate("test", |c, cat| c.update_model(cat, same.clone(), &[]))
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
            .mutate("test", |c, cat| c.update_model(cat, rotated.clone(), &[]))
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
                .insert(sled_backend::SCHEMA_KEY, &99u32.to_be_bytes())
                .unwrap();
            db.flush().unwrap();
        }
        let err = open(dir.path()).err().unwrap();
        assert_eq!(
            err.to_string(),
            "the database has schema version 99, newer than this duofleetd supports (2); run a newer duofleetd"
        );
    }
}
