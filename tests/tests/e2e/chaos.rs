//! Chaos: the daemon is killed with SIGKILL again and again while 20
//! writers hammer it. Every write it acknowledged must survive, under the
//! revision it was acknowledged with, and no revision number is ever used
//! twice. CI runs a few rounds (`DUOFLEET_CHAOS_ROUNDS`, default 8); the
//! README has the figures of a 100-round run.

use duofleet_proto::v1::{CreateModelRequest, GetRevisionRequest, ListModelsRequest};
use duofleet_tests::{Daemon, mk};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const WRITERS: usize = 20;

fn rounds() -> usize {
    std::env::var("DUOFLEET_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_concurrent_writers_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // model name -> the revision its CreateModel answered with.
    let acknowledged: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let mut refused_or_lost = 0usize;
    for round in 0..rounds() {
        let daemon = Daemon::start(&data);
        let mut writers = Vec::new();
        for writer in 0..WRITERS {
            let mut c = daemon.clients().await;
            let acknowledged = acknowledged.clone();
            writers.push(tokio::spawn(async move {
                let mut failures = 0;
                for n in 0.. {
                    let name = format!("r{round}-w{writer}-{n}");
                    match c
                        .models
                        .create_model(CreateModelRequest {
                            model: Some(mk::model(&name)),
                        })
                        .await
                    {
                        Ok(model) => {
                            acknowledged
                                .lock()
                                .unwrap()
                                .insert(name, model.into_inner().revision);
                        }
                        // The daemon is gone: this writer's round is over.
                        Err(_) => {
                            failures += 1;
                            break;
                        }
                    }
                }
                failures
            }));
        }
        // Let them write for a while, then pull the plug.
        let pause = 40 + (round * 37) % 200;
        tokio::time::sleep(Duration::from_millis(pause as u64)).await;
        daemon.kill9();
        for writer in writers {
            refused_or_lost += writer.await.unwrap();
        }
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() >= rounds(),
        "too few writes to mean anything: {}",
        acknowledged.len()
    );

    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    let stored: BTreeMap<String, u64> = c
        .models
        .list_models(ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| (m.name, m.revision))
        .collect();
    let mut lost = Vec::new();
    for (name, revision) in &acknowledged {
        match stored.get(name) {
            Some(stored) if stored == revision => {}
            other => lost.push(format!(
                "{name}: acknowledged at {revision}, stored {other:?}"
            )),
        }
        // The acknowledged revision is this write's, not a reused number.
        let record = c
            .history
            .get_revision(GetRevisionRequest {
                revision: *revision,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            record.summary,
            format!("create model {name}"),
            "revision {revision}"
        );
    }
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let mut numbers: Vec<u64> = acknowledged.values().copied().collect();
    numbers.sort();
    numbers.dedup();
    assert_eq!(
        numbers.len(),
        acknowledged.len(),
        "a revision number was used twice"
    );
    eprintln!(
        "chaos: {} rounds, {} acknowledged writes, {} writes cut off by the kill, all kept",
        rounds(),
        acknowledged.len(),
        refused_or_lost
    );
}
