//! Replicated duofleetd on etcd: a real 3-member etcd cluster (Debian's
//! etcd-server) and two real duofleetd replicas on loopback, with real
//! agents given both replicas' addresses.

use crate::agents::{ENV_HASH_RB as RB, linux_agent, set_gateway};
use crate::{WAIT, instance, list_models, revision_numbers};
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::{CreateModelRequest, GetFleetHealthRequest, Model, SyncState};
use duofleet_tests::agent::{Agent, FakeCommand};
use duofleet_tests::etcd::Etcd;
use duofleet_tests::{Clients, Daemon, DaemonOptions, mk, start_refused_with};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The key files every replica shares (the operator copies them, or the
/// chart mounts one Secret).
const SHARED_FILES: [&str; 6] = [
    "admin.token",
    "enroll.token",
    "secret.key",
    "token-hash.key",
    "ca.pem",
    "ca.key",
];

struct Replicas {
    etcd: Etcd,
    root: tempfile::TempDir,
}

impl Replicas {
    async fn start() -> Replicas {
        let etcd = Etcd::cluster(3).await.unwrap_or_else(|e| panic!("{e}"));
        Replicas {
            etcd,
            root: tempfile::tempdir().unwrap(),
        }
    }

    fn data(&self, i: usize) -> PathBuf {
        self.root.path().join(format!("replica-{i}"))
    }

    /// Starts replica `i` (on `listen`, when it must keep its address);
    /// replicas after the first get the first one's key files.
    fn replica(&self, i: usize, listen: Option<String>) -> Daemon {
        self.replica_with(i, listen, &[])
    }

    /// The first two replicas, with `extra` flags, and a client of each.
    async fn pair(&self, extra: &[String]) -> (Daemon, Daemon, Clients, Clients) {
        let a = self.replica_with(0, None, extra);
        let b = self.replica_with(1, None, extra);
        let (ca, cb) = (a.clients().await, b.clients().await);
        (a, b, ca, cb)
    }

    fn replica_with(&self, i: usize, listen: Option<String>, extra: &[String]) -> Daemon {
        let data = self.data(i);
        if i > 0 && !data.exists() {
            std::fs::create_dir_all(&data).unwrap();
            for file in SHARED_FILES {
                let from = self.data(0).join(file);
                if from.exists() {
                    std::fs::copy(&from, data.join(file)).unwrap();
                }
            }
        }
        on_etcd(&data, &self.etcd.endpoints(), listen, extra)
    }
}

/// Starts duofleetd on `data` with its store in the etcd at `endpoints`,
/// and `extra` flags.
fn on_etcd(data: &Path, endpoints: &str, listen: Option<String>, extra: &[String]) -> Daemon {
    Daemon::start_with(
        data,
        DaemonOptions {
            args: strings(&["--store", "etcd", "--etcd-endpoints", endpoints])
                .into_iter()
                .chain(extra.iter().cloned())
                .collect(),
            listen,
            ..Default::default()
        },
    )
}

fn model(name: &str) -> Model {
    Model {
        api_key: format!("sk-ha-{name}"),
        ..mk::model(name)
    }
}

async fn create(c: &mut Clients, name: &str) -> Result<u64, tonic::Status> {
    c.models
        .create_model(CreateModelRequest {
            model: Some(model(name)),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().revision)
}

/// Waits until `check` holds, polling.
async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until replica `c` shows `id` connected and synced at `revision`.
async fn synced_on(c: &mut Clients, id: &str, revision: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = instance(c, id).await;
        if seen.as_ref().is_some_and(|i| {
            i.connected && i.sync_state() == SyncState::Synced && i.applied_revision == revision
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never synced at {revision}; last seen {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn reconfigures(ctl: &FakeCommand) -> usize {
    ctl.calls()
        .iter()
        .filter(|c| c.contains("reconfigure"))
        .count()
}

/// Both replicas answer every operator RPC and show the whole fleet,
/// whichever replica each agent is connected to. One replica dies while
/// operators write through both: every acknowledged write is kept, and the
/// agents converge through the other; one that comes back to the same
/// content re-applies nothing.
///
/// CI runs it small; `DUOFLEET_HA_AGENTS` and `DUOFLEET_HA_WRITES` (per
/// side) run it large, and it prints its figures.
#[tokio::test]
async fn replicas_share_the_fleet_and_agents_fail_over() {
    let size = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (n, writes) = (
        size("DUOFLEET_HA_AGENTS", 4),
        size("DUOFLEET_HA_WRITES", 30),
    );
    let cluster = Replicas::start().await;
    let (a, b, mut ca, mut cb) = cluster.pair(&[]).await;
    let mut fleet_b = crate::watch_fleet(&mut cb).await;

    // A write through either replica is seen by both.
    create(&mut ca, "first").await.unwrap();
    let gateway_revision = set_gateway(&mut cb, "default", "https://aigw.example.com").await;
    assert_eq!(gateway_revision, 2);
    for c in [&mut ca, &mut cb] {
        eventually("both replicas at revision 2", async || {
            (revision_numbers(c).await.first() == Some(&2)).then_some(())
        })
        .await;
    }

    // Two agents, each told both addresses; they spread over the replicas.
    let both = format!("http://{},http://{}", a.grpc_addr, b.grpc_addr);
    let root = cluster.root.path();
    let mut agents = Vec::new();
    for i in 1..=n {
        let id = format!("gitlab-ha-{i}");
        agents.push(linux_agent(&a, root, &id, RB, &["--control-plane", &both]));
    }
    for c in [&mut ca, &mut cb] {
        for (agent, _, _) in &agents {
            synced_on(c, &agent.instance_id, 2).await;
        }
    }
    assert_spread(&agents, &a);
    // The whole fleet's health from either replica.
    for c in [&mut ca, &mut cb] {
        let listed = crate::list_instances(c).await;
        assert_eq!(listed.len(), n, "{listed:?}");
        // The gateway, probed by every agent, counted across the fleet.
        eventually("the gateway's health from every agent", async || {
            let health = c
                .fleet
                .get_fleet_health(GetFleetHealthRequest::default())
                .await
                .unwrap()
                .into_inner();
            health
                .targets
                .iter()
                .find(|t| t.target.contains("aigw.example.com"))
                .filter(|t| (t.healthy + t.unhealthy) as usize == n)
                .cloned()
        })
        .await;
    }
    // WatchFleet on one replica saw every agent connect, wherever it did.
    let mut connected = BTreeSet::new();
    while connected.len() < n {
        let event = tokio::time::timeout(WAIT, fleet_b.message())
            .await
            .expect("fleet events")
            .unwrap()
            .unwrap();
        if let Some(Event::InstanceConnected(e)) = event.event {
            connected.insert(e.instance_id);
        }
    }

    // Writes from both sides; the first replica dies in the middle.
    let writer = |mut c: Clients, side: &'static str| {
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0..writes {
                let name = format!("w-{side}-{i}");
                // Lost a race with the other replica: nothing was written;
                // the operator retries.
                let mut result = create(&mut c, &name).await;
                while matches!(&result, Err(s) if s.code() == tonic::Code::Aborted) {
                    result = create(&mut c, &name).await;
                }
                match result {
                    Ok(revision) => acknowledged.push((revision, name)),
                    Err(status) => {
                        eprintln!("writer {side} stopped: {status:?}");
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acknowledged
        })
    };
    let writes_a = writer(a.clients().await, "a");
    let writes_b = writer(b.clients().await, "b");
    // Killed about a third of the way through the writes.
    tokio::time::sleep(Duration::from_millis(10 * writes as u64)).await;
    let a_addr = a.grpc_addr.clone();
    a.kill9();
    let killed = Instant::now();
    let mut acknowledged = writes_a.await.unwrap();
    acknowledged.extend(writes_b.await.unwrap());
    assert!(acknowledged.iter().any(|(_, n)| n.starts_with("w-a")));
    assert_eq!(
        acknowledged
            .iter()
            .filter(|(_, n)| n.starts_with("w-b"))
            .count(),
        writes,
        "the surviving replica took every write"
    );
    let models: BTreeSet<String> = list_models(&mut cb)
        .await
        .into_iter()
        .map(|m| m.name)
        .collect();
    for (revision, name) in &acknowledged {
        assert!(
            models.contains(name),
            "{name} (revision {revision}) was acknowledged and lost"
        );
    }
    let numbers = revision_numbers(&mut cb).await;
    let unique: BTreeSet<u64> = numbers.iter().copied().collect();
    assert_eq!(unique.len(), numbers.len(), "a revision number used twice");
    assert_eq!(numbers.len() as u64, numbers[0], "revisions without a gap");

    // New models are in no agent's configuration: nothing was sent. A new
    // gateway is, and every agent converges on it through the survivor.
    let writes_done = killed.elapsed();
    let changed = Instant::now();
    let last = set_gateway(&mut cb, "default", "https://aigw-2.example.com").await;
    for (agent, _, _) in &agents {
        synced_on(&mut cb, &agent.instance_id, last).await;
    }
    let converged = changed.elapsed();
    let before: Vec<usize> = agents.iter().map(|(_, ctl, _)| reconfigures(ctl)).collect();

    // The dead replica comes back; the survivor stops gracefully: agents
    // move back, and the same content is not applied again.
    let a = cluster.replica(0, Some(a_addr));
    let mut ca = a.clients().await;
    b.stop("TERM");
    for (agent, _, _) in &agents {
        synced_on(&mut ca, &agent.instance_id, last).await;
    }
    let back: Vec<usize> = agents.iter().map(|(_, ctl, _)| reconfigures(ctl)).collect();
    assert_eq!(back, before, "the same content was applied again");
    let through_a = acknowledged
        .iter()
        .filter(|(_, n)| n.starts_with("w-a"))
        .count();
    println!(
        "ha figures: {n} agents; {} writes acknowledged ({through_a} through the killed replica, {writes} through the survivor), 0 lost, {} revisions without a gap or a reuse; the survivor's writes went on for {:.1} s after the kill; a new gateway reached all {n} agents through the survivor in {:.2} s; moving back to the restarted replica re-applied nothing",
        acknowledged.len(),
        numbers.len(),
        writes_done.as_secs_f64(),
        converged.as_secs_f64()
    );
}

/// Some of the agents, not all, connected to `first`: they spread over
/// the replicas.
fn assert_spread(agents: &[(Agent, FakeCommand, PathBuf)], first: &Daemon) {
    let endpoint = format!("endpoint=http://{}", first.grpc_addr);
    let on_first = agents
        .iter()
        .filter(|(agent, _, _)| agent.log().contains(&endpoint))
        .count();
    assert!(
        (1..agents.len()).contains(&on_first),
        "the agents spread over both replicas ({on_first} of {} on the first)",
        agents.len()
    );
}

/// An agent's replica disappears for good: the other replica shows it
/// OFFLINE once the dead replica's etcd lease runs out, and ONLINE again
/// when the agent reconnects.
#[tokio::test]
async fn a_dead_replicas_agents_show_offline_until_they_come_back() {
    let cluster = Replicas::start().await;
    let a = cluster.replica(0, None);
    let b = cluster.replica(1, None);
    let mut cb = b.clients().await;
    let root = cluster.root.path();
    // Only the first replica's address: the agent cannot fail over.
    let (mut agent, _, _) = linux_agent(&a, root, "gitlab-lonely", RB, &[]);
    eventually("seen connected through the other replica", async || {
        instance(&mut cb, "gitlab-lonely")
            .await
            .filter(|i| i.connected)
    })
    .await;
    let a_addr = a.grpc_addr.clone();
    a.kill9();
    let killed = Instant::now();
    let offline = eventually("offline after the lease", async || {
        instance(&mut cb, "gitlab-lonely")
            .await
            .filter(|i| !i.connected && i.sync_state() == SyncState::Offline)
    })
    .await;
    assert!(!offline.connected);
    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "offline before the lease could expire: the replica was not holding it"
    );
    let a = cluster.replica(0, Some(a_addr));
    eventually("connected again", async || {
        instance(&mut cb, "gitlab-lonely")
            .await
            .filter(|i| i.connected)
    })
    .await;
    agent.kill9();
    drop(a);
}

/// One etcd member dies: writes go on through both replicas. Then
/// everything stops and starts again: the state is intact.
#[tokio::test]
async fn an_etcd_member_dies_and_everything_restarts_intact() {
    let mut cluster = Replicas::start().await;
    let (a, b, mut ca, mut cb) = cluster.pair(&[]).await;
    for i in 0..3 {
        create(&mut ca, &format!("before-{i}")).await.unwrap();
    }
    cluster.etcd.members[0].kill();
    // A request in flight to the dead member may fail once; writes go on.
    for (c, side) in [(&mut ca, "a"), (&mut cb, "b")] {
        for i in 0..5 {
            let name = format!("during-{side}-{i}");
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match create(c, &name).await {
                    Ok(_) => break,
                    Err(status) => assert!(
                        Instant::now() < deadline,
                        "writes stopped with one member of three down: {status:?}"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let expected: BTreeSet<String> = list_models(&mut cb)
        .await
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(expected.len(), 13);
    let revisions = revision_numbers(&mut cb).await;

    // Stop everything; start it all again.
    a.stop("TERM");
    b.stop("TERM");
    for member in &mut cluster.etcd.members {
        member.kill();
    }
    for member in &mut cluster.etcd.members {
        member.restart().unwrap();
    }
    cluster
        .etcd
        .wait_ready(Duration::from_secs(30))
        .await
        .unwrap();
    let a = cluster.replica(0, None);
    let b = cluster.replica(1, None);
    for daemon in [&a, &b] {
        let mut c = daemon.clients().await;
        let models: BTreeSet<String> = list_models(&mut c)
            .await
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(models, expected);
        assert_eq!(revision_numbers(&mut c).await, revisions);
        let key = c
            .models
            .get_model(duofleet_proto::v1::GetModelRequest {
                name: "before-0".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(key.has_api_key);
    }
    assert!(Path::new(&cluster.data(0)).join("revision.hwm").exists());
}

/// A staged change made through one replica holds back the same instances
/// on both, whichever replica each agent is on; the gates run once (on the
/// leader), and both replicas show the rollout as it moves.
#[tokio::test]
async fn a_rollout_holds_instances_back_on_every_replica() {
    use crate::rollout::{count, gateway_in, percent, spec, staged_gateway, wait_rollout};
    use duofleet_proto::v1::{RolloutState, WaveState};
    let cluster = Replicas::start().await;
    let (a, b, mut ca, mut cb) = cluster.pair(&[]).await;
    let old = set_gateway(&mut ca, "default", "https://aigw-old.example.com").await;
    let both = format!("http://{},http://{}", a.grpc_addr, b.grpc_addr);
    let root = cluster.root.path();
    let agents: Vec<_> = (1..=4)
        .map(|i| {
            linux_agent(
                &a,
                root,
                &format!("gitlab-ro-{i}"),
                RB,
                &["--control-plane", &both],
            )
        })
        .collect();
    for (agent, _, _) in &agents {
        synced_on(&mut ca, &agent.instance_id, old).await;
        synced_on(&mut cb, &agent.instance_id, old).await;
    }
    assert_spread(&agents, &a);
    let before: Vec<usize> = agents.iter().map(|(_, ctl, _)| reconfigures(ctl)).collect();

    // Staged through the second replica: one canary, then the rest after
    // a bake of 4 s.
    let new = "https://aigw-new.example.com";
    let (_, id) = staged_gateway(&mut cb, new, spec(vec![count(1), percent(100)], 4)).await;
    // The other replica learns of it within moments.
    eventually("the rollout known to both replicas", async || {
        ca.rollouts
            .get_rollout(duofleet_proto::v1::GetRolloutRequest { id: id.clone() })
            .await
            .ok()
    })
    .await;
    for c in [&mut ca, &mut cb] {
        wait_rollout(c, &id, "baking wave 1", |r| {
            r.waves
                .first()
                .is_some_and(|w| w.state() == WaveState::Baking)
        })
        .await;
    }
    // During the bake: exactly the canary has the new gateway, on
    // whichever replica; the others stay held on both.
    for _ in 0..10 {
        let moved = agents
            .iter()
            .filter(|(_, _, rb)| gateway_in(rb) == new)
            .count();
        assert_eq!(moved, 1, "only the canary moves during wave 1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then every wave opens, once, and both replicas say so.
    for c in [&mut ca, &mut cb] {
        let done = wait_rollout(c, &id, "succeeded", |r| {
            r.state() == RolloutState::Succeeded
        })
        .await;
        assert!(done.waves.iter().all(|w| w.state() == WaveState::Passed));
    }
    for (agent, ctl, rb) in &agents {
        eventually("the new gateway everywhere", async || {
            (gateway_in(rb) == new).then_some(())
        })
        .await;
        let i = agents
            .iter()
            .position(|(a, _, _)| a.instance_id == agent.instance_id)
            .unwrap();
        eventually("one reconfigure for the change", async || {
            (reconfigures(ctl) == before[i] + 1).then_some(())
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after: Vec<usize> = agents.iter().map(|(_, ctl, _)| reconfigures(ctl)).collect();
    let expected: Vec<usize> = before.iter().map(|n| n + 1).collect();
    assert_eq!(
        after, expected,
        "each agent applied the change exactly once"
    );
}

/// `duofleetd check --store etcd` reads the whole store, and names what is
/// damaged: a revision record overwritten with garbage, a store behind the
/// revision this data dir acknowledged.
#[tokio::test]
async fn check_reads_an_etcd_store_and_names_the_damage() {
    let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("replica");
    let store_flags = ["--store", "etcd", "--etcd-endpoints", etcd.url()];
    let daemon = Daemon::start_with(
        &data,
        DaemonOptions {
            args: store_flags.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        },
    );
    let mut c = daemon.clients().await;
    create(&mut c, "one").await.unwrap();
    create(&mut c, "two").await.unwrap();
    let check = || {
        let out = std::process::Command::new(duofleet_tests::bin("duofleetd"))
            .arg("check")
            .arg("--data-dir")
            .arg(&data)
            .args(store_flags)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // A running replica's store is checked as it is.
    let (sound, said) = check();
    assert!(sound, "{said}");
    assert!(
        said.contains(&format!(
            "checked etcd at {} (prefix /duofleet/): current revision 2, 2 revision records",
            etcd.url()
        )),
        "{said}"
    );
    let mut client = etcd.client().await;
    client
        .put(
            "/duofleet/revisions/00000000000000000001",
            vec![0xff, 0xff, 0xff],
            None,
        )
        .await
        .unwrap();
    let (sound, said) = check();
    assert!(!sound);
    assert!(said.contains("DAMAGED revision 1: stored"), "{said}");
    std::fs::write(data.join("revision.hwm"), "7\n").unwrap();
    let (_, said) = check();
    assert!(
        said.contains(
            "DAMAGED revision.hwm: revision 7 was acknowledged, but the store holds only 2"
        ),
        "{said}"
    );
}

/// Starting a replica on `dir` with `args` is refused, saying `expected`;
/// all it said.
fn refused_saying(dir: &Path, args: &[&str], expected: &str) -> String {
    let said = start_refused_with(dir, &strings(args));
    assert!(said.contains(expected), "{said}");
    said
}

fn strings(all: &[&str]) -> Vec<String> {
    all.iter().map(|s| s.to_string()).collect()
}

/// An etcd that serves clients over mutual TLS only: duofleetd reaches it
/// with --etcd-ca, --etcd-cert and --etcd-key, and without a client
/// certificate it is refused at start, with the cause.
#[tokio::test]
async fn an_etcd_over_mutual_tls() {
    let ca = duofleet_tests::endpoints::TestCa::new();
    let etcd = Etcd::start_tls(duofleet_tests::etcd::Tls {
        ca: &ca,
        client: ca.client_cert("tests"),
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let root = tempfile::tempdir().unwrap();
    let (cert, key) = ca.client_cert("duofleetd");
    let file = |name: &str, text: &str| {
        let path = root.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (ca_file, cert_file, key_file) = (
        file("etcd-ca.pem", &ca.ca_pem),
        file("client.pem", &cert),
        file("client.key", &key),
    );
    let url = etcd.url().to_string();
    let daemon = on_etcd(
        &root.path().join("replica"),
        &url,
        None,
        &strings(&[
            "--etcd-ca",
            &ca_file,
            "--etcd-cert",
            &cert_file,
            "--etcd-key",
            &key_file,
        ]),
    );
    let mut c = daemon.clients().await;
    assert_eq!(create(&mut c, "over-tls").await.unwrap(), 1);
    let raw = etcd
        .client()
        .await
        .get("/duofleet/revision", None)
        .await
        .unwrap();
    assert_eq!(raw.kvs()[0].value(), 1u64.to_be_bytes());

    // No client certificate: the handshake fails, and the start with it.
    refused_saying(
        &root.path().join("no-cert"),
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &url,
            "--etcd-ca",
            &ca_file,
        ],
        &format!("cannot open the store in etcd at {url}"),
    );
    // The flags are checked before anything is tried.
    refused_saying(
        &root.path().join("plain"),
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:1",
            "--etcd-ca",
            &ca_file,
        ],
        "--etcd-endpoints: TLS flags are given, but the endpoints are http://",
    );
    refused_saying(
        &root.path().join("no-ca"),
        &["--store", "etcd", "--etcd-endpoints", &url],
        "--etcd-ca: required with https:// endpoints",
    );
    refused_saying(
        &root.path().join("sled"),
        &["--etcd-endpoints", &url],
        "--etcd-endpoints: applies only with --store etcd",
    );
}

/// etcd's own authentication: duofleetd signs in with --etcd-user and the
/// password in --etcd-password-file; a wrong password is refused at start.
#[tokio::test]
async fn an_etcd_with_authentication() {
    let mut etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    etcd.enable_auth("s3cret-root-pw").await;
    let root = tempfile::tempdir().unwrap();
    let password = root.path().join("etcd-password");
    std::fs::write(&password, "s3cret-root-pw\n").unwrap();
    let url = etcd.url().to_string();
    let pw = password.display().to_string();
    let daemon = on_etcd(
        &root.path().join("replica"),
        &url,
        None,
        &strings(&["--etcd-user", "root", "--etcd-password-file", &pw]),
    );
    let mut c = daemon.clients().await;
    assert_eq!(create(&mut c, "signed-in").await.unwrap(), 1);
    assert!(
        !daemon.log().contains("s3cret-root-pw"),
        "the password is logged"
    );

    std::fs::write(&password, "not-the-pw-81f2").unwrap();
    let said = refused_saying(
        &root.path().join("second"),
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &url,
            "--etcd-user",
            "root",
            "--etcd-password-file",
            &pw,
        ],
        &format!("cannot open the store in etcd at {url}"),
    );
    assert!(
        !said.contains("not-the-pw-81f2"),
        "the password is echoed: {said}"
    );
}

/// Over TLS, what one replica issues the other honours: an agent enrolled
/// through one connects to the other with its certificate when the first
/// dies, and an operator token made through one works on the other, until
/// it is revoked through the first.
#[tokio::test]
async fn certificates_and_tokens_from_one_replica_work_on_the_other() {
    use duofleet_proto::v1::{CreateTokenRequest, RevokeTokenRequest, Role};
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let cluster = Replicas::start().await;
    let ca = duofleet_tests::endpoints::TestCa::new();
    let root = cluster.root.path();
    let file = |name: &str, text: &str| {
        let path = root.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let tls = strings(&[
        "--tls-cert",
        &file("server.pem", &ca.server_cert_pem),
        "--tls-key",
        &file("server.key", &ca.server_key_pem),
    ]);
    let ca_file = file("ca.pem", &ca.ca_pem);
    let a = cluster.replica_with(0, None, &tls);
    let b = cluster.replica_with(1, None, &tls);
    let clients = async |daemon: &Daemon, token: String| {
        let channel = Endpoint::from_shared(format!("https://{}", daemon.grpc_addr))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.ca_pem)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Clients::new(channel, Some(token))
    };
    let mut ca_admin = clients(&a, a.token()).await;
    let mut cb_admin = clients(&b, b.token()).await;

    // A viewer token made through the first replica reads on the second.
    let secret = ca_admin
        .tokens
        .create_token(CreateTokenRequest {
            name: "dashboards".into(),
            role: Role::Viewer as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let mut viewer_b = clients(&b, secret.clone()).await;
    eventually("the token accepted by the other replica", async || {
        viewer_b
            .models
            .list_models(duofleet_proto::v1::ListModelsRequest {})
            .await
            .ok()
    })
    .await;

    // Revoked through the first: the second refuses it too.
    ca_admin
        .tokens
        .revoke_token(RevokeTokenRequest {
            name: "dashboards".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually(
        "the revoked token refused by the other replica",
        async || {
            viewer_b
                .models
                .list_models(duofleet_proto::v1::ListModelsRequest {})
                .await
                .err()
                .filter(|e| e.code() == tonic::Code::Unauthenticated)
        },
    )
    .await;

    // An agent enrolls through whichever replica it starts on.
    let gateway = set_gateway(&mut ca_admin, "default", "https://aigw.example.com").await;
    let list = format!("https://{},https://{}", a.grpc_addr, b.grpc_addr);
    let token_file = root.join("enroll.token");
    std::fs::copy(cluster.data(0).join("enroll.token"), &token_file).unwrap();
    let token_arg = token_file.display().to_string();
    let (agent, ctl, _) = linux_agent(
        &a,
        root,
        "gitlab-tls",
        RB,
        &[
            "--control-plane",
            &list,
            "--control-plane-ca",
            &ca_file,
            "--enroll-token-file",
            &token_arg,
        ],
    );
    synced_on(&mut cb_admin, "gitlab-tls", gateway).await;
    assert!(agent.state_dir.join("agent-cert.pem").exists());
    let on_a = agent
        .log()
        .contains(&format!("endpoint=https://{}", a.grpc_addr));
    let before = reconfigures(&ctl);
    // Its replica dies: it connects to the other with the same certificate
    // (the enroll token is gone, so nothing else could let it in).
    std::fs::remove_file(&token_file).unwrap();
    let mut survivor = if on_a {
        a.kill9();
        cb_admin
    } else {
        b.kill9();
        ca_admin
    };
    let moved = set_gateway(&mut survivor, "default", "https://aigw-2.example.com").await;
    synced_on(&mut survivor, "gitlab-tls", moved).await;
    assert_eq!(reconfigures(&ctl), before + 1);
    assert!(
        !agent.log().contains("PermissionDenied") && !agent.log().contains("revoked"),
        "{}",
        agent.log()
    );
}

/// A rollout's transition is answered OK only once the store has it: with
/// etcd down, an operator's pause is refused (UNAVAILABLE) and the rollout
/// goes on as it was; once etcd is back the pause is stored, and a
/// restarted replica finds the rollout paused.
#[tokio::test]
async fn a_pause_is_answered_ok_only_once_etcd_has_it() {
    use crate::rollout::{count, percent, spec, staged_gateway, wait_rollout};
    use duofleet_proto::v1::{PauseRolloutRequest, RolloutState, WaveState};
    let mut etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("replica");
    let daemon = on_etcd(&data, &etcd.endpoints(), None, &[]);
    let mut c = daemon.clients().await;
    let old = set_gateway(&mut c, "default", "https://aigw-old.example.com").await;
    let (agent, _ctl, _rb) = linux_agent(&daemon, root.path(), "gitlab-pause-1", RB, &[]);
    synced_on(&mut c, &agent.instance_id, old).await;
    let (_, id) = staged_gateway(
        &mut c,
        "https://aigw-new.example.com",
        spec(vec![count(1), percent(100)], 3600),
    )
    .await;
    wait_rollout(&mut c, &id, "baking wave 1", |r| {
        r.waves[0].state() == WaveState::Baking
    })
    .await;

    etcd.members[0].kill();
    let pause = |reason: &str| PauseRolloutRequest {
        id: id.clone(),
        reason: reason.into(),
    };
    let refused = c
        .rollouts
        .pause_rollout(pause("etcd is down"))
        .await
        .expect_err("a pause etcd never stored must not be answered OK");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    let unchanged = crate::rollout::rollout(&mut c, &id).await;
    assert_eq!(unchanged.state(), RolloutState::Progressing);

    etcd.members[0].restart().unwrap();
    etcd.wait_ready(Duration::from_secs(30)).await.unwrap();
    let paused = eventually("a pause answered OK once etcd is back", async || {
        c.rollouts
            .pause_rollout(pause("etcd is back"))
            .await
            .ok()
            .map(|r| r.into_inner())
    })
    .await;
    assert_eq!(paused.state(), RolloutState::Paused);
    assert!(paused.reason.ends_with("etcd is back"), "{paused:?}");

    let listen = daemon.grpc_addr.clone();
    daemon.stop("TERM");
    let daemon = on_etcd(&data, &etcd.endpoints(), Some(listen), &[]);
    let mut c = daemon.clients().await;
    let stored = crate::rollout::rollout(&mut c, &id).await;
    assert_eq!(stored.state(), RolloutState::Paused);
    assert_eq!(stored.reason, paused.reason);
    drop(agent);
}

/// A wave's progress shows on every replica as it goes, not only at the
/// leader's next transition: with one instance of the wave applied and
/// the other OFFLINE, the wave is APPLYING with 1 applied and 1 waited
/// for, whichever replica is asked.
#[tokio::test]
async fn every_replica_shows_a_waves_progress() {
    use crate::rollout::{percent, spec, staged_gateway, wait_rollout};
    use duofleet_proto::v1::WaveState;
    let cluster = Replicas::start().await;
    let (a, b, mut ca, mut cb) = cluster.pair(&[]).await;
    let old = set_gateway(&mut ca, "default", "https://aigw-old.example.com").await;
    let root = cluster.root.path();
    let (up, _, _) = linux_agent(&a, root, "gitlab-up", RB, &[]);
    let (down, _, _) = linux_agent(&b, root, "gitlab-down", RB, &[]);
    for c in [&mut ca, &mut cb] {
        synced_on(c, &up.instance_id, old).await;
        synced_on(c, &down.instance_id, old).await;
    }
    drop(down);
    for c in [&mut ca, &mut cb] {
        eventually("gitlab-down OFFLINE", async || {
            instance(c, "gitlab-down")
                .await
                .filter(|i| i.sync_state() == SyncState::Offline)
        })
        .await;
    }
    let (_, id) = staged_gateway(
        &mut ca,
        "https://aigw-new.example.com",
        spec(vec![percent(100)], 3600),
    )
    .await;
    for c in [&mut ca, &mut cb] {
        let seen = wait_rollout(c, &id, "1 applied, 1 waited for", |r| {
            r.waves[0].applied == 1 && r.waves[0].waiting_count == 1
        })
        .await;
        assert_eq!(seen.waves[0].state(), WaveState::Applying);
        assert_eq!(seen.waves[0].waiting, ["gitlab-down (OFFLINE)"]);
    }
    drop(up);
}

/// A write acknowledged through one replica is seen by the next read
/// through the other, without waiting for its watch: models, the export,
/// and a rollout just started.
#[tokio::test]
async fn a_write_through_one_replica_is_read_at_once_through_the_other() {
    use crate::rollout::{count, percent, spec, staged_gateway};
    use duofleet_proto::v1::{ExportConfigRequest, GetModelRequest, GetRolloutRequest};
    let cluster = Replicas::start().await;
    let (a, _b, mut ca, mut cb) = cluster.pair(&[]).await;
    for i in 0..30 {
        let name = format!("read-at-once-{i:02}");
        let revision = create(&mut ca, &name).await.unwrap();
        let read = cb
            .models
            .get_model(GetModelRequest { name: name.clone() })
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{name}, acknowledged at {revision}, not read through the other replica: {e:?}"
                )
            });
        assert_eq!(read.into_inner().name, name);
        let exported = cb
            .config
            .export_config(ExportConfigRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(exported.revision >= revision);
    }
    let (_agent, _, _) = linux_agent(&a, cluster.root.path(), "gitlab-read-1", RB, &[]);
    synced_on(&mut ca, "gitlab-read-1", 30).await;
    let (_, id) = staged_gateway(
        &mut ca,
        "https://aigw-new.example.com",
        spec(vec![count(1), percent(100)], 3600),
    )
    .await;
    cb.rollouts
        .get_rollout(GetRolloutRequest { id: id.clone() })
        .await
        .unwrap_or_else(|e| panic!("rollout {id} not found through the other replica: {e:?}"));
}

/// The leading replica compacts etcd's history (every second here; 5
/// minutes by default): without it every heartbeat's instance record
/// stays in etcd until its quota is full. Watches that a compaction cuts
/// read again: an agent on the other replica still gets a change made
/// through the first one after its history was compacted.
#[tokio::test]
async fn the_leader_compacts_etcds_history_and_replicas_follow_on() {
    use etcd_client::GetOptions;
    let cluster = Replicas::start().await;
    let compact = strings(&["--etcd-compaction-interval-secs", "1"]);
    let (_a, b, mut ca, mut cb) = cluster.pair(&compact).await;
    let (agent, _, rb) = linux_agent(&b, cluster.root.path(), "gitlab-compact-1", RB, &[]);
    let first = set_gateway(&mut ca, "default", "https://aigw-one.example.com").await;
    synced_on(&mut cb, &agent.instance_id, first).await;
    for i in 0..5 {
        create(&mut ca, &format!("compacted-{i}")).await.unwrap();
    }
    let mut etcd = cluster.etcd.client().await;
    eventually("etcd's first revisions compacted", async || {
        let old = etcd
            .get(
                "/duofleet/revision",
                Some(GetOptions::new().with_revision(2)),
            )
            .await;
        match old {
            Err(error) if error.to_string().contains("compacted") => Some(()),
            _ => None,
        }
    })
    .await;
    let second = set_gateway(&mut ca, "default", "https://aigw-two.example.com").await;
    synced_on(&mut cb, &agent.instance_id, second).await;
    assert_eq!(
        crate::rollout::gateway_in(&rb),
        "https://aigw-two.example.com"
    );
    let models = list_models(&mut cb).await;
    assert_eq!(models.len(), 5);
}
