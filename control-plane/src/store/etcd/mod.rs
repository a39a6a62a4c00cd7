//! The etcd backend (`--store etcd`): one etcd cluster shared by every
//! duofleetd replica.
//!
//! Keys, under a prefix (`/duofleet/` by default):
//!
//! ```text
//! schema                  u32 (big endian): the layout version
//! revision                u64 (big endian): the newest committed revision
//! config                  the configuration at that revision (API keys sealed)
//! revisions/<20 digits>   the Revision record (time, actor, summary, changes)
//! history/<20 digits>     what that revision changed (API keys sealed)
//! instances/<id>  tokens/<name>  certs/<fingerprint>  rollouts/<id>
//! probe                   the readiness probe's write
//! ```
//!
//! A commit is one etcd transaction of at most five operations, whatever
//! its size: it succeeds only while `revision` still holds the revision
//! the change started from (compare-and-swap), so two replicas can never
//! both commit revision N. The whole configuration is one value, so its
//! size is bounded by etcd's request limit (`--max-request-bytes`, 1.5 MiB
//! by default): thousands of models.
//!
//! etcd acknowledges a write once a quorum has it on disk, so every write
//! here is durable before it returns. Replicas learn of each other's
//! revisions through a watch on `revision`.
//!
//! The store's calls are synchronous (they run on tokio's blocking pool);
//! each one runs on this backend's own small runtime and waits for it.

use super::backend::{Backend, Changeset, Records, Revisions, Stored, Table, TableChange};

mod fleet;
use super::{StoreError, decode};
use duofleet_proto::v1::{self as pb, Model, Profile};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse,
};
use prost::Message;
use std::future::Future;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

pub use etcd_client::Error as EtcdError;

/// How long one etcd request may take before it fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request that may safely run twice is tried again while the
/// cluster does not answer (a member died, and the client moves on to
/// another).
const RETRY_FOR: Duration = Duration::from_secs(8);

/// A failure that the next attempt, maybe through another member, may not
/// meet.
fn transient(error: &EtcdError) -> bool {
    match error {
        EtcdError::GRpcStatus(status) => matches!(
            status.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
        ),
        EtcdError::TransportError(_) | EtcdError::IoError(_) => true,
        _ => false,
    }
}
/// etcd refuses a transaction of more than 128 operations by default
/// (`--max-txn-ops`); batches of instance records stay below it.
const BATCH_OPS: usize = 100;
/// A batch of writes stays below etcd's request limit (1.5 MiB by
/// default, `--max-request-bytes`).
const BATCH_BYTES: usize = 1024 * 1024;
/// Keys read per range request when walking a prefix: instance records
/// can be tens of KiB, and a response must stay below gRPC's 4 MiB.
const PAGE: i64 = 100;

/// How to reach the cluster.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// `http://host:2379` or `https://host:2379`.
    pub endpoints: Vec<String>,
    /// Every key starts with it; several fleets can share one cluster.
    pub prefix: String,
    /// etcd's own authentication: user and password.
    pub user: Option<(String, String)>,
    /// PEM: the CA that signed the etcd servers' certificates.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM: a client certificate and its key, for etcd's mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// How often the leader compacts etcd's history (`fleet::compact`);
    /// `None`: never (etcd's own `--auto-compaction-retention` does it).
    pub compaction: Option<Duration>,
}

impl EtcdOptions {
    /// What and where, for logs and messages.
    pub fn describe(&self) -> String {
        format!(
            "etcd at {} (prefix {})",
            self.endpoints.join(","),
            self.prefix
        )
    }
}

/// The configuration as one etcd value.
#[derive(Clone, PartialEq, prost::Message)]
struct ConfigValue {
    #[prost(uint64, tag = "1")]
    revision: u64,
    #[prost(message, repeated, tag = "2")]
    models: Vec<Model>,
    #[prost(message, repeated, tag = "3")]
    profiles: Vec<Profile>,
}

/// What one revision changed.
#[derive(Clone, PartialEq, prost::Message)]
struct HistoryValue {
    #[prost(message, repeated, tag = "1")]
    models: Vec<Model>,
    #[prost(string, repeated, tag = "2")]
    deleted_models: Vec<String>,
    #[prost(message, repeated, tag = "3")]
    profiles: Vec<Profile>,
    #[prost(string, repeated, tag = "4")]
    deleted_profiles: Vec<String>,
}

impl ConfigValue {
    fn from_stored(stored: &Stored) -> ConfigValue {
        ConfigValue {
            revision: stored.revision,
            models: stored.models.values().cloned().collect(),
            profiles: stored.profiles.values().cloned().collect(),
        }
    }

    fn into_stored(self) -> Stored {
        Stored {
            revision: self.revision,
            models: self
                .models
                .into_iter()
                .map(|m| (m.name.clone(), m))
                .collect(),
            profiles: self
                .profiles
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
        }
    }
}

impl HistoryValue {
    fn apply(self, stored: &mut Stored) {
        for model in self.models {
            stored.models.insert(model.name.clone(), model);
        }
        for name in self.deleted_models {
            stored.models.remove(&name);
        }
        for profile in self.profiles {
            stored.profiles.insert(profile.name.clone(), profile);
        }
        for name in self.deleted_profiles {
            stored.profiles.remove(&name);
        }
    }
}

pub struct EtcdBackend {
    runtime: Option<tokio::runtime::Runtime>,
    client: Client,
    prefix: String,
    /// [`EtcdOptions::describe`].
    described: String,
    /// This replica's presence in the cluster (see `fleet`).
    presence: Arc<fleet::Presence>,
    /// [`EtcdOptions::compaction`].
    compaction: Option<Duration>,
    /// The configuration as this replica last read or wrote it: a commit
    /// applies its changes to it instead of reading the whole value again.
    cache: Mutex<Option<Stored>>,
}

impl Drop for EtcdBackend {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Runs `future` on the backend's runtime and blocks the calling thread
/// (never one of the runtime's) until it is done.
fn wait_on<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send + 'static,
) -> Result<T, StoreError> {
    let (tx, rx) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    rx.recv().map_err(|_| StoreError::Unavailable)
}

fn revision_bytes(revision: u64) -> Vec<u8> {
    revision.to_be_bytes().to_vec()
}

fn parse_revision(raw: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = raw.try_into().map_err(|_| StoreError::Damaged {
        what: "current revision",
        detail: "it is not 8 bytes",
    })?;
    Ok(u64::from_be_bytes(bytes))
}

impl EtcdBackend {
    /// Connects to the cluster (it need not be reachable yet: requests
    /// fail, and are retried by their callers, until it is).
    pub fn connect(options: EtcdOptions) -> Result<EtcdBackend, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(StoreError::Runtime)?;
        let mut connect = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &options.user {
            connect = connect.with_user(user, password);
        }
        if options.ca_pem.is_some() || options.identity_pem.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &options.ca_pem {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &options.identity_pem {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(tls);
        }
        let endpoints = options.endpoints.clone();
        let connected =
            wait_on(&runtime, Client::connect(endpoints, Some(connect))).and_then(|c| {
                c.map_err(|source| StoreError::Etcd {
                    action: "connect",
                    source,
                })
            });
        let client = match connected {
            Ok(client) => client,
            Err(error) => {
                // Not dropped in place: the caller may be async.
                runtime.shutdown_background();
                return Err(error);
            }
        };
        Ok(EtcdBackend {
            runtime: Some(runtime),
            client,
            described: options.describe(),
            prefix: options.prefix,
            cache: Mutex::new(None),
            presence: Arc::new(fleet::Presence::new()),
            compaction: options.compaction,
        })
    }

    fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.prefix).into_bytes()
    }

    fn numbered(&self, kind: &str, revision: u64) -> Vec<u8> {
        self.key(&format!("{kind}/{revision:020}"))
    }

    /// Runs `work` on the backend's runtime and waits for it.
    fn run<T, F>(
        &self,
        action: &'static str,
        work: impl FnOnce(Client) -> F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, EtcdError>> + Send + 'static,
    {
        let runtime = self.runtime.as_ref().ok_or(StoreError::Unavailable)?;
        wait_on(runtime, work(self.client.clone()))?
            .map_err(|source| StoreError::Etcd { action, source })
    }

    /// [`EtcdBackend::run`], again while it fails in a way a retry may
    /// fix, for up to [`RETRY_FOR`]. Only for requests that may run twice.
    fn retrying<T, F>(
        &self,
        action: &'static str,
        work: impl Fn(Client) -> F,
    ) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, EtcdError>> + Send + 'static,
    {
        let deadline = Instant::now() + RETRY_FOR;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.run(action, &work) {
                Err(StoreError::Etcd { source, .. })
                    if transient(&source) && Instant::now() + delay < deadline =>
                {
                    tracing::debug!(action, error = %source, "etcd request failed; retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }

    fn get(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, StoreError> {
        let response = self.retrying("get", |mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    }

    /// A transaction that may safely run twice.
    fn txn(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.retrying("transaction", |mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
    }

    /// A transaction run once: the caller finds out what a failure did.
    fn txn_once(&self, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.run("transaction", |mut c| async move { c.txn(txn).await })
    }

    /// Every key-value from `start` (inclusive) to `end` (exclusive), in
    /// key order, read a page at a time at one etcd revision.
    fn range(&self, start: Vec<u8>, end: Vec<u8>) -> Result<Vec<KeyValue>, StoreError> {
        let (kvs, _) = self.retrying("range read", |mut c| {
            let (start, end) = (start.clone(), end.clone());
            async move { read_range(&mut c, start, end).await }
        })?;
        Ok(kvs)
    }

    /// Every key-value under `prefix`.
    fn scan_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let start = self.key(prefix);
        let end = prefix_end(&start);
        self.range(start, end)
    }

    fn load_config(&self) -> Result<Stored, StoreError> {
        let raw = self.get(self.key("config"))?.unwrap_or_default();
        let value: ConfigValue = decode(&raw, || "configuration".into())?;
        Ok(value.into_stored())
    }

    /// The key of one record of a table.
    fn record_key(&self, table: Table, key: &str) -> Vec<u8> {
        self.key(&format!("{}{key}", Self::table_prefix(table)))
    }

    fn table_prefix(table: Table) -> String {
        match table {
            // Under fleet/, which replicas follow together.
            Table::Instances => fleet::RECORDS.to_string(),
            _ => format!("{}/", table.name()),
        }
    }

    /// After a failed commit request: whether it was committed anyway (the
    /// answer was lost, not the write). Its record is there, byte for byte.
    fn committed_anyway(&self, record: &pb::Revision) -> bool {
        let key = self.numbered("revisions", record.revision);
        matches!(self.get(key), Ok(Some(raw)) if raw == record.encode_to_vec())
    }
}

/// Every key-value from `start` (inclusive) to `end` (exclusive), in key
/// order, read a page at a time at one etcd revision (consistent across
/// pages); and that revision.
async fn read_range(
    client: &mut Client,
    start: Vec<u8>,
    end: Vec<u8>,
) -> Result<(Vec<KeyValue>, i64), EtcdError> {
    let mut all = Vec::new();
    let mut from = start;
    let mut at = 0;
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_sort(SortTarget::Key, SortOrder::Ascend)
            .with_limit(PAGE);
        if at > 0 {
            options = options.with_revision(at);
        }
        let mut page = client.get(from.clone(), Some(options)).await?;
        if at == 0 {
            at = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let kvs = page.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = last.key().to_vec();
        from.push(0);
        all.extend(kvs);
        if !more {
            break;
        }
    }
    Ok((all, at))
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Revisions for EtcdBackend {
    fn schema_version(&self) -> Result<Option<u32>, StoreError> {
        Ok(self
            .get(self.key("schema"))?
            .map(|raw| u32::from_be_bytes(raw.as_slice().try_into().unwrap_or([0xff; 4]))))
    }

    fn initialize(&self, schema: u32, default: &Profile) -> Result<(), StoreError> {
        let config = ConfigValue {
            revision: 0,
            models: Vec::new(),
            profiles: vec![default.clone()],
        };
        let history = HistoryValue {
            profiles: vec![default.clone()],
            ..HistoryValue::default()
        };
        // Several replicas may start at once on an empty cluster: the
        // first one's transaction initializes, the others' find it done.
        let txn = Txn::new()
            .when([Compare::create_revision(
                self.key("schema"),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(self.key("schema"), schema.to_be_bytes().to_vec(), None),
                TxnOp::put(self.key("revision"), revision_bytes(0), None),
                TxnOp::put(self.key("config"), config.encode_to_vec(), None),
                TxnOp::put(self.numbered("history", 0), history.encode_to_vec(), None),
            ]);
        self.txn(txn)?;
        Ok(())
    }

    fn reseal(
        &self,
        schema: u32,
        reseal: &dyn Fn(Model) -> Result<Model, StoreError>,
    ) -> Result<(usize, usize), StoreError> {
        // History first, a batch at a time: each entry opens under either
        // key, so a reseal cut short is finished by the next start.
        let mut entries = 0;
        let mut batch = Vec::new();
        let history = self.scan_prefix("history/")?;
        for kv in &history {
            let mut value: HistoryValue = decode(kv.value(), || "history".into())?;
            if value.models.is_empty() {
                continue;
            }
            value.models = value
                .models
                .into_iter()
                .map(reseal)
                .collect::<Result<_, _>>()?;
            entries += 1;
            batch.push(TxnOp::put(kv.key(), value.encode_to_vec(), None));
            if batch.len() == BATCH_OPS {
                self.txn(Txn::new().and_then(std::mem::take(&mut batch)))?;
            }
        }
        if !batch.is_empty() {
            self.txn(Txn::new().and_then(batch))?;
        }
        // Then the configuration, unless a replica committed meanwhile
        // (its commit sealed under its own key; the next start reseals).
        let raw = self.get(self.key("revision"))?.unwrap_or_default();
        let mut stored = self.load_config()?;
        let models = stored.models.len();
        for model in stored.models.values_mut() {
            *model = reseal(model.clone())?;
        }
        let txn = Txn::new()
            .when([Compare::value(self.key("revision"), CompareOp::Equal, raw)])
            .and_then([
                TxnOp::put(
                    self.key("config"),
                    ConfigValue::from_stored(&stored).encode_to_vec(),
                    None,
                ),
                TxnOp::put(self.key("schema"), schema.to_be_bytes().to_vec(), None),
            ]);
        self.txn(txn)?;
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
        Ok((models, entries))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        match self.get(self.key("revision"))? {
            Some(raw) => parse_revision(&raw),
            None => Ok(0),
        }
    }

    fn load(&self) -> Result<Stored, StoreError> {
        let stored = self.load_config()?;
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(stored.clone());
        Ok(stored)
    }

    fn commit(&self, change: Changeset<'_>) -> Result<(), StoreError> {
        let revision = change.record.revision;
        let previous = revision.wrapping_sub(1);
        let cached = self.cache.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut next = match cached {
            Some(stored) if stored.revision == previous => stored,
            _ => self.load_config()?,
        };
        if next.revision != previous {
            return Err(StoreError::Conflict {
                revision,
                current: next.revision,
            });
        }
        let mut history = HistoryValue::default();
        for (name, model) in change.models {
            match model {
                Some(model) => history.models.push(model),
                None => history.deleted_models.push(name),
            }
        }
        for (name, profile) in change.profiles {
            match profile {
                Some(profile) => history.profiles.push(profile),
                None => history.deleted_profiles.push(name),
            }
        }
        history.clone().apply(&mut next);
        next.revision = revision;
        let mut writes = vec![
            TxnOp::put(self.key("revision"), revision_bytes(revision), None),
            TxnOp::put(
                self.key("config"),
                ConfigValue::from_stored(&next).encode_to_vec(),
                None,
            ),
            TxnOp::put(
                self.numbered("revisions", revision),
                change.record.encode_to_vec(),
                None,
            ),
            TxnOp::put(
                self.numbered("history", revision),
                history.encode_to_vec(),
                None,
            ),
        ];
        if let Some(attached) = change.attached {
            writes.push(TxnOp::put(
                self.record_key(Table::Rollouts, &attached.key),
                attached.value.clone(),
                None,
            ));
        }
        let txn = Txn::new()
            .when([Compare::value(
                self.key("revision"),
                CompareOp::Equal,
                revision_bytes(previous),
            )])
            .and_then(writes)
            .or_else([TxnOp::get(self.key("revision"), None)]);
        let deadline = Instant::now() + RETRY_FOR;
        let mut attempt = 0;
        let committed = loop {
            attempt += 1;
            match self.txn_once(txn.clone()) {
                Ok(response) if response.succeeded() => break Ok(()),
                Ok(refused) => {
                    // On a retry the revision may be taken by the first
                    // attempt itself, whose answer was lost.
                    if attempt > 1 && self.committed_anyway(change.record) {
                        break Ok(());
                    }
                    let current = refused
                        .op_responses()
                        .into_iter()
                        .find_map(|op| match op {
                            TxnOpResponse::Get(get) => {
                                get.kvs().first().map(|kv| kv.value().to_vec())
                            }
                            _ => None,
                        })
                        .map(|raw| parse_revision(&raw))
                        .transpose()?
                        .unwrap_or(0);
                    break Err(StoreError::Conflict { revision, current });
                }
                Err(StoreError::Etcd { source, action }) => {
                    // The answer may be what was lost: then it is committed.
                    if self.committed_anyway(change.record) {
                        break Ok(());
                    }
                    if !transient(&source) || Instant::now() >= deadline {
                        break Err(StoreError::Etcd { source, action });
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(other) => break Err(other),
            }
        };
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = committed.is_ok().then_some(next);
        committed
    }

    fn record(&self, revision: u64) -> Result<Option<pb::Revision>, StoreError> {
        self.get(self.numbered("revisions", revision))?
            .map(|raw| decode(&raw, || format!("revision {revision}")))
            .transpose()
    }

    fn records(&self, before: Option<u64>, limit: usize) -> Result<Vec<pb::Revision>, StoreError> {
        let start = self.key("revisions/");
        let end = match before {
            Some(before) => self.numbered("revisions", before),
            None => prefix_end(&start),
        };
        let options = GetOptions::new()
            .with_range(end)
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        let mut response = self.retrying("range read", |mut c| {
            let (start, options) = (start.clone(), options.clone());
            async move { c.get(start, Some(options)).await }
        })?;
        response
            .take_kvs()
            .iter()
            .map(|kv| {
                decode(kv.value(), || {
                    String::from_utf8_lossy(kv.key()).into_owned()
                })
            })
            .collect()
    }

    fn config_at(&self, revision: u64) -> Result<Stored, StoreError> {
        let mut stored = Stored::default();
        let start = self.numbered("history", 0);
        let end = self.numbered("history", revision.saturating_add(1));
        for kv in self.range(start, end)? {
            let value: HistoryValue = decode(kv.value(), || {
                format!("history {}", String::from_utf8_lossy(kv.key()))
            })?;
            value.apply(&mut stored);
        }
        stored.revision = revision;
        Ok(stored)
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn follow(&self) -> Option<mpsc::Receiver<()>> {
        let runtime = self.runtime.as_ref()?;
        let (wake, wakes) = mpsc::sync_channel(1);
        let mut client = self.client.clone();
        let key = self.key("revision");
        runtime.spawn(async move {
            loop {
                // Also on every (re)connect: what was committed while the
                // watch was down is read then.
                if matches!(wake.try_send(()), Err(mpsc::TrySendError::Disconnected(_))) {
                    return;
                }
                match client.watch(key.clone(), None).await {
                    Ok(mut stream) => loop {
                        match stream.message().await {
                            Ok(Some(_)) => {
                                if matches!(
                                    wake.try_send(()),
                                    Err(mpsc::TrySendError::Disconnected(_))
                                ) {
                                    return;
                                }
                            }
                            Ok(None) => break,
                            Err(error) => {
                                tracing::warn!(%error, "the etcd watch ended; watching again");
                                break;
                            }
                        }
                    },
                    Err(error) => tracing::warn!(%error, "cannot watch etcd; retrying"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Some(wakes)
    }
}

impl Records for EtcdBackend {
    fn put(&self, table: Table, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.record_key(table, key);
        let value = value.to_vec();
        self.retrying("put", |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, None).await }
        })?;
        Ok(())
    }

    fn insert_new(&self, table: Table, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        let key = self.record_key(table, key);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), value.to_vec(), None)]);
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            match self.txn_once(txn.clone()) {
                Ok(response) => return Ok(response.succeeded()),
                Err(StoreError::Etcd { source, action }) => {
                    // Whether the lost answer was a yes: the key holds
                    // exactly this record.
                    match self.get(key.clone()) {
                        Ok(Some(stored)) => return Ok(stored == value),
                        Ok(None) if transient(&source) && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(200));
                        }
                        _ => return Err(StoreError::Etcd { source, action }),
                    }
                }
                Err(other) => return Err(other),
            }
        }
    }

    fn compare_and_swap(
        &self,
        table: Table,
        key: &str,
        expected: &[u8],
        new: Option<&[u8]>,
    ) -> Result<bool, StoreError> {
        let key = self.record_key(table, key);
        let write = match new {
            Some(value) => TxnOp::put(key.clone(), value.to_vec(), None),
            None => TxnOp::delete(key.clone(), None),
        };
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, expected.to_vec())])
            .and_then([write]);
        // Run once: a lost answer is an error, never a second swap.
        Ok(self.txn_once(txn)?.succeeded())
    }

    fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let key = self.record_key(table, key);
        let response = self.retrying("delete", |mut c| {
            let key = key.clone();
            async move { c.delete(key, None).await }
        })?;
        Ok(response.deleted() > 0)
    }

    fn put_batch(&self, table: Table, records: Vec<(String, Vec<u8>)>) -> Result<(), StoreError> {
        let mut ops = Vec::new();
        let mut bytes = 0;
        for (key, value) in records {
            // etcd refuses a request over 1.5 MiB by default.
            if ops.len() == BATCH_OPS || (bytes + value.len() > BATCH_BYTES && !ops.is_empty()) {
                self.txn(Txn::new().and_then(std::mem::take(&mut ops)))?;
                bytes = 0;
            }
            bytes += value.len() + key.len();
            ops.push(TxnOp::put(self.record_key(table, &key), value, None));
        }
        if !ops.is_empty() {
            self.txn(Txn::new().and_then(ops))?;
        }
        Ok(())
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        EtcdBackend::get(self, self.record_key(table, key))
    }

    fn follow_table(&self, table: Table) -> Option<mpsc::Receiver<TableChange>> {
        let runtime = self.runtime.as_ref()?;
        let (tx, rx) = mpsc::channel();
        let under = Self::table_prefix(table);
        let strip = under.clone();
        let map = move |change: TableChange| {
            let key = |k: String| k.strip_prefix(&strip).map(str::to_string);
            Some(match change {
                TableChange::Snapshot(all) => TableChange::Snapshot(
                    all.into_iter()
                        .filter_map(|(k, v)| Some((key(k)?, v)))
                        .collect(),
                ),
                TableChange::Put(k, v) => TableChange::Put(key(k)?, v),
                TableChange::Deleted(k) => TableChange::Deleted(key(k)?),
            })
        };
        runtime.spawn(fleet::follow_prefix(
            self.client.clone(),
            self.prefix.clone(),
            under,
            map,
            tx,
        ));
        Some(rx)
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = Self::table_prefix(table);
        let skip = self.prefix.len() + prefix.len();
        Ok(self
            .scan_prefix(&prefix)?
            .into_iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(&kv.key()[skip..]).into_owned();
                (key, kv.value().to_vec())
            })
            .collect())
    }
}

impl Backend for EtcdBackend {
    fn probe_write(&self) -> Result<(), StoreError> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let key = self.key("probe");
        self.retrying("put", |mut c| {
            let key = key.clone();
            async move { c.put(key, now.to_be_bytes().to_vec(), None).await }
        })?;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        // etcd acknowledged every write once a quorum had it on disk.
        Ok(())
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn a_prefix_ends_after_all_its_keys() {
        assert_eq!(prefix_end(b"/duofleet/"), b"/duofleet0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }
}
