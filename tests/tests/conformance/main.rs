//! The store's conformance suite: the same tests against every backend,
//! embedded sled (a temp data dir) and etcd (a real etcd-server on
//! loopback, a fresh one per test). Each test goes through the public
//! `Store`, as duofleetd does; on etcd, "two writers" are two stores on the
//! same cluster, as two duofleetd replicas are.

use duofleet_control_plane::ca::IssuedCert;
use duofleet_control_plane::catalog;
use duofleet_control_plane::config::Config;
use duofleet_control_plane::error::ConfigError;
use duofleet_control_plane::secrets::Sealer;
use duofleet_control_plane::store::backend::{Backend, Changeset, Table};
use duofleet_control_plane::store::etcd::{EtcdBackend, EtcdOptions};
use duofleet_control_plane::store::{SledBackend, Store, StoreError, StoredToken};
use duofleet_proto::v1::{self as pb, Model};
use duofleet_tests::etcd::Etcd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: [u8; 32] = [7; 32];

/// Where a test's store lives.
enum Place {
    Sled(tempfile::TempDir),
    Etcd(Box<Etcd>),
}

struct Harness {
    place: Place,
    /// The data dir beside the database (the high-water file).
    dir: tempfile::TempDir,
}

impl Harness {
    async fn sled() -> Harness {
        Harness {
            place: Place::Sled(tempfile::tempdir().unwrap()),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn etcd() -> Harness {
        let etcd = Etcd::start().await.unwrap_or_else(|e| panic!("{e}"));
        Harness {
            place: Place::Etcd(Box::new(etcd)),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn backend(&self) -> Arc<dyn Backend> {
        match &self.place {
            Place::Sled(dir) => {
                // sled's flusher lets go of the file lock a moment after
                // the previous handle is dropped.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    match SledBackend::open(&dir.path().join("db")) {
                        Ok(backend) => return Arc::new(backend),
                        Err(StoreError::Storage(e))
                            if e.to_string().contains("could not acquire lock")
                                && Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("open sled: {e}"),
                    }
                }
            }
            Place::Etcd(etcd) => Arc::new(
                EtcdBackend::connect(EtcdOptions {
                    endpoints: vec![etcd.url().to_string()],
                    prefix: "/conformance/".into(),
                    ..EtcdOptions::default()
                })
                .expect("connect to etcd"),
            ),
        }
    }

    fn high_water(&self) -> PathBuf {
        self.dir.path().join("revision.hwm")
    }

    /// Opens a store, as duofleetd does at start.
    fn open(&self) -> Arc<Store> {
        let store = Store::open_backend(
            self.backend(),
            Some(&self.high_water()),
            catalog::get(),
            Sealer::new(&KEY, None),
        )
        .expect("open the store");
        let store = Arc::new(store);
        store.follow();
        store
    }

    /// Two writers: the same store twice on sled (one process owns the
    /// database), two stores on etcd (two replicas).
    fn writers(&self) -> (Arc<Store>, Arc<Store>) {
        let first = self.open();
        let second = match self.place {
            Place::Sled(_) => first.clone(),
            Place::Etcd(_) => self.open(),
        };
        (first, second)
    }

    /// Every byte the backend holds, for a search.
    async fn raw_bytes(&self) -> Vec<u8> {
        match &self.place {
            Place::Sled(dir) => {
                let mut all = Vec::new();
                read_all(dir.path(), &mut all);
                all
            }
            Place::Etcd(etcd) => {
                let mut client = etcd.client().await;
                let response = client
                    .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
                    .await
                    .unwrap();
                let mut all = Vec::new();
                for kv in response.kvs() {
                    all.extend_from_slice(kv.key());
                    all.extend_from_slice(kv.value());
                }
                all
            }
        }
    }
}

fn read_all(dir: &Path, into: &mut Vec<u8>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_all(&path, into);
        } else {
            into.extend(std::fs::read(&path).unwrap());
        }
    }
}

fn model(name: &str) -> Model {
    Model {
        name: name.into(),
        family: "mixtral".into(),
        endpoint: "https://vllm.internal:8000/v1".into(),
        identifier: "custom_openai/mixtral".into(),
        api_key: format!("sk-conformance-{name}-7f3a9c"),
        ..Default::default()
    }
}

fn create(store: &Store, name: &str) -> Result<u64, StoreError> {
    let commit = store.mutate("tester", |c, cat| c.create_model(cat, model(name)))?;
    Ok(commit.revision.expect("a revision").revision)
}

fn names(config: &Config) -> Vec<String> {
    config.models.keys().cloned().collect()
}

/// Waits until `store` reaches `revision` (another writer committed it).
async fn reaches(store: &Store, revision: u64) -> Arc<Config> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let current = store.current();
        if current.revision >= revision {
            return current;
        }
        assert!(
            Instant::now() < deadline,
            "stuck at revision {} waiting for {revision}",
            current.revision
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// 40 creates from two writers at once, 8 threads each: every revision
/// number is used exactly once, 1 to N without a gap, and every
/// acknowledged create is in the configuration. A create that lost a race
/// between replicas is refused as a conflict and wrote nothing.
async fn revisions_are_atomic_and_never_reused(h: Harness) {
    let (a, b) = h.writers();
    let mut threads = Vec::new();
    for t in 0..16 {
        let store = if t % 2 == 0 { a.clone() } else { b.clone() };
        threads.push(std::thread::spawn(move || {
            let mut won = Vec::new();
            let mut conflicts = 0;
            for i in 0..5 {
                let name = format!("m-{t}-{i}");
                loop {
                    match create(&store, &name) {
                        Ok(revision) => {
                            won.push((revision, name));
                            break;
                        }
                        Err(StoreError::Conflict { .. }) => conflicts += 1,
                        Err(e) => panic!("create {name}: {e}"),
                    }
                }
            }
            (won, conflicts)
        }));
    }
    let mut acknowledged = Vec::new();
    for thread in threads {
        let (won, _) = thread.join().unwrap();
        acknowledged.extend(won);
    }
    acknowledged.sort();
    let numbers: Vec<u64> = acknowledged.iter().map(|(r, _)| *r).collect();
    assert_eq!(numbers, (1..=80).collect::<Vec<_>>(), "revision numbers");
    for store in [&a, &b] {
        let config = reaches(store, 80).await;
        assert_eq!(config.revision, 80);
        assert_eq!(config.models.len(), 80);
        let records = store.list_revisions(None, 1000).unwrap();
        assert_eq!(records.len(), 80);
        for (revision, name) in &acknowledged {
            let record = store.revision_record(*revision).unwrap();
            assert_eq!(record.summary, format!("create model {name}"));
            assert!(config.models.contains_key(name));
        }
    }
}

/// History rebuilds every revision; rollback restores configuration and
/// never credentials.
async fn history_and_rollback(h: Harness) {
    let store = h.open();
    create(&store, "a").unwrap(); // 1
    create(&store, "b").unwrap(); // 2
    store.mutate("tester", |c, _| c.delete_model("a")).unwrap(); // 3
    let rotated = Model {
        name: "b".into(),
        api_key: "sk-rotated-b".into(),
        ..Default::default()
    };
    store
        .mutate("tester", |c, cat| c.update_model(cat, rotated.clone(), &[]))
        .unwrap(); // 4
    let at = |revision| names(&store.config_at_revision(revision).unwrap());
    assert_eq!(at(0), Vec::<String>::new());
    assert!(
        store
            .config_at_revision(0)
            .unwrap()
            .profiles
            .contains_key("default")
    );
    assert_eq!(at(1), ["a"]);
    assert_eq!(at(2), ["a", "b"]);
    assert_eq!(at(3), ["b"]);
    let (record, at_two) = store.get_revision(2).unwrap();
    assert_eq!(record.summary, "create model b");
    assert_eq!(at_two.models["b"].api_key, "sk-conformance-b-7f3a9c");

    let commit = store.rollback("ops", 2, false).unwrap();
    let record = commit.revision.unwrap();
    assert_eq!(record.revision, 5);
    assert_eq!(
        record.summary,
        "rollback to revision 2; a restored without an API key (set it with UpdateModel)"
    );
    let config = store.current();
    assert_eq!(names(&config), ["a", "b"]);
    assert_eq!(config.models["a"].api_key, "");
    assert_eq!(config.models["b"].api_key, "sk-rotated-b");
    assert!(matches!(
        store.rollback("ops", 99, false),
        Err(StoreError::Config(ConfigError::RevisionNotFound(99)))
    ));
    assert!(matches!(
        store.config_at_revision(6),
        Err(StoreError::Config(ConfigError::RevisionNotFound(6)))
    ));
    let page: Vec<u64> = store
        .list_revisions(Some(4), 2)
        .unwrap()
        .iter()
        .map(|r| r.revision)
        .collect();
    assert_eq!(page, [3, 2]);
}

/// What a commit acknowledged is there for a store opened afterwards, and
/// a refused or empty change leaves no revision behind.
async fn durable_before_the_ok(h: Harness) {
    let acknowledged = {
        let store = h.open();
        for name in ["a", "b", "c"] {
            create(&store, name).unwrap();
        }
        assert!(matches!(
            store.mutate("tester", |c, cat| c.create_model(cat, model("a"))),
            Err(StoreError::Config(ConfigError::AlreadyExists { .. }))
        ));
        store.current()
    };
    let store = h.open();
    let reopened = store.current();
    assert_eq!(reopened.revision, 3);
    assert_eq!(names(&reopened), names(&acknowledged));
    assert_eq!(reopened.models["c"].api_key, "sk-conformance-c-7f3a9c");
    assert_eq!(store.list_revisions(None, 10).unwrap().len(), 3);
    assert_eq!(create(&store, "d").unwrap(), 4);
}

/// A backend commits a revision only on top of the one it holds: a stale
/// or skipping commit is refused and writes nothing.
async fn a_commit_must_follow_the_stored_revision(h: Harness) {
    let store = h.open();
    create(&store, "a").unwrap();
    drop(store);
    let backend = h.backend();
    for wrong in [1, 3] {
        let record = pb::Revision {
            revision: wrong,
            summary: "should not land".into(),
            ..Default::default()
        };
        let refused = backend.commit(Changeset {
            record: &record,
            models: vec![("zz".into(), Some(model("zz")))],
            profiles: Vec::new(),
            attached: None,
        });
        assert!(
            matches!(
                refused,
                Err(StoreError::Conflict {
                    revision,
                    current: 1
                }) if revision == wrong
            ),
            "commit of revision {wrong} on top of 1: {refused:?}"
        );
    }
    assert_eq!(backend.revision().unwrap(), 1);
    let stored = backend.load().unwrap();
    assert_eq!(stored.models.keys().collect::<Vec<_>>(), ["a"]);
    assert!(backend.record(3).unwrap().is_none());
}

/// Every revision reaches every follower once, in order, without a gap,
/// with the configuration it made.
async fn watches_deliver_every_revision_in_order(h: Harness) {
    let (writer, follower) = h.writers();
    let mut events = follower.revision_events();
    let mut config_changes = follower.subscribe();
    for i in 0..30 {
        create(&writer, &format!("w{i}")).unwrap();
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let mut seen = Vec::new();
    while seen.len() < 30 {
        let record = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap_or_else(|_| panic!("revisions seen so far: {seen:?}"))
            .unwrap();
        assert_eq!(record.summary, format!("create model w{}", seen.len()));
        seen.push(record.revision);
    }
    assert_eq!(seen, (1..=30).collect::<Vec<_>>());
    let config = reaches(&follower, 30).await;
    assert_eq!(config.models.len(), 30);
    assert!(config_changes.has_changed().unwrap());
    config_changes.mark_unchanged();
    assert_eq!(config_changes.borrow().revision, 30);
}

/// Tokens: a name is taken once; records replace, delete and list, and
/// another writer sees them. Certificates likewise.
async fn tokens_and_certificates(h: Harness) {
    let (a, b) = h.writers();
    let token = |name: &str, hash: &str| StoredToken {
        token: Some(pb::Token {
            name: name.into(),
            ..Default::default()
        }),
        hash: hash.into(),
    };
    assert!(a.insert_token("ci", &token("ci", "h1")).unwrap());
    assert!(!b.insert_token("ci", &token("ci", "h2")).unwrap());
    assert!(b.insert_token("ops", &token("ops", "h3")).unwrap());
    a.put_token("ops", &token("ops", "h4")).unwrap();
    let mut listed: Vec<(String, String)> = b
        .load_tokens()
        .unwrap()
        .into_iter()
        .map(|t| (t.token.unwrap().name, t.hash))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [("ci".into(), "h1".into()), ("ops".into(), "h4".into())]
    );
    assert!(b.delete_token("ci").unwrap());
    assert!(!a.delete_token("ci").unwrap());
    assert_eq!(a.load_tokens().unwrap().len(), 1);

    let cert = |id: &str| IssuedCert {
        instance_id: id.into(),
        not_after: None,
        grant: None,
    };
    a.put_cert("ab12", &cert("gitlab-1")).unwrap();
    b.put_cert("cd34", &cert("gitlab-2")).unwrap();
    let certs = a.load_certs().unwrap();
    assert_eq!(
        certs,
        [
            ("ab12".to_string(), cert("gitlab-1")),
            ("cd34".to_string(), cert("gitlab-2"))
        ]
    );
    b.delete_cert("ab12").unwrap();
    assert_eq!(a.load_certs().unwrap(), [("cd34".into(), cert("gitlab-2"))]);
}

/// A join token's uses are spent exactly once each, however many writers
/// enroll at the same moment: 5 uses, 16 threads on two writers, 5 wins.
async fn a_join_tokens_uses_are_spent_once(h: Harness) {
    let (a, b) = h.writers();
    let join = StoredToken {
        token: Some(pb::Token {
            name: "join-5".into(),
            uses_left: 5,
            ..Default::default()
        }),
        hash: "h".into(),
    };
    assert!(a.insert_token("join-5", &join).unwrap());
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let store = if t % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || store.spend_token("join-5").unwrap())
        })
        .collect();
    let spent: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let wins: Vec<_> = spent.iter().filter_map(|s| s.as_ref().ok()).collect();
    assert_eq!(wins.len(), 5, "{spent:?}");
    let mut left: Vec<u32> = wins
        .iter()
        .map(|t| {
            t.as_ref()
                .map_or(0, |t| t.token.as_ref().unwrap().uses_left)
        })
        .collect();
    left.sort();
    assert_eq!(
        left,
        [0, 1, 2, 3, 4],
        "each use spent once, the last one deletes"
    );
    assert!(b.load_tokens().unwrap().is_empty());
}

/// Instance records: a batch larger than any one backend write (etcd's
/// transactions of 100, sled's batches of 256), read back whole, the last
/// part's too; a delete is durable.
async fn instance_records(h: Harness) {
    let store = h.open();
    let instances: Vec<pb::Instance> = (0..600)
        .map(|i| pb::Instance {
            instance_id: format!("gitlab-{i:03}"),
            applied_revision: i,
            ..Default::default()
        })
        .collect();
    store.save_instances(&instances).unwrap();
    store.flush().unwrap();
    store.delete_instance("gitlab-007").unwrap();
    drop(store);
    let store = h.open();
    let mut loaded = store.load_instances().unwrap();
    loaded.sort_by(|x, y| x.instance_id.cmp(&y.instance_id));
    assert_eq!(loaded.len(), 599);
    assert!(loaded.iter().all(|i| i.instance_id != "gitlab-007"));
    assert_eq!(loaded[100].instance_id, "gitlab-101");
    assert_eq!(loaded[100].applied_revision, 101);
    assert_eq!(loaded[598].instance_id, "gitlab-599");
    assert_eq!(loaded[598].applied_revision, 599);
    drop(store);
    // Rollout records live beside them (a commit attaches the first), and
    // change only by compare-and-swap: a writer that read an older record
    // writes nothing.
    h.backend()
        .put(Table::Rollouts, "r-1", b"waves open: 1")
        .unwrap();
    let store = h.open();
    assert!(
        !store
            .swap_rollout("r-1", b"waves open: 0", b"paused")
            .unwrap()
    );
    assert!(
        store
            .swap_rollout("r-1", b"waves open: 1", b"waves open: 2")
            .unwrap()
    );
    assert!(
        !store
            .swap_rollout("r-1", b"waves open: 1", b"paused")
            .unwrap()
    );
    assert_eq!(
        store.load_rollouts().unwrap(),
        [("r-1".to_string(), b"waves open: 2".to_vec())]
    );
    drop(store);
    let backend = h.backend();
    assert_eq!(backend.scan(Table::Rollouts).unwrap().len(), 1);
}

/// API keys never reach the backend in plaintext, in the current
/// configuration or in its history; the store opens them again.
async fn secrets_are_sealed_at_rest(h: Harness) {
    let store = h.open();
    create(&store, "a").unwrap();
    let rotated = Model {
        name: "a".into(),
        api_key: "sk-second-secret-91b2".into(),
        ..Default::default()
    };
    store
        .mutate("tester", |c, cat| c.update_model(cat, rotated.clone(), &[]))
        .unwrap();
    store.flush().unwrap();
    drop(store);
    let raw = h.raw_bytes().await;
    assert!(
        raw.windows(b"mixtral".len()).any(|w| w == b"mixtral"),
        "the search reads the stored records"
    );
    for secret in ["sk-conformance-a-7f3a9c", "sk-second-secret-91b2"] {
        assert!(
            !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is stored in plaintext"
        );
    }
    let store = h.open();
    assert_eq!(store.current().models["a"].api_key, "sk-second-secret-91b2");
    assert_eq!(
        store.config_at_revision(1).unwrap().models["a"].api_key,
        "sk-conformance-a-7f3a9c"
    );
}

/// A database behind the revision this data dir acknowledged is refused.
async fn a_database_behind_the_acknowledged_revision_is_refused(h: Harness) {
    drop(h.open());
    std::fs::write(h.high_water(), "9\n").unwrap();
    let refused = Store::open_backend(
        h.backend(),
        Some(&h.high_water()),
        catalog::get(),
        Sealer::new(&KEY, None),
    );
    assert!(matches!(
        refused,
        Err(StoreError::BehindAcknowledged {
            found: 0,
            acknowledged: 9,
            ..
        })
    ));
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::sled().await).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::etcd().await).await;
                }
            )*
        }
    };
}

conformance!(
    revisions_are_atomic_and_never_reused,
    history_and_rollback,
    durable_before_the_ok,
    a_commit_must_follow_the_stored_revision,
    watches_deliver_every_revision_in_order,
    tokens_and_certificates,
    a_join_tokens_uses_are_spent_once,
    instance_records,
    secrets_are_sealed_at_rest,
    a_database_behind_the_acknowledged_revision_is_refused,
);

/// etcd only (one sled database has one writer): a change that loses the
/// race to another replica runs again on that replica's revision, and
/// both writes land; the caller never hears of the race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_a_change_that_loses_a_race_runs_again() {
    let h = Harness::etcd().await;
    let (a, b) = h.writers();
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (paused_tx, paused_rx) = std::sync::mpsc::channel::<()>();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let writer = {
        let (a, runs) = (a.clone(), runs.clone());
        std::thread::spawn(move || {
            a.mutate("slow", |c, cat| {
                // The first run waits while the other replica commits.
                if runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    paused_tx.send(()).unwrap();
                    go_rx.lock().unwrap().recv().unwrap();
                }
                c.create_model(cat, model("slow"))
            })
        })
    };
    paused_rx.recv().unwrap();
    assert_eq!(create(&b, "fast").unwrap(), 1);
    go_tx.send(()).unwrap();
    let commit = writer.join().unwrap().expect("the slow change lands");
    assert_eq!(commit.revision.unwrap().revision, 2);
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "run again once"
    );
    let config = reaches(&b, 2).await;
    assert_eq!(names(&config), ["fast", "slow"]);
}
