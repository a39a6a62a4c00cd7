//! Fan-out benchmark: N simulated agents, each on its own TCP connection
//! with automatic acks, against a real duofleetd on a temp data dir.
//!
//! 1. All N connect at once; the daemon's RSS per connected agent.
//! 2. M changes to the default profile; per change, the time from the RPC's
//!    OK (and from the request) to the last agent's ack.
//! 3. Health-report fan-in: every agent sends K reports (unchanged
//!    heartbeats, then flapping ones); reports per second the daemon takes in.
//! 4. Reconnect storm: the daemon restarts (SIGTERM, start on the same data
//!    dir and port); the time until all N are back and SYNCED, and how many
//!    configurations were sent again (must be none).
//! 5. With `--etcd`: the same N subscribers as etcd watches on one key
//!    (Debian's etcd-server, started here), M puts, the time from each put's
//!    OK to the last watcher's event, and the ratio duofleet/etcd.
//! 6. With `--raw`: the floor, the same N subscribers and M changes over
//!    plain TCP with tokio and nothing else (`raw.rs`).
//!
//!   cargo run --release -p duofleet-tests --bin fanout -- --agents 10000 --changes 20 --etcd --raw
//!
//! `--hold S` keeps the daemon up for S seconds after the health flood and
//! prints its pid: where the memory of a connected fleet goes can be read
//! then (`heaptrack` on the daemon, `gdb` on the pid).
//!
//! Prints one JSON object per line, then a table. Not part of the timed
//! test suite: a small-N smoke run of it is (it must not rot).

mod etcd;
mod fleet;
mod interleave;
mod raw;
mod wire;

use duofleet_proto::v1::{DesiredConfig, Profile, UpdateProfileRequest};
use duofleet_tests::{Clients, Daemon, DaemonOptions, rss_kib};
use fleet::{Fleet, HealthRound};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Changes start at least this far apart (from one request to the next).
/// Between an operator's changes a fleet's connections are idle, and Linux
/// then acknowledges each arriving message with a packet of its own (a
/// connection quiet for longer than its 200 ms minimum retransmit timeout
/// is in "quick ack" mode); changes closer together than that have those
/// acknowledgements ride on the replies instead, which costs both ends
/// about a fifth less. Back to back, a run whose changes take a little
/// under 200 ms is cheaper per change than one whose changes take a
/// little over, and the figures of one system swung by that much from run
/// to run. Paced, every change meets idle connections, as in production,
/// for duofleet, etcd and the floor alike.
pub const PACE: Duration = Duration::from_millis(400);

/// However slow the machine, a phase that takes this long has failed.
pub const PHASE_LIMIT: Duration = Duration::from_secs(300);

struct Options {
    agents: usize,
    changes: usize,
    health_reports: usize,
    etcd: bool,
    raw: bool,
    /// The daemon keeps its store in etcd (`--store etcd`), not sled.
    store_etcd: bool,
    /// Agents (and etcd watchers) per TCP connection.
    per_connection: usize,
    /// Seconds to keep the daemon up after the health flood, its pid
    /// printed, so that its heap can be looked at (heaptrack, gdb).
    hold_secs: u64,
    /// Only the changes, duofleet, etcd and the floor taking turns
    /// (`interleave.rs`).
    interleave: bool,
    /// This process is one column of an interleaved run.
    column: Option<interleave::Column>,
}

fn options() -> Options {
    let mut o = Options {
        agents: 100,
        changes: 10,
        health_reports: 10,
        etcd: false,
        raw: false,
        store_etcd: false,
        per_connection: 1,
        hold_secs: 0,
        interleave: false,
        column: None,
    };
    let usage = "use --agents N --changes M [--health-reports K] [--streams-per-connection S] [--etcd] [--raw] [--store-etcd] [--hold SECONDS] [--interleave]";
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--etcd" {
            o.etcd = true;
            continue;
        }
        if arg == "--raw" {
            o.raw = true;
            continue;
        }
        if arg == "--store-etcd" {
            o.store_etcd = true;
            continue;
        }
        if arg == "--interleave" {
            o.interleave = true;
            continue;
        }
        if arg == "--column" {
            o.column = args.next().as_deref().and_then(interleave::Column::parse);
            if o.column.is_none() {
                eprintln!("fanout: --column takes duofleet, etcd or floor");
                std::process::exit(2);
            }
            continue;
        }
        let value = args.next().and_then(|v| v.parse::<usize>().ok());
        match (arg.as_str(), value) {
            ("--agents", Some(n)) if n > 0 => o.agents = n,
            ("--changes", Some(n)) if n > 0 => o.changes = n,
            ("--health-reports", Some(n)) => o.health_reports = n,
            ("--streams-per-connection", Some(n)) if n > 0 => o.per_connection = n,
            ("--hold", Some(n)) => o.hold_secs = n as u64,
            (other, _) => {
                eprintln!("fanout: unknown, incomplete or zero argument {other:?}; {usage}");
                std::process::exit(2);
            }
        }
    }
    o
}

/// Re-runs this program under a raised open-file limit (one socket per
/// agent, on both ends; the daemon and etcd inherit it).
fn raise_nofile() {
    if std::env::var_os("DUOFLEET_FANOUT_NOFILE").is_some() {
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$0" "$@""#)
        .arg(exe)
        .args(std::env::args().skip(1))
        .env("DUOFLEET_FANOUT_NOFILE", "1")
        .status()
        .expect("re-exec");
    std::process::exit(status.code().unwrap_or(1));
}

/// CPU time a process has used (user + system), in milliseconds.
pub fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: utime and
    // stime are the 12th and 13th, in clock ticks (100 per second here).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let ticks: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    ticks.iter().sum::<f64>() * 10.0
}

/// When each revision reached each subscriber (agent or etcd watcher).
pub struct Arrivals {
    /// How many subscribers there are.
    subscribers: usize,
    /// revision -> (arrivals so far, time of the last one)
    by_revision: Mutex<HashMap<u64, (usize, Instant)>>,
    /// Told when a revision has reached every subscriber.
    progress: Notify,
}

impl Arrivals {
    pub fn new(subscribers: usize) -> Arrivals {
        Arrivals {
            subscribers,
            by_revision: Mutex::default(),
            progress: Notify::new(),
        }
    }

    pub fn record(&self, revision: u64) {
        let now = Instant::now();
        let mut by_revision = self.by_revision.lock().unwrap();
        let entry = by_revision.entry(revision).or_insert((0, now));
        entry.0 += 1;
        entry.1 = now;
        let all = entry.0 == self.subscribers;
        drop(by_revision);
        if all {
            self.progress.notify_waiters();
        }
    }

    /// When the last subscriber received `revision`.
    async fn all(&self, revision: u64) -> Instant {
        let count = self.subscribers;
        let deadline = Instant::now() + PHASE_LIMIT;
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some((n, at)) = self.by_revision.lock().unwrap().get(&revision).copied()
                && n >= count
            {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "revision {revision} reached too few subscribers"
            );
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        }
    }
}

/// The changes' deliveries to every subscriber, and the server's cost.
pub struct Deliveries {
    from_ok: Spread,
    from_request: Spread,
    /// The change's answer (the RPC's OK), from the request.
    answered: Spread,
    /// Changes answered only after every subscriber had them.
    answered_after: usize,
    cpu_ms_per_change: f64,
    /// The bench's own CPU meanwhile: the subscribers' side, which shares
    /// the machine's cores with the server.
    client_cpu_ms_per_change: f64,
}

/// One change, and when it reached every subscriber.
pub struct Delivery {
    pub revision: u64,
    /// From the change's OK to the last subscriber's ack.
    pub ms: f64,
    /// The same from the request.
    pub request_ms: f64,
    /// The OK itself, from the request.
    pub ok_ms: f64,
    /// The OK came only after every subscriber had the change.
    pub late: bool,
}

/// Makes one change through `change` (which answers the revision it
/// made) and waits until every subscriber of `arrivals` has it.
pub async fn one_change(arrivals: &Arrivals, change: impl Future<Output = u64>) -> Delivery {
    let sent_at = Instant::now();
    let revision = change.await;
    let ok_at = Instant::now();
    let last = arrivals.all(revision).await;
    let since = |at: Instant| last.saturating_duration_since(at).as_secs_f64() * 1000.0;
    Delivery {
        revision,
        ms: since(ok_at),
        request_ms: since(sent_at),
        ok_ms: ok_at.duration_since(sent_at).as_secs_f64() * 1000.0,
        late: last < ok_at,
    }
}

/// Makes `count` changes one after the other through `change` (which
/// answers the revision it made), waits each time until all `subscribers`
/// have it, and prints a `metric` line per change.
async fn deliver(
    metric: &str,
    who: &str,
    arrivals: &Arrivals,
    subscribers: usize,
    count: usize,
    server_pid: u32,
    mut change: impl AsyncFnMut(usize) -> u64,
) -> Deliveries {
    let cpu_before = cpu_ms(server_pid);
    let clients_before = cpu_ms(std::process::id());
    let (mut from_ok, mut from_request, mut answered) = (Vec::new(), Vec::new(), Vec::new());
    let mut answered_after = 0;
    for n in 1..=count {
        let sent_at = Instant::now();
        let d = one_change(arrivals, change(n)).await;
        let (revision, ms, request_ms, ok_ms) = (d.revision, d.ms, d.request_ms, d.ok_ms);
        println!(
            r#"{{"metric":"{metric}","change":{n},"revision":{revision},"{who}":{subscribers},"ms":{ms:.3},"from_request_ms":{request_ms:.3},"ok_ms":{ok_ms:.3}}}"#
        );
        from_ok.push(ms);
        from_request.push(request_ms);
        answered.push(ok_ms);
        answered_after += usize::from(d.late);
        tokio::time::sleep_until((sent_at + PACE).into()).await;
    }
    Deliveries {
        from_ok: spread(from_ok),
        from_request: spread(from_request),
        answered: spread(answered),
        answered_after,
        cpu_ms_per_change: (cpu_ms(server_pid) - cpu_before) / count as f64,
        client_cpu_ms_per_change: (cpu_ms(std::process::id()) - clients_before) / count as f64,
    }
}

#[derive(Clone, Copy)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn spread(mut values: Vec<f64>) -> Spread {
    values.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        let rank = ((p / 100.0) * values.len() as f64).ceil().max(1.0) as usize;
        values
            .get(rank.min(values.len()) - 1)
            .copied()
            .unwrap_or(0.0)
    };
    Spread {
        p50: at(50.0),
        p99: at(99.0),
        max: values.last().copied().unwrap_or(0.0),
    }
}

/// The payload both systems deliver: the agent's DesiredConfig.
pub fn desired(change: usize) -> DesiredConfig {
    DesiredConfig {
        revision: change as u64,
        profile: "default".into(),
        ai_gateway_url: gateway(change),
        ..Default::default()
    }
}

fn gateway(change: usize) -> String {
    format!("https://aigw-{change}.example.com")
}

/// A daemon with room for `n` agents.
pub fn daemon_options(n: usize) -> DaemonOptions {
    DaemonOptions {
        args: vec![
            "--max-agents".into(),
            (n + 10).to_string(),
            "--max-connections".into(),
            (n + 100).to_string(),
        ],
        ..Default::default()
    }
}

/// `n` simulated agents on `daemon`, all connected and SYNCED when this
/// returns.
pub async fn connect_fleet(daemon: &Daemon, n: usize, per_connection: usize) -> Fleet {
    let token = std::fs::read_to_string(daemon.data_dir().join("enroll.token"))
        .unwrap()
        .trim()
        .to_string();
    let fleet = Fleet::start(&daemon.grpc_addr, &token, n, per_connection);
    wait_synced(daemon, n, "all agents connected").await;
    fleet
}

/// Waits until `n` agents are connected to `daemon` and SYNCED.
async fn wait_synced(daemon: &Daemon, n: usize, what: &str) {
    wait_metrics(
        &daemon.http_addr,
        &[
            ("duofleet_agents_connected", n as f64),
            ("duofleet_instances{sync_state=\"synced\"}", n as f64),
        ],
        what,
    )
    .await;
}

/// Change `change` as an operator makes it: the default profile's AI
/// gateway; the revision it made.
pub async fn update_default(operator: &mut Clients, change: usize) -> u64 {
    operator
        .profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: gateway(change),
                ..Default::default()
            }),
            update_mask: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

/// Debian's etcd on a temp dir, or the bench ends saying why not.
pub async fn start_etcd() -> etcd::Etcd {
    etcd::Etcd::start().await.unwrap_or_else(|e| {
        eprintln!("fanout: {e}");
        std::process::exit(1);
    })
}

/// The daemon's /metrics page.
async fn scrape(http_addr: &str) -> String {
    let addr = http_addr.to_string();
    tokio::task::spawn_blocking(move || duofleet_tests::http_get(&addr, "/metrics").1)
        .await
        .unwrap()
}

/// Writes the etcd behind an etcd-backed daemon has committed so far
/// (raft proposals: one per transaction or put).
async fn etcd_writes(store: &Option<etcd::Etcd>) -> f64 {
    let Some(etcd) = store else { return 0.0 };
    let addr = etcd.url().trim_start_matches("http://").to_string();
    let page = scrape(&addr).await;
    sample(&page, "etcd_server_proposals_committed_total")
}

/// One series of a /metrics page (0 when absent).
fn sample(page: &str, series: &str) -> f64 {
    duofleet_tests::metric(page, series).unwrap_or(0.0)
}

/// The daemon's commits between two /metrics pages, from its
/// `duofleet_commit_seconds` histogram: the slow ones say whether a late
/// change waited on the disk.
struct Commits {
    count: f64,
    mean_ms: f64,
    /// Over 100, 250 and 500 ms.
    over: [f64; 3],
}

impl Commits {
    fn between(before: &str, after: &str) -> Commits {
        let delta = |series: &str| sample(after, series) - sample(before, series);
        let count = delta("duofleet_commit_seconds_count");
        let sum = delta("duofleet_commit_seconds_sum");
        let over = ["0.1", "0.25", "0.5"]
            .map(|le| count - delta(&format!("duofleet_commit_seconds_bucket{{le=\"{le}\"}}")));
        Commits {
            count,
            mean_ms: if count > 0.0 {
                sum * 1000.0 / count
            } else {
                0.0
            },
            over,
        }
    }
}

/// Acks of every result.
fn acks(page: &str) -> f64 {
    ["applied", "unchanged", "failed"]
        .iter()
        .map(|result| sample(page, &format!("duofleet_acks_total{{result=\"{result}\"}}")))
        .sum()
}

/// Waits until every series of /metrics reaches its value.
async fn wait_metrics(http_addr: &str, wanted: &[(&str, f64)], what: &str) {
    let deadline = Instant::now() + PHASE_LIMIT;
    loop {
        let page = scrape(http_addr).await;
        if wanted
            .iter()
            .all(|(series, value)| sample(&page, series) >= *value)
        {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not reached in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `a / b` for a JSON line; JSON has no infinity, so a ratio over zero is
/// null.
fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.3}", a / b)
    } else {
        "null".to_string()
    }
}

/// A row of the closing table: figure, duofleet, etcd, the floor.
pub type Row = (String, String, String, String);

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--raw-serve") {
        raw::serve();
        return;
    }
    raise_nofile();
    let o = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match o.column {
        Some(column) => runtime.block_on(interleave::child(column, &o)),
        None if o.interleave => runtime.block_on(interleave::run(&o)),
        None => runtime.block_on(run(o)),
    }
}

async fn run(o: Options) {
    let n = o.agents;
    let mut rows: Vec<Row> = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut options = daemon_options(n);
    // The daemon's own store in etcd, apart from the etcd it is compared with.
    let store_etcd = match o.store_etcd {
        false => None,
        true => Some(start_etcd().await),
    };
    if let Some(etcd) = &store_etcd {
        options.args.extend([
            "--store".into(),
            "etcd".into(),
            "--etcd-endpoints".into(),
            etcd.url().to_string(),
        ]);
    }
    let mut etcd_writes_at = vec![("start", etcd_writes(&store_etcd).await)];
    let daemon = tokio::task::block_in_place(|| Daemon::start_with(&data, options.clone()));
    let mut operator = daemon.clients().await;

    // 1. Connect.
    let rss_before = rss_kib(daemon.pid());
    let started = Instant::now();
    let fleet = connect_fleet(&daemon, n, o.per_connection).await;
    let connect_secs = started.elapsed().as_secs_f64();
    if store_etcd.is_some() {
        // New instances are saved at the next 500 ms save.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    etcd_writes_at.push(("connect", etcd_writes(&store_etcd).await));
    let rss_after = rss_kib(daemon.pid());
    let per_agent_kib = rss_after.saturating_sub(rss_before) as f64 / n as f64;
    println!(r#"{{"metric":"connect_all","agents":{n},"seconds":{connect_secs:.3}}}"#);
    println!(
        r#"{{"metric":"rss_per_agent_kib","agents":{n},"value":{per_agent_kib:.1},"rss_before_kib":{rss_before},"rss_after_kib":{rss_after}}}"#
    );
    rows.push((
        format!("{n} subscribers connect"),
        format!("{connect_secs:.2} s (all at once)"),
        String::new(),
        String::new(),
    ));

    // 2. Changes.
    let commits_before = scrape(&daemon.http_addr).await;
    let ours = deliver(
        "change_to_all_acked",
        "agents",
        &fleet.counters.arrivals,
        n,
        o.changes,
        daemon.pid(),
        async |change| update_default(&mut operator, change).await,
    )
    .await;
    let commits = Commits::between(&commits_before, &scrape(&daemon.http_addr).await);
    println!(
        r#"{{"metric":"commits","changes":{},"mean_ms":{:.1},"over_100ms":{},"over_250ms":{},"over_500ms":{}}}"#,
        commits.count, commits.mean_ms, commits.over[0], commits.over[1], commits.over[2]
    );
    rows.push((
        "revisions made durable (the store's commit and high-water mark): mean, and how many took over 100 / 250 / 500 ms".into(),
        format!(
            "{:.1} ms; {} / {} / {} of {}",
            commits.mean_ms, commits.over[0], commits.over[1], commits.over[2], commits.count
        ),
        String::new(),
        String::new(),
    ));
    println!(
        r#"{{"metric":"summary","agents":{n},"changes":{},"p50_ms":{:.3},"p99_ms":{:.3},"max_ms":{:.3},"from_request_p50_ms":{:.3},"from_request_p99_ms":{:.3},"rss_per_agent_kib":{per_agent_kib:.1},"daemon_cpu_ms_per_change":{:.1},"client_cpu_ms_per_change":{:.1}}}"#,
        o.changes,
        ours.from_ok.p50,
        ours.from_ok.p99,
        ours.from_ok.max,
        ours.from_request.p50,
        ours.from_request.p99,
        ours.cpu_ms_per_change,
        ours.client_cpu_ms_per_change
    );
    let latest = o.changes as f64;
    wait_metrics(
        &daemon.http_addr,
        &[
            ("duofleet_instances{sync_state=\"synced\"}", n as f64),
            ("duofleet_acks_total{result=\"applied\"}", latest * n as f64),
        ],
        "every ack taken in",
    )
    .await;
    // Acks are saved as state changes: at the next 500 ms save.
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd_writes_at.push(("changes", etcd_writes(&store_etcd).await));

    // 3. Health-report fan-in.
    for flapping in [false, true] {
        let mode = if flapping { "flapping" } else { "steady" };
        let total = (n * o.health_reports) as f64;
        let before = sample(
            &scrape(&daemon.http_addr).await,
            "duofleet_health_reports_total",
        );
        let started = Instant::now();
        fleet.send_health(HealthRound {
            reports: o.health_reports,
            flapping,
        });
        wait_metrics(
            &daemon.http_addr,
            &[("duofleet_health_reports_total", before + total)],
            "health reports taken in",
        )
        .await;
        let seconds = started.elapsed().as_secs_f64();
        let per_second = total / seconds;
        println!(
            r#"{{"metric":"health_fan_in","mode":"{mode}","agents":{n},"reports":{total},"seconds":{seconds:.3},"per_second":{per_second:.0}}}"#
        );
        rows.push((
            format!("health reports taken in, {mode} ({total} reports)"),
            format!("{per_second:.0} /s"),
            String::new(),
            String::new(),
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    etcd_writes_at.push(("health", etcd_writes(&store_etcd).await));
    if store_etcd.is_some() {
        // A quiet fleet: what keeps writing is the lease, and heartbeats
        // due after 30 s (none here: the simulated agents report when told).
        tokio::time::sleep(Duration::from_secs(10)).await;
        etcd_writes_at.push(("idle 10 s", etcd_writes(&store_etcd).await));
        let steps: Vec<String> = etcd_writes_at
            .windows(2)
            .map(|w| format!(r#""{}":{}"#, w[1].0, w[1].1 - w[0].1))
            .collect();
        println!(
            r#"{{"metric":"etcd_store_writes","agents":{n},"changes":{},"health_reports":{},{}}}"#,
            o.changes,
            2 * n * o.health_reports,
            steps.join(",")
        );
        for w in etcd_writes_at.windows(2) {
            rows.push((
                format!("etcd writes by the store: {}", w[1].0),
                format!("{}", w[1].1 - w[0].1),
                String::new(),
                String::new(),
            ));
        }
    }
    let rss_health = rss_kib(daemon.pid());
    if o.hold_secs > 0 {
        eprintln!(
            "fanout: holding duofleetd (pid {}) for {} s after the health flood",
            daemon.pid(),
            o.hold_secs
        );
        tokio::time::sleep(Duration::from_secs(o.hold_secs)).await;
    }
    let per_agent_health_kib = rss_health.saturating_sub(rss_before) as f64 / n as f64;
    println!(
        r#"{{"metric":"rss_per_agent_kib_with_health","agents":{n},"value":{per_agent_health_kib:.1}}}"#
    );
    rows.push((
        format!(
            "server RSS per agent after the health flood ({} reports each, as fast as taken)",
            2 * o.health_reports
        ),
        format!("{per_agent_health_kib:.1} KiB"),
        String::new(),
        String::new(),
    ));

    // 4. Reconnect storm.
    let counters = &fleet.counters;
    let desired_before = counters.desired.load(Ordering::Relaxed);
    let sessions_before = counters.sessions.load(Ordering::Relaxed);
    let grpc_addr = daemon.grpc_addr.clone();
    let storm = Instant::now();
    tokio::task::block_in_place(|| daemon.stop("TERM"));
    let stop_secs = storm.elapsed().as_secs_f64();
    options.listen = Some(grpc_addr);
    let daemon = tokio::task::block_in_place(|| Daemon::start_with(&data, options.clone()));
    let ready_secs = storm.elapsed().as_secs_f64();
    wait_synced(&daemon, n, "all agents back and SYNCED").await;
    let storm_secs = storm.elapsed().as_secs_f64();
    // The daemon counts an agent connected a moment before the agent reads
    // its answer: the agents' own count of new streams catches up.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counters.sessions.load(Ordering::Relaxed) - sessions_before < n as u64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resent = counters.desired.load(Ordering::Relaxed) - desired_before;
    let reapplied = counters.reapplied.load(Ordering::Relaxed);
    let reconnects = counters.sessions.load(Ordering::Relaxed) - sessions_before;
    let acks_after = acks(&scrape(&daemon.http_addr).await);
    println!(
        r#"{{"metric":"reconnect_storm","agents":{n},"seconds":{storm_secs:.3},"stopped_s":{stop_secs:.3},"ready_s":{ready_secs:.3},"reconnects":{reconnects},"configs_resent":{resent},"reapplied":{reapplied},"acks_after_restart":{acks_after}}}"#
    );
    rows.push((
        format!("reconnect storm: restart to all {n} SYNCED"),
        format!("{storm_secs:.2} s ({resent} configs resent)"),
        String::new(),
        String::new(),
    ));
    drop(operator);
    drop(fleet);
    drop(daemon);

    // 5. etcd, the same N subscribers and changes.
    let rss_row = format!("{per_agent_kib:.1} KiB");
    let mut etcd_run = None;
    let mut etcd_rss = String::new();
    if o.etcd {
        let etcd = start_etcd().await;
        let arrivals = Arc::new(Arrivals::new(n));
        let rss_before = rss_kib(etcd.pid());
        let started = Instant::now();
        let watchers = etcd::watchers(etcd.url(), n, o.per_connection, arrivals.clone()).await;
        let connect_secs = started.elapsed().as_secs_f64();
        let per_watcher_kib = rss_kib(etcd.pid()).saturating_sub(rss_before) as f64 / n as f64;
        println!(
            r#"{{"metric":"etcd_connect_all","watchers":{n},"seconds":{connect_secs:.3},"rss_per_watcher_kib":{per_watcher_kib:.1}}}"#
        );
        let mut writer = etcd::writer(&etcd).await;
        let theirs = deliver(
            "etcd_change_to_all_watchers",
            "watchers",
            &arrivals,
            n,
            o.changes,
            etcd.pid(),
            async |change| etcd::put(&mut writer, change).await,
        )
        .await;
        println!(
            r#"{{"metric":"etcd_summary","watchers":{n},"changes":{},"p50_ms":{:.3},"p99_ms":{:.3},"max_ms":{:.3},"from_request_p50_ms":{:.3},"from_request_p99_ms":{:.3},"etcd_cpu_ms_per_change":{:.1},"client_cpu_ms_per_change":{:.1}}}"#,
            o.changes,
            theirs.from_ok.p50,
            theirs.from_ok.p99,
            theirs.from_ok.max,
            theirs.from_request.p50,
            theirs.from_request.p99,
            theirs.cpu_ms_per_change,
            theirs.client_cpu_ms_per_change
        );
        println!(
            r#"{{"metric":"ratio_duofleet_over_etcd","agents":{n},"p50_from_ok":{},"p99_from_ok":{},"p50_from_request":{},"p99_from_request":{}}}"#,
            ratio(ours.from_ok.p50, theirs.from_ok.p50),
            ratio(ours.from_ok.p99, theirs.from_ok.p99),
            ratio(ours.from_request.p50, theirs.from_request.p50),
            ratio(ours.from_request.p99, theirs.from_request.p99),
        );
        etcd_rss = format!("{per_watcher_kib:.1} KiB");
        etcd_run = Some(theirs);
        rows[0].2 = format!("{connect_secs:.2} s (100 at a time)");
        drop(watchers);
    }

    // 6. The floor: plain TCP, the same N subscribers and changes.
    let mut raw_run = None;
    let mut raw_rss = String::new();
    if o.raw && o.per_connection > 1 {
        eprintln!(
            "fanout: the floor needs one connection per subscriber; --raw is skipped with --streams-per-connection"
        );
    }
    if o.raw && o.per_connection == 1 {
        let mut server = tokio::task::block_in_place(raw::RawServer::start);
        let arrivals = Arc::new(Arrivals::new(n));
        let rss_before = rss_kib(server.pid());
        let clients = raw::connect(&mut server, n, arrivals.clone()).await;
        let per_connection_kib = rss_kib(server.pid()).saturating_sub(rss_before) as f64 / n as f64;
        let pid = server.pid();
        let floor = deliver(
            "raw_change_to_all_acked",
            "connections",
            &arrivals,
            n,
            o.changes,
            pid,
            async |change| server.push_blocking(change as u64),
        )
        .await;
        println!(
            r#"{{"metric":"raw_summary","connections":{n},"changes":{},"p50_ms":{:.3},"p99_ms":{:.3},"from_request_p50_ms":{:.3},"from_request_p99_ms":{:.3},"server_cpu_ms_per_change":{:.1},"rss_per_connection_kib":{per_connection_kib:.1},"client_cpu_ms_per_change":{:.1}}}"#,
            o.changes,
            floor.from_ok.p50,
            floor.from_ok.p99,
            floor.from_request.p50,
            floor.from_request.p99,
            floor.cpu_ms_per_change,
            floor.client_cpu_ms_per_change
        );
        println!(
            r#"{{"metric":"ratio_duofleet_over_floor","agents":{n},"p50_from_request":{},"p99_from_request":{},"cpu":{}}}"#,
            ratio(ours.from_request.p50, floor.from_request.p50),
            ratio(ours.from_request.p99, floor.from_request.p99),
            ratio(ours.cpu_ms_per_change, floor.cpu_ms_per_change),
        );
        raw_rss = format!("{per_connection_kib:.1} KiB");
        raw_run = Some(floor);
        drop(clients);
        drop(server);
    }

    // The table.
    let mut table = delivery_rows(
        n,
        o.changes,
        [Some(&ours), etcd_run.as_ref(), raw_run.as_ref()],
    );
    table.push((
        "server RSS per subscriber".to_string(),
        rss_row,
        etcd_rss,
        raw_rss,
    ));
    table.extend(rows);
    let sharing = if o.per_connection > 1 {
        format!(" ({} per connection)", o.per_connection)
    } else {
        String::new()
    };
    print_table(
        &format!("{n} subscribers{sharing}, {} changes", o.changes),
        table,
    );
}

/// How a figure is written from a column's changes.
type Shows<'a> = dyn Fn(&Deliveries) -> String + 'a;

/// The table's rows for the changes of each column (duofleet, etcd, the
/// floor; a column not run is blank).
pub fn delivery_rows(n: usize, changes: usize, columns: [Option<&Deliveries>; 3]) -> Vec<Row> {
    let ms = |s: Spread| format!("{:.1} / {:.1} / {:.1} ms", s.p50, s.p99, s.max);
    let figures: [(String, &Shows<'_>); 5] = [
        (
            format!("change to all {n} acked, from the OK (p50 / p99 / max)"),
            &|d| ms(d.from_ok),
        ),
        ("the same, from the request".to_string(), &|d| {
            ms(d.from_request)
        }),
        (
            "the change's OK, from the request (p50 / p99 / max); how many came after every subscriber had the change".to_string(),
            &|d| format!("{}; {} of {changes}", ms(d.answered), d.answered_after),
        ),
        ("server CPU per change (user + system)".to_string(), &|d| {
            format!("{:.0} ms", d.cpu_ms_per_change)
        }),
        (
            "the subscribers' CPU per change (the bench's own)".to_string(),
            &|d| format!("{:.0} ms", d.client_cpu_ms_per_change),
        ),
    ];
    figures
        .into_iter()
        .map(|(figure, show)| {
            let [ours, etcd, floor] = columns.map(|d| d.map(show).unwrap_or_default());
            (figure, ours, etcd, floor)
        })
        .collect()
}

/// Prints the closing table: a heading row, then a row per figure.
pub fn print_table(heading: &str, rows: Vec<Row>) {
    println!();
    println!("| {heading} | duofleet | etcd | floor (TCP) |");
    println!("|---|---|---|---|");
    for (figure, ours, theirs, floor) in rows {
        println!("| {figure} | {ours} | {theirs} | {floor} |");
    }
}
