//! `--interleave`: duofleet, etcd and the floor take turns, one change each,
//! so that a busy spell of this shared machine falls on all three alike.
//!
//! Run one after the other (the default), each system's changes fill a
//! phase of their own, and the machine's speed drifts from one phase to
//! the next: in one run at 10,000 agents, 100 changes each, duofleet's
//! changes slowed by a third from its 40th on while etcd and the floor,
//! measured after it, did not, and the next run did not either. Taking
//! turns, a slow minute costs each column the same few changes.
//!
//! Each system, its server and its N subscribers, lives in a child process
//! of this binary (`--column NAME`): this machine allows a process 20,000
//! open files, fewer than two fleets of 10,000 sockets. The child connects
//! its fleet and prints `ready` and its server's pid; then, for each line `change K` on its
//! stdin, it makes change K, waits until every subscriber has it, and
//! prints one JSON line with the change's times and the CPU its server
//! and it had used before the change; `end` prints the CPU at the end.
//! Round K starts with column K mod 3 (then the next, in turn), and
//! requests start at least `PACE` apart, as in the default run.
//!
//! The first round warms every column up and is not counted: etcd's first
//! put on a fresh data dir took on average 1.6 times its median (over 19
//! runs at 10,000 taken in turn; duofleet's and the floor's first change,
//! 1.04 and 1.09), so that etcd's p99 of 20 changes was often its first.
//! Counted are M more rounds, changes 2 to M + 1.
//!
//! What a server does after its change has reached every subscriber falls
//! into the next column's turn: the summary counts it (at 10,000,
//! duofleetd's saver writing the acked instances 2.5 to 5 s later, about a
//! tenth of its CPU per change; etcd's about 7 ms; the floor's nothing).

use crate::etcd::{self, Etcd};
use crate::fleet::Fleet;
use crate::raw::{self, RawServer};
use crate::{
    Arrivals, Deliveries, Delivery, Options, PACE, Row, connect_fleet, cpu_ms, daemon_options,
    delivery_rows, one_change, print_table, ratio, spread, start_etcd, update_default,
};
use duofleet_tests::{Clients, Daemon};
use serde_json::Value;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinSet;

/// One column of the table: a system and its subscribers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Column {
    Duofleet,
    Etcd,
    Floor,
}

impl Column {
    pub fn name(self) -> &'static str {
        match self {
            Column::Duofleet => "duofleet",
            Column::Etcd => "etcd",
            Column::Floor => "floor",
        }
    }

    pub fn parse(name: &str) -> Option<Column> {
        [Column::Duofleet, Column::Etcd, Column::Floor]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// A column's server and subscribers, in its child process.
enum Side {
    Duofleet {
        _dir: tempfile::TempDir,
        daemon: Daemon,
        operator: Box<Clients>,
        fleet: Fleet,
    },
    Etcd {
        etcd: Etcd,
        writer: Box<etcd_client::Client>,
        arrivals: Arc<Arrivals>,
        _watchers: JoinSet<()>,
    },
    Floor {
        server: RawServer,
        arrivals: Arc<Arrivals>,
        _clients: JoinSet<()>,
    },
}

impl Side {
    async fn start(column: Column, n: usize, per_connection: usize) -> Side {
        match column {
            Column::Duofleet => {
                let dir = tempfile::tempdir().unwrap();
                let data = dir.path().join("data");
                let daemon =
                    tokio::task::block_in_place(|| Daemon::start_with(&data, daemon_options(n)));
                let operator = Box::new(daemon.clients().await);
                let fleet = connect_fleet(&daemon, n, per_connection).await;
                Side::Duofleet {
                    _dir: dir,
                    daemon,
                    operator,
                    fleet,
                }
            }
            Column::Etcd => {
                let etcd = start_etcd().await;
                let arrivals = Arc::new(Arrivals::new(n));
                let watchers =
                    etcd::watchers(etcd.url(), n, per_connection, arrivals.clone()).await;
                let writer = Box::new(etcd::writer(&etcd).await);
                Side::Etcd {
                    etcd,
                    writer,
                    arrivals,
                    _watchers: watchers,
                }
            }
            Column::Floor => {
                let mut server = tokio::task::block_in_place(RawServer::start);
                let arrivals = Arc::new(Arrivals::new(n));
                let clients = raw::connect(&mut server, n, arrivals.clone()).await;
                Side::Floor {
                    server,
                    arrivals,
                    _clients: clients,
                }
            }
        }
    }

    fn server_pid(&self) -> u32 {
        match self {
            Side::Duofleet { daemon, .. } => daemon.pid(),
            Side::Etcd { etcd, .. } => etcd.pid(),
            Side::Floor { server, .. } => server.pid(),
        }
    }

    async fn change(&mut self, change: usize) -> Delivery {
        match self {
            Side::Duofleet {
                operator, fleet, ..
            } => one_change(&fleet.counters.arrivals, update_default(operator, change)).await,
            Side::Etcd {
                writer, arrivals, ..
            } => one_change(arrivals, etcd::put(writer, change)).await,
            Side::Floor {
                server, arrivals, ..
            } => one_change(arrivals, async { server.push_blocking(change as u64) }).await,
        }
    }
}

/// The child process of one column (`--column NAME`), driven over its
/// stdin and stdout. Its server stops with it, at `end` or when its stdin
/// closes (the coordinator ended, however it ended).
pub async fn child(column: Column, o: &Options) {
    let mut side = Side::start(column, o.agents, o.per_connection).await;
    println!("ready {}", side.server_pid());
    loop {
        let mut line = String::new();
        match tokio::task::block_in_place(|| std::io::stdin().read_line(&mut line)) {
            // The coordinator is gone: stop the server too.
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = line.trim_end();
        let server_cpu_ms = cpu_ms(side.server_pid());
        let client_cpu_ms = cpu_ms(std::process::id());
        let Some(change) = line.strip_prefix("change ") else {
            println!(r#"{{"server_cpu_ms":{server_cpu_ms},"client_cpu_ms":{client_cpu_ms}}}"#);
            break;
        };
        let change = change.parse().expect("change K, with K a number");
        let d = side.change(change).await;
        let server_cpu_done_ms = cpu_ms(side.server_pid());
        let client_cpu_done_ms = cpu_ms(std::process::id());
        println!(
            r#"{{"revision":{},"ms":{:.3},"from_request_ms":{:.3},"ok_ms":{:.3},"late":{},"server_cpu_ms":{server_cpu_ms},"server_cpu_done_ms":{server_cpu_done_ms},"client_cpu_ms":{client_cpu_ms},"client_cpu_done_ms":{client_cpu_done_ms}}}"#,
            d.revision, d.ms, d.request_ms, d.ok_ms, d.late
        );
    }
}

/// The CPU one side of a change's answer (`server` or `client`) spent
/// from the request until every subscriber had the change.
fn spent(answer: &Value, side: &str) -> f64 {
    let at = |key: String| answer[key].as_f64().unwrap_or(0.0);
    at(format!("{side}_cpu_done_ms")) - at(format!("{side}_cpu_ms"))
}

/// A column's child, from the coordinator's side, and its answers so far.
struct Turns {
    column: Column,
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    changes: Vec<Value>,
}

impl Turns {
    /// Starts the child and waits until its fleet is connected.
    async fn start(column: Column, o: &Options) -> Turns {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .args(["--column", column.name()])
            .args(["--agents", &o.agents.to_string()])
            .args(["--streams-per-connection", &o.per_connection.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a column's process");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready = stdout.next_line().await.ok().flatten();
        let server_pid = ready
            .as_deref()
            .and_then(|l| l.strip_prefix("ready "))
            .unwrap_or_else(|| panic!("{}: the column's process did not start", column.name()));
        println!(
            r#"{{"metric":"interleaved_column","column":"{}","server_pid":{server_pid}}}"#,
            column.name()
        );
        Turns {
            column,
            child,
            stdin,
            stdout,
            changes: Vec::new(),
        }
    }

    /// Sends `line` to the child; its answer.
    async fn ask(&mut self, line: &str) -> Value {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write to a column's process");
        let answer = self
            .stdout
            .next_line()
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{}: the column's process ended", self.column.name()));
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer}: {e}"))
    }

    /// The CPU its server spent per change after the change had reached
    /// every subscriber, until its next turn (or `end`): work that lingers
    /// into the next column's turn.
    fn lingering_cpu_ms(&self, end: &Value) -> f64 {
        let done = self
            .changes
            .iter()
            .map(|c| c["server_cpu_done_ms"].as_f64());
        let next = self.changes.iter().skip(1).chain([end]);
        let after: f64 = done
            .zip(next)
            .map(|(done, next)| next["server_cpu_ms"].as_f64().unwrap_or(0.0) - done.unwrap_or(0.0))
            .sum();
        after / self.changes.len().max(1) as f64
    }

    /// The server's CPU per change, from the request until every
    /// subscriber had it: over the fastest half of its changes, and over
    /// the slowest tenth (at least one). Slow changes that cost no more
    /// than the rest met a stall; slow changes that cost more met a
    /// machine running slower (the README's "The slow changes").
    fn cpu_by_speed(&self) -> (f64, f64) {
        let mut changes: Vec<(f64, f64)> = self
            .changes
            .iter()
            .map(|c| {
                (
                    c["from_request_ms"].as_f64().unwrap_or(0.0),
                    spent(c, "server"),
                )
            })
            .collect();
        changes.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mean = |part: &[(f64, f64)]| {
            part.iter().map(|(_, cpu)| cpu).sum::<f64>() / part.len().max(1) as f64
        };
        let n = changes.len();
        let tenth = (n / 10).max(1).min(n);
        (mean(&changes[..n / 2]), mean(&changes[n - tenth..]))
    }

    /// Its changes' figures, with `end` the CPU read at the end.
    fn deliveries(&self, end: &Value) -> Deliveries {
        let figure = |key: &str| -> Vec<f64> {
            self.changes
                .iter()
                .map(|c| c[key].as_f64().unwrap_or(0.0))
                .collect()
        };
        let per_change = |key: &str| {
            let first = self.changes.first().map(|c| c[key].as_f64().unwrap_or(0.0));
            let last = end[key].as_f64().unwrap_or(0.0);
            (last - first.unwrap_or(last)) / self.changes.len().max(1) as f64
        };
        Deliveries {
            from_ok: spread(figure("ms")),
            from_request: spread(figure("from_request_ms")),
            answered: spread(figure("ok_ms")),
            answered_after: self.changes.iter().filter(|c| c["late"] == true).count(),
            cpu_ms_per_change: per_change("server_cpu_ms"),
            client_cpu_ms_per_change: per_change("client_cpu_ms"),
        }
    }
}

/// The coordinator of `--interleave`.
pub async fn run(o: &Options) {
    let n = o.agents;
    let mut columns = vec![Column::Duofleet, Column::Etcd];
    if o.per_connection == 1 {
        columns.push(Column::Floor);
    } else {
        eprintln!("fanout: the floor needs one connection per subscriber; it is left out");
    }
    let mut turns = Vec::new();
    for column in columns {
        turns.push(Turns::start(column, o).await);
    }
    // Change 1 warms every column up and is not counted; then rounds 2
    // to M + 1, the first of each round turning.
    for change in 1..=o.changes + 1 {
        for i in 0..turns.len() {
            let at = (change + i) % turns.len();
            let turn = &mut turns[at];
            let sent_at = Instant::now();
            let answer = turn.ask(&format!("change {change}")).await;
            let metric = match change {
                1 => "interleaved_warmup",
                _ => "interleaved_change",
            };
            println!(
                r#"{{"metric":"{metric}","column":"{}","change":{change},"turn":{i},"revision":{},"ms":{},"from_request_ms":{},"ok_ms":{},"server_cpu_spent_ms":{},"client_cpu_spent_ms":{}}}"#,
                turn.column.name(),
                answer["revision"],
                answer["ms"],
                answer["from_request_ms"],
                answer["ok_ms"],
                spent(&answer, "server"),
                spent(&answer, "client")
            );
            if change > 1 {
                turn.changes.push(answer);
            }
            tokio::time::sleep_until((sent_at + PACE).into()).await;
        }
    }
    let mut results: [Option<Deliveries>; 3] = [None, None, None];
    // Rows of the table beyond the deliveries', a cell per column.
    let mut extra = [
        "of the server's CPU per change, what it spent after every subscriber had the change",
        "the server's CPU until every subscriber had the change: its fastest half of changes / its slowest tenth",
    ]
    .map(|label| (label, [String::new(), String::new(), String::new()]));
    for turn in &mut turns {
        let end = turn.ask("end").await;
        // Its server stopped before the next column's figures are read.
        let _ = turn.child.wait().await;
        let d = turn.deliveries(&end);
        let lingering = turn.lingering_cpu_ms(&end);
        let (fastest_half, slowest_tenth) = turn.cpu_by_speed();
        println!(
            r#"{{"metric":"interleaved_summary","column":"{}","subscribers":{n},"changes":{},"p50_ms":{:.3},"p99_ms":{:.3},"max_ms":{:.3},"from_request_p50_ms":{:.3},"from_request_p99_ms":{:.3},"server_cpu_ms_per_change":{:.1},"server_cpu_after_ms_per_change":{lingering:.1},"client_cpu_ms_per_change":{:.1},"server_cpu_fastest_half_ms":{fastest_half:.1},"server_cpu_slowest_tenth_ms":{slowest_tenth:.1}}}"#,
            turn.column.name(),
            o.changes,
            d.from_ok.p50,
            d.from_ok.p99,
            d.from_ok.max,
            d.from_request.p50,
            d.from_request.p99,
            d.cpu_ms_per_change,
            d.client_cpu_ms_per_change
        );
        results[turn.column as usize] = Some(d);
        extra[0].1[turn.column as usize] = format!("{lingering:.0} ms");
        extra[1].1[turn.column as usize] = format!("{fastest_half:.0} / {slowest_tenth:.0} ms");
    }
    let [Some(ours), etcd, floor] = &results else {
        unreachable!("duofleet's column always runs")
    };
    for (other, them) in [("etcd", etcd), ("floor", floor)] {
        if let Some(them) = them {
            println!(
                r#"{{"metric":"interleaved_ratio","over":"{other}","agents":{n},"p50_from_request":{},"p99_from_request":{},"cpu":{}}}"#,
                ratio(ours.from_request.p50, them.from_request.p50),
                ratio(ours.from_request.p99, them.from_request.p99),
                ratio(ours.cpu_ms_per_change, them.cpu_ms_per_change),
            );
        }
    }
    let mut rows: Vec<Row> = delivery_rows(n, o.changes, results.each_ref().map(Option::as_ref));
    for (label, [ours, etcd, floor]) in extra {
        rows.push((label.to_string(), ours, etcd, floor));
    }
    print_table(
        &format!("{n} subscribers, {} changes each, taken in turn", o.changes),
        rows,
    );
}
