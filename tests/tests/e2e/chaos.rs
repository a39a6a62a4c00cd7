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
                            ..Default::default()
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
                ..Default::default()
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
        ..Default::default()
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

/// One anonymous connection from `from` to `to`: the HTTP/2 preface and
/// an empty SETTINGS frame, then nothing that authenticates.
async fn anonymous(from: &str, to: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    let mut stream = socket.connect(to).await?;
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await?;
    Ok(stream)
}

/// Anonymous clients from other addresses flood the gRPC port: one opens
/// connections as fast as it can and holds them, another keeps its own
/// busy with PINGs, a third trickles a byte at a time. An admin call
/// still answers within a second, each time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_call_gets_through_an_anonymous_flood() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let options = duofleet_tests::DaemonOptions {
        args: vec!["--max-connections".into(), "64".into()],
        ..Default::default()
    };
    let daemon = Daemon::start_with(&dir.path().join("data"), options);
    let target: std::net::SocketAddr = daemon.grpc_addr.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for _ in 0..2 {
        let (stop, opened) = (stop.clone(), opened.clone());
        attackers.push(tokio::spawn(async move {
            let mut held = std::collections::VecDeque::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(stream) = anonymous("127.0.0.2", target).await {
                    opened.fetch_add(1, Ordering::Relaxed);
                    held.push_back(stream);
                }
                if held.len() > 400 {
                    held.pop_front();
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    let stop_pinger = stop.clone();
    attackers.push(tokio::spawn(async move {
        let mut streams = Vec::new();
        for _ in 0..32 {
            streams.extend(anonymous("127.0.0.3", target).await.ok());
        }
        let mut n = 0u8;
        while !stop_pinger.load(Ordering::Relaxed) {
            n = n.wrapping_add(1);
            let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n];
            for stream in &mut streams {
                let _ = stream.write_all(&ping).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }));
    let stop_trickler = stop.clone();
    attackers.push(tokio::spawn(async move {
        let mut streams = Vec::new();
        for _ in 0..32 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.4:0".parse().unwrap()).unwrap();
            streams.extend(socket.connect(target).await.ok());
        }
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        for byte in preface.iter().cycle() {
            if stop_trickler.load(Ordering::Relaxed) {
                break;
            }
            for stream in &mut streams {
                let _ = stream.write_all(&[*byte]).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }));
    // The flood has taken every slot once the daemon starts evicting.
    duofleet_tests::wait_for(crate::WAIT, || {
        daemon
            .log()
            .contains("every connection slot is taken")
            .then_some(())
    })
    .await;

    let mut answered = Vec::new();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let call = async {
            let mut c = daemon.clients().await;
            c.models.list_models(ListModelsRequest {}).await
        };
        let result = tokio::time::timeout(Duration::from_secs(10), call).await;
        let took = started.elapsed();
        assert!(
            matches!(result, Ok(Ok(_))),
            "the admin call failed under the flood after {took:?}: {result:?}"
        );
        answered.push(took);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        attacker.await.unwrap();
    }
    eprintln!(
        "anonymous flood: {} connections opened; admin calls answered in {answered:?}",
        opened.load(Ordering::Relaxed)
    );
    // Starved, a call waits out its 10 s timeout. Answered, it takes
    // milliseconds, or a second when its SYN meets a full accept queue and
    // is sent again (the kernel waits 1 s, then 3 s more): a bound well
    // between the two, so a loaded machine does not fail the test.
    for took in &answered {
        assert!(*took < Duration::from_secs(5), "{answered:?}");
    }
}

/// A network partition between the agents and the control plane, through
/// a TCP proxy the test controls (packets dropped, not connections reset).
/// During it: the control plane shows the agents OFFLINE, they keep their
/// last-known-good configuration (also across an agent restart) and run no
/// reconfigure. After it: each converges on what changed meanwhile, with
/// one reconfigure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_keep_their_configuration_through_a_partition_and_converge_after() {
    use crate::agents::{ENV_HASH_RB, args, linux_agent, set_gateway};
    use duofleet_proto::v1::SyncState;
    use duofleet_tests::proxy::Proxy;
    let dir = tempfile::tempdir().unwrap();
    let options = duofleet_tests::DaemonOptions {
        args: args(&["--keepalive-ms", "500"]),
        ..Default::default()
    };
    let daemon = Daemon::start_with(&dir.path().join("data"), options);
    let mut c = daemon.clients().await;
    let proxy = Proxy::start(&daemon.grpc_addr).await;
    let via_proxy = format!("http://{}", proxy.addr);
    let ids = ["gitlab-a", "gitlab-b", "gitlab-c"];
    let mut agents = Vec::new();
    for id in ids {
        let extra = ["--control-plane", &via_proxy, "--keepalive", "500ms"];
        agents.push(linux_agent(&daemon, dir.path(), id, ENV_HASH_RB, &extra));
    }
    let mut last = set_gateway(&mut c, "default", "https://aigw-0.example.com").await;
    for id in ids {
        crate::wait_synced(&mut c, id, last).await;
    }
    let mut reconfigures = 1;
    let partitions = (rounds() / 4).max(1);
    for round in 1..=partitions {
        let before = format!(
            "'AI_GATEWAY_URL' => 'https://aigw-{}.example.com',",
            round - 1
        );
        proxy.partition();
        for id in ids {
            let offline = crate::wait_instance(&mut c, id, "offline", |i| {
                i.sync_state() == SyncState::Offline
            })
            .await;
            assert_eq!(offline.applied_revision, last);
        }
        last = set_gateway(
            &mut c,
            "default",
            &format!("https://aigw-{round}.example.com"),
        )
        .await;
        // One agent restarts while it cannot reach the control plane.
        let (agent, _, _) = &mut agents[round % ids.len()];
        agent.kill9();
        agent.restart();
        // Several keepalive and backoff periods pass.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for (agent, ctl, rb) in &agents {
            let text = std::fs::read_to_string(rb).unwrap();
            assert!(text.contains(&before), "{}: {text}", agent.instance_id);
            assert_eq!(ctl.calls().len(), reconfigures, "{}", agent.instance_id);
        }

        proxy.heal();
        reconfigures += 1;
        let after = format!("'AI_GATEWAY_URL' => 'https://aigw-{round}.example.com',");
        for (agent, ctl, rb) in &agents {
            crate::wait_synced(&mut c, &agent.instance_id, last).await;
            let text = std::fs::read_to_string(rb).unwrap();
            assert!(text.contains(&after), "{}: {text}", agent.instance_id);
            assert_eq!(ctl.calls().len(), reconfigures, "{}", agent.instance_id);
        }
    }
    eprintln!(
        "partition: {partitions} partitions of {} agents, each kept its configuration and converged after",
        ids.len()
    );
}

/// One agent stops reading (SIGSTOP) while the configuration changes again
/// and again: the others are not held up. Measured: the time from each
/// change to all other agents SYNCED, with every agent reading and with
/// one stalled. The figures are printed; the assertions are that every
/// live agent applies every change while the stalled one holds its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_reading_does_not_delay_the_others() {
    use crate::agents::{ENV_HASH_RB, linux_agent, set_gateway};
    use duofleet_proto::v1::SyncState;
    let (dir, daemon) = crate::fresh_daemon();
    let mut c = daemon.clients().await;
    let live_ids: Vec<String> = (0..4).map(|i| format!("live-{i}")).collect();
    let mut live = Vec::new();
    for id in &live_ids {
        live.push(linux_agent(&daemon, dir.path(), id, ENV_HASH_RB, &[]));
    }
    let (stalled, _, stalled_rb) = linux_agent(&daemon, dir.path(), "stalled", ENV_HASH_RB, &[]);
    crate::wait_synced(&mut c, "stalled", 0).await;
    let changes = 8 * rounds();
    let measure = async |c: &mut duofleet_tests::Clients, label: &str| {
        let mut took = Vec::new();
        let mut revision = 0;
        for n in 0..changes {
            let url = format!("https://aigw-{label}-{n}.example.com");
            let started = std::time::Instant::now();
            revision = set_gateway(c, "default", &url).await;
            let deadline = started + crate::WAIT;
            loop {
                let instances = crate::list_instances(c).await;
                let synced = instances
                    .iter()
                    .filter(|i| live_ids.contains(&i.instance_id))
                    .filter(|i| {
                        i.sync_state() == SyncState::Synced && i.applied_revision == revision
                    })
                    .count();
                if synced == live_ids.len() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{label}: change {n} not applied by every live agent"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            took.push(started.elapsed());
        }
        took.sort();
        (took[took.len() / 2], took[took.len() - 1], revision)
    };
    let baseline = measure(&mut c, "all-reading").await;
    crate::wait_synced(&mut c, "stalled", baseline.2).await;
    let before = std::fs::read_to_string(&stalled_rb).unwrap();
    stalled.signal("STOP");
    let with_stall = measure(&mut c, "one-stalled").await;
    // The stalled agent got none of it.
    assert_eq!(std::fs::read_to_string(&stalled_rb).unwrap(), before);
    stalled.signal("CONT");
    eprintln!(
        "stalled reader: {changes} changes to {} live agents; to all SYNCED p50 / max: {:?} / {:?} with every agent reading, {:?} / {:?} with one stalled",
        live_ids.len(),
        baseline.0,
        baseline.1,
        with_stall.0,
        with_stall.1
    );
}
