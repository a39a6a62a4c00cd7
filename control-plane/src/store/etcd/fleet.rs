//! The fleet's live state, shared between replicas through etcd.
//!
//! ```text
//! fleet/instances/<id>   what the instance's agent reported (saved in batches)
//! fleet/live/<id>        the replica it is connected to, held by that
//!                        replica's lease
//! fleet/labels/<id>      the labels an operator set
//! ```
//!
//! Each replica holds one lease (10 s), kept alive by one request every few
//! seconds whatever the fleet's size: agents' heartbeats cost etcd nothing.
//! A replica that dies stops renewing it, and within the lease's time etcd
//! drops every `live` key it held: the other replicas show its agents
//! OFFLINE until they reconnect to one of them. Every replica follows the
//! whole `fleet/` prefix with one watch.

use super::{EtcdBackend, EtcdError, prefix_end, read_range};
use crate::store::StoreError;
use crate::store::backend::{Fleet, FleetChange, TableChange};
use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

pub(super) const RECORDS: &str = "fleet/instances/";
const LIVE: &str = "fleet/live/";
const LABELS: &str = "fleet/labels/";
const FLEET: &str = "fleet/";

/// The lease's time to live, in seconds: how long the cluster waits for a
/// silent replica before its agents show OFFLINE.
const LEASE_TTL: i64 = 10;
/// Presence writes per transaction.
const PRESENCE_OPS: usize = 50;

/// This replica's name, lease, and the instances connected to it.
pub struct Presence {
    replica: String,
    lease: Mutex<Option<i64>>,
    here: Mutex<HashSet<String>>,
    left: AtomicBool,
    /// This replica holds the `leader` key.
    leading: AtomicBool,
    /// The election runs.
    campaigning: AtomicBool,
}

impl Presence {
    pub fn new() -> Presence {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "duofleetd".into());
        let mut random = [0u8; 4];
        let _ = getrandom::fill(&mut random);
        Presence {
            replica: format!("{host}-{}", hex::encode(random)),
            lease: Mutex::new(None),
            here: Mutex::new(HashSet::new()),
            left: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            campaigning: AtomicBool::new(false),
        }
    }

    fn lease(&self) -> Option<i64> {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_lease(&self, lease: Option<i64>) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = lease;
    }

    fn here(&self) -> Vec<String> {
        self.here
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// Puts `live/<id>` for each instance under `lease`, in batches.
async fn put_live(
    client: &mut Client,
    prefix: &str,
    replica: &str,
    lease: i64,
    ids: &[String],
) -> Result<(), EtcdError> {
    for chunk in ids.chunks(PRESENCE_OPS) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|id| {
                TxnOp::put(
                    format!("{prefix}{LIVE}{id}"),
                    replica,
                    Some(PutOptions::new().with_lease(lease)),
                )
            })
            .collect();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// Keeps the lease alive. Should it be lost (the replica was cut off
/// longer than its time to live), takes a new one and puts this replica's
/// instances back under it.
async fn keep_alive(mut client: Client, presence: Arc<Presence>, prefix: String, mut lease: i64) {
    while !presence.left.load(Ordering::Acquire) {
        if let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await {
            loop {
                if presence.left.load(Ordering::Acquire) || keeper.keep_alive().await.is_err() {
                    break;
                }
                match stream.message().await {
                    Ok(Some(answer)) if answer.ttl() > 0 => {}
                    _ => break,
                }
                tokio::time::sleep(Duration::from_secs((LEASE_TTL / 3) as u64)).await;
            }
        }
        if presence.left.load(Ordering::Acquire) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let alive = client
            .lease_time_to_live(lease, None)
            .await
            .is_ok_and(|r| r.ttl() > 0);
        if alive {
            continue;
        }
        let Ok(granted) = client.lease_grant(LEASE_TTL, None).await else {
            continue;
        };
        lease = granted.id();
        presence.set_lease(Some(lease));
        let here = presence.here();
        match put_live(&mut client, &prefix, &presence.replica, lease, &here).await {
            Ok(()) => tracing::warn!(
                instances = here.len(),
                "this replica's etcd lease had expired; its instances are present again under a new one"
            ),
            Err(error) => {
                tracing::warn!(%error, "cannot put this replica's instances under its new etcd lease")
            }
        }
    }
}

/// How often a replica checks who leads, and tries to when nobody does.
const CAMPAIGN_EVERY: Duration = Duration::from_secs(2);

/// The election: the `leader` key names the replica that leads, held by
/// its lease. Whoever finds it missing takes it; a leader that dies loses
/// it with its lease.
async fn campaign(mut client: Client, presence: Arc<Presence>, prefix: String) {
    let key = format!("{prefix}leader");
    while !presence.left.load(Ordering::Acquire) {
        let leading = match presence.lease() {
            None => false,
            Some(lease) => {
                let txn = Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        key.clone(),
                        presence.replica.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(key.clone(), None)]);
                match client.txn(txn).await {
                    Ok(answer) if answer.succeeded() => true,
                    Ok(answer) => answer.op_responses().into_iter().any(|op| {
                        matches!(op, TxnOpResponse::Get(get)
                            if get.kvs().first().is_some_and(|kv| kv.value() == presence.replica.as_bytes()))
                    }),
                    // Cut off from the cluster: another replica may lead.
                    Err(_) => false,
                }
            }
        };
        if presence.leading.swap(leading, Ordering::AcqRel) != leading {
            tracing::info!(replica = %presence.replica, leading, "leadership changed");
        }
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    }
    presence.leading.store(false, Ordering::Release);
}

/// Compacts etcd's history on the leader, every `every`, up to the
/// revision etcd was at one interval before: etcd keeps every version of
/// every key until it is compacted, and the fleet's instance records are
/// written again with every heartbeat (each instance about twice a
/// minute), so without it etcd's database grows until it reaches its quota
/// and refuses every write. Watches more than an interval behind are
/// cancelled by etcd and read everything again (`follow_prefix`), as
/// after any break. As kube-apiserver does with its etcd (every 5
/// minutes); compaction is cluster-wide, so a shared etcd that must keep
/// longer history runs with this off (`--etcd-compaction-interval-secs 0`)
/// and compacts by itself.
async fn compact(mut client: Client, presence: Arc<Presence>, prefix: String, every: Duration) {
    let key = format!("{prefix}revision");
    // etcd's revision one interval ago, seen while leading.
    let mut previous: Option<i64> = None;
    while !presence.left.load(Ordering::Acquire) {
        tokio::time::sleep(every).await;
        if !presence.leading.load(Ordering::Acquire) {
            previous = None;
            continue;
        }
        let now = match client.get(key.clone(), None).await {
            Ok(answer) => answer.header().map_or(0, |h| h.revision()),
            Err(error) => {
                tracing::debug!(%error, "cannot read etcd's revision to compact; trying again");
                continue;
            }
        };
        if let Some(at) = previous.filter(|at| *at > 0) {
            match client.compact(at, None).await {
                Ok(_) => tracing::debug!(revision = at, "etcd history compacted"),
                // Compacted further already (etcd's own auto-compaction).
                Err(error) if error.to_string().contains("compacted") => {}
                Err(error) => {
                    tracing::warn!(%error, revision = at, "cannot compact etcd's history; trying again")
                }
            }
        }
        previous = Some(now);
    }
}

impl EtcdBackend {
    /// This replica's lease, granted (and kept alive) on first use.
    fn ensure_lease(&self) -> Result<i64, StoreError> {
        let mut slot = self
            .presence
            .lease
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(lease) = *slot {
            return Ok(lease);
        }
        let granted = self.run("lease grant", |mut c| async move {
            c.lease_grant(LEASE_TTL, None).await
        })?;
        let lease = granted.id();
        *slot = Some(lease);
        drop(slot);
        let runtime = self.runtime.as_ref().ok_or(StoreError::Unavailable)?;
        runtime.spawn(keep_alive(
            self.client.clone(),
            self.presence.clone(),
            self.prefix.clone(),
            lease,
        ));
        Ok(lease)
    }
}

/// Follows every key under `prefix` + `under`: a snapshot, then every
/// change from the snapshot's revision on; a snapshot again whenever the
/// watch breaks. Keys are given without `prefix`; `map` turns each change
/// into what the receiver wants (or nothing).
pub(super) async fn follow_prefix<T: Send + 'static>(
    mut client: Client,
    prefix: String,
    under: String,
    map: impl Fn(TableChange) -> Option<T> + Send + 'static,
    changes: mpsc::Sender<T>,
) {
    let start = format!("{prefix}{under}").into_bytes();
    let end = prefix_end(&start);
    let key_of = |raw: &[u8]| String::from_utf8_lossy(&raw[prefix.len()..]).into_owned();
    loop {
        let (kvs, revision) = match read_range(&mut client, start.clone(), end.clone()).await {
            Ok(read) => read,
            Err(error) => {
                tracing::warn!(%error, under, "cannot read from etcd; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let snapshot = kvs
            .iter()
            .map(|kv| (key_of(kv.key()), kv.value().to_vec()))
            .collect();
        if let Some(change) = map(TableChange::Snapshot(snapshot))
            && changes.send(change).is_err()
        {
            return;
        }
        let options = WatchOptions::new()
            .with_range(end.clone())
            .with_start_revision(revision + 1);
        let mut stream = match client.watch(start.clone(), Some(options)).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, under, "cannot watch etcd; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(answer)) => {
                    if answer.canceled() {
                        tracing::warn!(
                            reason = answer.cancel_reason(),
                            under,
                            "an etcd watch was cancelled; reading again"
                        );
                        break;
                    }
                    for event in answer.events() {
                        let Some(kv) = event.kv() else { continue };
                        let key = key_of(kv.key());
                        let change = match event.event_type() {
                            EventType::Put => TableChange::Put(key, kv.value().to_vec()),
                            EventType::Delete => TableChange::Deleted(key),
                        };
                        if let Some(change) = map(change)
                            && changes.send(change).is_err()
                        {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, under, "an etcd watch ended; reading again");
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A change under `fleet/`, as the registry takes it.
fn fleet_change(change: TableChange) -> Option<FleetChange> {
    Some(match change {
        TableChange::Snapshot(all) => {
            let mut records = Vec::new();
            let mut present = HashMap::new();
            let mut labels = Vec::new();
            for (key, value) in all {
                if let Some(id) = key.strip_prefix(RECORDS) {
                    records.push((id.to_string(), value));
                } else if let Some(id) = key.strip_prefix(LIVE) {
                    present.insert(id.to_string(), String::from_utf8_lossy(&value).into_owned());
                } else if let Some(id) = key.strip_prefix(LABELS) {
                    labels.push((id.to_string(), value));
                }
            }
            FleetChange::Snapshot {
                records,
                present,
                labels,
            }
        }
        TableChange::Put(key, value) => {
            if let Some(id) = key.strip_prefix(RECORDS) {
                FleetChange::Saved(id.to_string(), value)
            } else if let Some(id) = key.strip_prefix(LIVE) {
                FleetChange::Present(
                    id.to_string(),
                    Some(String::from_utf8_lossy(&value).into_owned()),
                )
            } else {
                FleetChange::Labels(key.strip_prefix(LABELS)?.to_string(), value)
            }
        }
        TableChange::Deleted(key) => {
            if let Some(id) = key.strip_prefix(RECORDS) {
                FleetChange::Deleted(id.to_string())
            } else {
                FleetChange::Present(key.strip_prefix(LIVE)?.to_string(), None)
            }
        }
    })
}

impl Fleet for EtcdBackend {
    fn replica(&self) -> Option<&str> {
        Some(&self.presence.replica)
    }

    fn present(&self, arrived: Vec<String>, left: Vec<String>) -> Result<(), StoreError> {
        if arrived.is_empty() && left.is_empty() {
            return Ok(());
        }
        {
            let mut here = self.presence.here.lock().unwrap_or_else(|e| e.into_inner());
            for id in &left {
                here.remove(id);
            }
            here.extend(arrived.iter().cloned());
        }
        let lease = self.ensure_lease()?;
        let prefix = self.prefix.clone();
        let replica = self.presence.replica.clone();
        self.retrying("presence write", |mut c| {
            let (prefix, replica) = (prefix.clone(), replica.clone());
            let (arrived, left) = (arrived.clone(), left.clone());
            async move {
                put_live(&mut c, &prefix, &replica, lease, &arrived).await?;
                // Only this replica's key: the agent may be on another by now.
                for chunk in left.chunks(PRESENCE_OPS) {
                    let ops: Vec<TxnOp> = chunk
                        .iter()
                        .map(|id| {
                            let key = format!("{prefix}{LIVE}{id}");
                            TxnOp::txn(
                                Txn::new()
                                    .when([Compare::value(
                                        key.clone(),
                                        CompareOp::Equal,
                                        replica.clone(),
                                    )])
                                    .and_then([TxnOp::delete(key, None)]),
                            )
                        })
                        .collect();
                    c.txn(Txn::new().and_then(ops)).await?;
                }
                Ok(())
            }
        })
    }

    fn put_labels(&self, instance_id: &str, value: &[u8]) -> Result<(), StoreError> {
        let key = self.key(&format!("{LABELS}{instance_id}"));
        let value = value.to_vec();
        self.retrying("put", |mut c| {
            let (key, value) = (key.clone(), value.clone());
            async move { c.put(key, value, None).await }
        })?;
        Ok(())
    }

    fn follow_fleet(&self) -> Option<mpsc::Receiver<FleetChange>> {
        let runtime = self.runtime.as_ref()?;
        let (tx, rx) = mpsc::channel();
        runtime.spawn(follow_prefix(
            self.client.clone(),
            self.prefix.clone(),
            FLEET.to_string(),
            fleet_change,
            tx,
        ));
        Some(rx)
    }

    fn leads(&self) -> bool {
        if !self.presence.campaigning.swap(true, Ordering::AcqRel) {
            if let Err(error) = self.ensure_lease() {
                self.presence.campaigning.store(false, Ordering::Release);
                tracing::warn!(error = %crate::error::error_chain(&error), "cannot take an etcd lease to stand for leader; trying again");
                return false;
            }
            if let Some(runtime) = self.runtime.as_ref() {
                runtime.spawn(campaign(
                    self.client.clone(),
                    self.presence.clone(),
                    self.prefix.clone(),
                ));
                if let Some(every) = self.compaction {
                    runtime.spawn(compact(
                        self.client.clone(),
                        self.presence.clone(),
                        self.prefix.clone(),
                        every,
                    ));
                }
            }
        }
        self.presence.leading.load(Ordering::Acquire)
    }

    fn leave(&self) {
        self.presence.left.store(true, Ordering::Release);
        self.presence.leading.store(false, Ordering::Release);
        let Some(lease) = self.presence.lease() else {
            return;
        };
        // Revoking drops every live key this replica held at once.
        match self.run("lease revoke", |mut c| async move {
            c.lease_revoke(lease).await
        }) {
            Ok(_) => self.presence.set_lease(None),
            Err(error) => {
                tracing::warn!(error = %crate::error::error_chain(&error), "cannot revoke this replica's etcd lease; its instances show connected until it expires")
            }
        }
    }
}
