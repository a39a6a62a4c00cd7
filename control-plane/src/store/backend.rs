//! The storage seam: what [`Store`](super::Store) needs from a database,
//! in the domain's terms. Two backends implement it:
//!
//! - `sled` (the default): one embedded database in the data dir, for a
//!   single duofleetd;
//! - `etcd`: an etcd cluster shared by several duofleetd replicas.
//!
//! The store owns every rule (what a change is, its revision number and
//! record, sealing API keys, guards, rollback); a backend only keeps what
//! it is given, atomically and durably, and hands it back. Everything a
//! backend sees of a model is already sealed: no backend ever holds a
//! plaintext API key.
//!
//! The same conformance suite (`tests/tests/conformance`) runs against
//! every backend.

use super::{Attached, StoreError};
use duofleet_proto::v1::{self as pb, Model, Profile};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc;

/// Models by name, their API keys sealed.
pub type SealedModels = BTreeMap<String, Model>;

/// The configuration as a backend keeps it: API keys sealed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stored {
    pub revision: u64,
    pub models: SealedModels,
    pub profiles: BTreeMap<String, Profile>,
}

/// One new revision: its record and every model and profile it changed
/// (`None`: deleted). A backend commits it only while it still holds
/// revision `record.revision - 1`; otherwise it refuses with
/// [`StoreError::Conflict`] and writes nothing.
pub struct Changeset<'a> {
    pub record: &'a pb::Revision,
    pub models: Vec<(String, Option<Model>)>,
    pub profiles: Vec<(String, Option<Profile>)>,
    /// A record committed in the same write (a rollout that starts with
    /// this revision).
    pub attached: Option<&'a Attached>,
}

/// A stored model or profile at one revision; neither set means deleted.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HistoryEntry {
    #[prost(message, optional, tag = "1")]
    pub model: Option<Model>,
    #[prost(message, optional, tag = "2")]
    pub profile: Option<Profile>,
}

/// Configuration and its revisions.
pub trait Revisions: Send + Sync {
    /// The layout version the database records; `None` when it is new.
    fn schema_version(&self) -> Result<Option<u32>, StoreError>;
    /// Makes a new database: revision 0 holds `default` only. Does nothing
    /// when another writer initialized it meanwhile.
    fn initialize(&self, schema: u32, default: &Profile) -> Result<(), StoreError>;
    /// Rewrites every stored API key, current and historical, through
    /// `reseal` (a migration or a key rotation), and records `schema`.
    /// Returns how many models and history entries were rewritten.
    fn reseal(
        &self,
        schema: u32,
        reseal: &dyn Fn(Model) -> Result<Model, StoreError>,
    ) -> Result<(usize, usize), StoreError>;
    /// The newest committed revision (0 when there is none).
    fn revision(&self) -> Result<u64, StoreError>;
    /// The configuration at the newest committed revision.
    fn load(&self) -> Result<Stored, StoreError>;
    /// Commits one revision atomically, durable before it returns.
    fn commit(&self, change: Changeset<'_>) -> Result<(), StoreError>;
    /// One revision's record; `None` when there is no such revision.
    fn record(&self, revision: u64) -> Result<Option<pb::Revision>, StoreError>;
    /// Revision records, newest first, strictly below `before`.
    fn records(&self, before: Option<u64>, limit: usize) -> Result<Vec<pb::Revision>, StoreError>;
    /// The configuration as it stood at `revision` (0: the initial one).
    fn config_at(&self, revision: u64) -> Result<Stored, StoreError>;
    /// Other processes write to this database too (replicas on etcd):
    /// the store checks for their revisions before each change.
    fn is_shared(&self) -> bool {
        false
    }
    /// Wakes the receiver whenever any writer, this one included, may have
    /// committed a revision; `None` when this process is the only writer.
    fn follow(&self) -> Option<mpsc::Receiver<()>> {
        None
    }
}

/// Records kept by key, outside the revision history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// What agents reported (not versioned).
    Instances,
    /// Operator and join tokens: metadata and a keyed hash.
    Tokens,
    /// Agent certificates in force, by SHA-256 fingerprint.
    Certs,
    /// Rollouts, by id.
    Rollouts,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::Instances,
        Table::Tokens,
        Table::Certs,
        Table::Rollouts,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Instances => "instances",
            Table::Tokens => "tokens",
            Table::Certs => "certs",
            Table::Rollouts => "rollouts",
        }
    }
}

/// A change to a table, as any writer made it.
#[derive(Debug, Clone, PartialEq)]
pub enum TableChange {
    /// Every record, read at one moment: when following starts, and again
    /// whenever following was interrupted.
    Snapshot(Vec<(String, Vec<u8>)>),
    Put(String, Vec<u8>),
    Deleted(String),
}

/// Instances, tokens, certificates and rollouts.
pub trait Records: Send + Sync {
    /// Writes one record, durable before it returns.
    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Writes one record unless the key is taken, durably; false when taken.
    fn insert_new(&self, table: Table, key: &str, value: &[u8]) -> Result<bool, StoreError>;
    /// Replaces one record (`None`: removes it) only while it still holds
    /// `expected`, durably; false when it held something else.
    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: &[u8],
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError>;
    /// Removes one record, durably; false when there was none.
    fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError>;
    /// Writes many records of live state. Need not be durable before it
    /// returns (agents resend their state on reconnect), nor all at once
    /// (a large batch goes in parts, so that it does not hold off a
    /// configuration commit), but each record is written whole.
    fn put_batch(&self, table: Table, records: Vec<(String, Vec<u8>)>) -> Result<(), StoreError>;
    /// One record.
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every record of a table, by key.
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Follows what every writer changes in a table, starting with a
    /// snapshot; `None` when this process is the only writer.
    fn follow_table(&self, _table: Table) -> Option<mpsc::Receiver<TableChange>> {
        None
    }
}

/// A change to the fleet's shared state, as another replica made it (or
/// this one: a replica sees its own writes too).
#[derive(Debug, Clone, PartialEq)]
pub enum FleetChange {
    /// All of it, read at one moment: when following starts, and again
    /// whenever following was interrupted.
    Snapshot {
        records: Vec<(String, Vec<u8>)>,
        /// Instance id -> the replica it is connected to.
        present: HashMap<String, String>,
        labels: Vec<(String, Vec<u8>)>,
    },
    /// An instance's record was saved.
    Saved(String, Vec<u8>),
    /// An instance's record was deleted.
    Deleted(String),
    /// An instance is connected to a replica now (`Some`), or to none.
    Present(String, Option<String>),
    /// An operator set an instance's labels.
    Labels(String, Vec<u8>),
}

/// The fleet's live state, shared between replicas. On a backend with a
/// single writer (sled) there is nothing to share: the defaults do
/// nothing.
pub trait Fleet: Send + Sync {
    /// This replica's name, unique among the replicas; `None` without
    /// replicas.
    fn replica(&self) -> Option<&str> {
        None
    }
    /// Records that instances connected to this replica, or left it. Held
    /// by this replica's lease: should it die, the cluster drops them.
    fn present(&self, _arrived: Vec<String>, _left: Vec<String>) -> Result<(), StoreError> {
        Ok(())
    }
    /// Records an operator's labels for an instance, durably.
    fn put_labels(&self, _instance_id: &str, _value: &[u8]) -> Result<(), StoreError> {
        Ok(())
    }
    /// Follows every replica's changes to the fleet, starting with a
    /// snapshot.
    fn follow_fleet(&self) -> Option<mpsc::Receiver<FleetChange>> {
        None
    }
    /// At shutdown: this replica's instances are no longer connected.
    fn leave(&self) {}
    /// Whether this replica does the work that must happen once (rollout
    /// gates). Always, without replicas.
    fn leads(&self) -> bool {
        true
    }
}

/// A database the store can run on.
pub trait Backend: Revisions + Records + Fleet {
    /// A small durable write: fails while the database cannot write.
    fn probe_write(&self) -> Result<(), StoreError>;
    /// Makes every write so far durable (at shutdown).
    fn flush(&self) -> Result<(), StoreError>;
    /// What and where, for logs: "sled at /var/lib/duofleet/db".
    fn describe(&self) -> String;
    /// The sled backend, for what only it can do (check, backup).
    fn as_sled(&self) -> Option<&super::sled_backend::SledBackend> {
        None
    }
}
