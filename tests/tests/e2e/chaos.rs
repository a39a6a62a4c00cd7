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

/// Agents killed with SIGKILL at random points of an apply: gitlab.rb is
/// valid Ruby after every kill, and the agent converges on the newest
/// configuration once it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agents_mid_apply_keeps_gitlab_rb_valid_and_converges() {
    use duofleet_proto::v1::{Profile, UpdateProfileRequest};
    use duofleet_tests::agent::{Agent, FakeCommand};
    let (dir, daemon) = crate::fresh_daemon();
    let mut c = daemon.clients().await;
    let ctl = FakeCommand::new(&dir.path().join("ctl"));
    let rb = dir.path().join("gitlab.rb");
    std::fs::write(
        &rb,
        "external_url 'https://gitlab.example.com'\ngitlab_rails['env'] = {\n  'http_proxy' => 'http://proxy:3128',\n}\n",
    )
    .unwrap();
    let args: Vec<String> = [
        "--gitlab-rb",
        &rb.display().to_string(),
        "--reconfigure-command",
        &ctl.command("reconfigure"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent = Agent::start(&daemon, "gitlab-a", dir.path(), &args);
    ctl.set_sleep(Some(1));
    let syntax_ok = |text: &str| {
        let out = std::process::Command::new("ruby")
            .args(["-c", &rb.display().to_string()])
            .output()
            .expect("ruby");
        assert!(
            out.status.success(),
            "gitlab.rb is not valid Ruby after a kill:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut last = 0;
    for round in 0..rounds() {
        last = c
            .profiles
            .update_profile(UpdateProfileRequest {
                profile: Some(Profile {
                    name: "default".into(),
                    ai_gateway_url: format!("https://aigw-{round}.example.com"),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["ai_gateway_url".into()],
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .revision;
        let calls = ctl.calls().len();
        let deadline = std::time::Instant::now() + crate::WAIT;
        while ctl.calls().len() == calls {
            assert!(
                std::time::Instant::now() < deadline,
                "no reconfigure started"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis((round as u64 * 131) % 900)).await;
        agent.kill9();
        syntax_ok(&std::fs::read_to_string(&rb).unwrap());
        agent.restart();
    }
    ctl.set_sleep(None);
    crate::wait_synced(&mut c, "gitlab-a", last).await;
    let text = std::fs::read_to_string(&rb).unwrap();
    syntax_ok(&text);
    assert!(
        text.contains(&format!(
            "'AI_GATEWAY_URL' => 'https://aigw-{}.example.com',",
            rounds() - 1
        )),
        "{text}"
    );
}

/// A tmpfs mounted for one test, unmounted (lazily) when dropped.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &std::path::Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(at).unwrap();
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(at.to_path_buf())
    }

    /// Writes `path` until the file system refuses with ENOSPC.
    fn fill(&self, path: &std::path::Path) {
        use std::io::Write;
        let mut file = std::fs::File::create(path).unwrap();
        for chunk in [1 << 16, 1 << 12, 1] {
            let bytes = vec![0xa5u8; chunk];
            loop {
                match file.write_all(&bytes) {
                    Ok(()) => continue,
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(28), "filling {path:?}: {e}");
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The data dir's file system fills up: writes answer RESOURCE_EXHAUSTED
/// and change nothing, `/readyz` says so, and once space is freed the next
/// write succeeds without a restart. Nothing acknowledged is lost, and
/// nothing refused appears later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_recovers_without_a_restart() {
    use duofleet_tests::http_get;
    use tonic::Code;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let fs = SmallFs::mount(&data, "8m");
    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    let create = |name: String| CreateModelRequest {
        model: Some(mk::model(&name)),
    };
    let mut acknowledged = BTreeMap::new();
    for n in 0..5 {
        let name = format!("before-{n}");
        let r = c.models.create_model(create(name.clone())).await.unwrap();
        acknowledged.insert(name, r.into_inner().revision);
    }

    let filler = data.join("filler");
    fs.fill(&filler);
    let mut refused = Vec::new();
    for n in 0..200 {
        let name = format!("full-{n}");
        match c.models.create_model(create(name.clone())).await {
            // sled may still have room in space it holds already.
            Ok(r) => {
                acknowledged.insert(name, r.into_inner().revision);
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("disk full"), "{status:?}");
                refused.push(name);
                if refused.len() == 3 {
                    break;
                }
            }
        }
    }
    assert_eq!(refused.len(), 3, "the full disk never refused a write");
    let (code, body) = http_get(&daemon.http_addr, "/readyz");
    assert_eq!(code, 503, "/readyz on a full disk: {body}");
    assert_eq!(http_get(&daemon.http_addr, "/healthz").0, 200);

    std::fs::remove_file(&filler).unwrap();
    // The very next write succeeds: no restart, no waiting.
    let r = c
        .models
        .create_model(create("after".into()))
        .await
        .expect("the first write after space was freed");
    acknowledged.insert("after".into(), r.into_inner().revision);
    assert_eq!(http_get(&daemon.http_addr, "/readyz").0, 200);
    assert!(
        daemon.log().contains("storage recovered"),
        "{}",
        daemon.log()
    );

    // After a hard restart: every acknowledged write under its revision,
    // nothing refused, and revision numbers without gaps or reuse.
    daemon.kill9();
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
    assert_eq!(stored, acknowledged);
    let newest = *acknowledged.values().max().unwrap();
    for revision in 1..=newest {
        let record = c
            .history
            .get_revision(GetRevisionRequest { revision })
            .await
            .unwrap()
            .into_inner();
        let name = record
            .summary
            .strip_prefix("create model ")
            .unwrap()
            .to_string();
        assert_eq!(acknowledged.get(&name), Some(&revision), "{record:?}");
    }
    drop(daemon);
    drop(fs);
}
