//! The same fan-out through etcd, the store Kubernetes uses for this job:
//! Debian's etcd-server started on a temp data dir, N watchers on one key,
//! each on its own client connection, and puts from one more client.

use crate::Arrivals;
use etcd_client::{Client, WatchStream};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// The one key every watcher follows.
pub const KEY: &str = "/duofleet/bench/desired/default";

pub struct Etcd {
    child: Child,
    _dir: tempfile::TempDir,
    pub url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl Etcd {
    /// Starts `etcd` ($ETCD, or the one on PATH) and waits until it answers.
    pub async fn start() -> Result<Etcd, String> {
        let bin = std::env::var_os("ETCD")
            .map(PathBuf::from)
            .unwrap_or_else(|| "etcd".into());
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).map_err(|e| e.to_string())?;
        let child = Command::new(&bin)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=bench={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {} ({e}); install Debian's etcd-server or set ETCD",
                    bin.display()
                )
            })?;
        let etcd = Etcd {
            child,
            _dir: dir,
            url,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = Client::connect([&etcd.url], None).await
                && c.status().await.is_ok()
            {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                return Err("etcd did not answer within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
