//! The same fan-out through etcd, the store Kubernetes uses for this job:
//! Debian's etcd-server started on a temp data dir, N watchers on one key,
//! each on its own client connection, and puts from one more client.

use crate::Arrivals;
pub use duofleet_tests::etcd::Etcd;
use etcd_client::{Client, WatchStream};
use prost::Message;
use std::sync::Arc;
use tokio::task::JoinSet;

/// The one key every watcher follows.
pub const KEY: &str = "/duofleet/bench/desired/default";

/// `count` watchers on KEY, each with its own client connection; returns
/// once every watch is created. Each put's revision lands in `arrivals`.
pub async fn watchers(
    url: &str,
    count: usize,
    per_connection: usize,
    arrivals: Arc<Arrivals>,
) -> JoinSet<()> {
    let mut running = JoinSet::new();
    let mut starting = JoinSet::new();
    let follow = |(client, mut stream): (Client, WatchStream)| {
        let arrivals = arrivals.clone();
        async move {
            let _client = client;
            while let Ok(Some(response)) = stream.message().await {
                for event in response.events() {
                    if let Some(kv) = event.kv() {
                        arrivals.record(kv.mod_revision() as u64);
                    }
                }
            }
        }
    };
    let mut shared: Option<Client> = None;
    for i in 0..count {
        // A hundred handshakes at a time.
        if starting.len() >= 100 {
            running.spawn(follow(starting.join_next().await.unwrap().unwrap()));
        }
        // Watchers of a group share one client connection (a stream each).
        if per_connection > 1 && i % per_connection == 0 {
            shared = Some(Client::connect([url], None).await.expect("etcd client"));
        }
        let url = url.to_string();
        let shared = shared.clone();
        starting.spawn(async move {
            let mut client = match shared {
                Some(client) => client,
                None => Client::connect([url], None).await.expect("etcd client"),
            };
            let mut stream = client.watch(KEY, None).await.expect("etcd watch");
            let created = stream.message().await.expect("watch created");
            assert!(created.is_some_and(|r| r.created()), "watch not created");
            (client, stream)
        });
    }
    while let Some(watcher) = starting.join_next().await {
        running.spawn(follow(watcher.unwrap()));
    }
    running
}

/// The client that makes the changes, on a connection of its own.
pub async fn writer(etcd: &Etcd) -> Client {
    Client::connect([etcd.url()], None)
        .await
        .expect("etcd writer")
}

/// Change `change`: its DesiredConfig's bytes put on KEY; the revision.
pub async fn put(writer: &mut Client, change: usize) -> u64 {
    let value = crate::desired(change).encode_to_vec();
    let put = writer.put(KEY, value, None).await.expect("etcd put");
    put.header().expect("put header").revision() as u64
}
