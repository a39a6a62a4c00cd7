//! The fan-out benchmark at a small N, so that it keeps working: every
//! phase runs, against the real daemon, a real etcd and the TCP floor. Its figures are
//! not asserted (timing belongs to the benchmark, not the tests); what
//! every run must show is.

/// Runs a bench binary, which must succeed; what it printed.
fn run(bench: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(duofleet_tests::bin(bench))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {bench}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The JSON lines a bench printed, in order.
fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[test]
fn fanout_runs_every_phase_and_reports_it() {
    let stdout = run(
        "fanout",
        &[
            "--agents",
            "5",
            "--changes",
            "3",
            "--health-reports",
            "4",
            "--etcd",
            "--raw",
        ],
    );
    let lines = json_lines(&stdout);
    let of = |metric: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["metric"] == metric).collect()
    };
    let revisions: Vec<u64> = of("change_to_all_acked")
        .iter()
        .map(|l| l["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revisions, [1, 2, 3]);
    let summary = of("summary")[0];
    assert_eq!(summary["agents"], 5);
    assert!(summary["rss_per_agent_kib"].as_f64().is_some());
    assert!(summary["client_cpu_ms_per_change"].as_f64().is_some());

    // Both health rounds: 5 agents x 4 reports, taken in at some rate.
    let health = of("health_fan_in");
    assert_eq!(health.len(), 2);
    for round in health {
        assert_eq!(round["reports"], 20.0);
        assert!(round["per_second"].as_f64().unwrap() > 0.0);
    }

    // The restart: every agent back (SYNCED), nothing sent or acked again.
    let storm = of("reconnect_storm")[0];
    assert_eq!(storm["reconnects"], 5);
    assert_eq!(storm["configs_resent"], 0);
    assert_eq!(storm["reapplied"], 0);
    assert_eq!(storm["acks_after_restart"], 0.0);

    // etcd: the same changes reached all 5 watchers, and the ratio is there.
    assert_eq!(of("etcd_change_to_all_watchers").len(), 3);
    assert_eq!(of("etcd_summary")[0]["watchers"], 5);
    assert!(of("ratio_duofleet_over_etcd")[0]["p99_from_request"].is_number());
    // The floor: plain TCP, the same changes to all 5 connections.
    assert_eq!(of("raw_change_to_all_acked").len(), 3);
    assert_eq!(of("raw_summary")[0]["connections"], 5);
    assert!(of("ratio_duofleet_over_floor")[0]["p99_from_request"].is_number());
    assert!(stdout.contains("| 5 subscribers, 3 changes | duofleet | etcd | floor (TCP) |"));
}

/// The interleaved bench at a small N: the three columns take turns, each
/// makes every change after an uncounted first, and every server stops
/// with the bench.
#[test]
fn fanout_interleaved_takes_turns_and_stops_every_server() {
    let stdout = run(
        "fanout",
        &["--agents", "5", "--changes", "3", "--interleave"],
    );
    let lines = json_lines(&stdout);
    let of = |metric: &str| -> Vec<&serde_json::Value> {
        lines.iter().filter(|l| l["metric"] == metric).collect()
    };
    let turns: Vec<(String, u64)> = of("interleaved_change")
        .iter()
        .map(|l| {
            (
                l["column"].as_str().unwrap().to_string(),
                l["change"].as_u64().unwrap(),
            )
        })
        .collect();
    // Change 1 warms each column up, uncounted; then round K starts
    // with column K mod 3.
    let expected: Vec<(String, u64)> = [
        ("floor", 2),
        ("duofleet", 2),
        ("etcd", 2),
        ("duofleet", 3),
        ("etcd", 3),
        ("floor", 3),
        ("etcd", 4),
        ("floor", 4),
        ("duofleet", 4),
    ]
    .iter()
    .map(|(c, n)| (c.to_string(), *n))
    .collect();
    assert_eq!(turns, expected, "{stdout}");
    assert_eq!(of("interleaved_warmup").len(), 3);
    // Each change says what it cost each side, from the request until
    // every subscriber had it.
    for change in of("interleaved_change") {
        for side in ["server_cpu_spent_ms", "client_cpu_spent_ms"] {
            assert!(
                change[side].as_f64().is_some_and(|ms| ms >= 0.0),
                "{change}"
            );
        }
    }
    // duofleet's and the floor's counted changes are revisions 2 to 4, in
    // order.
    for column in ["duofleet", "floor"] {
        let revisions: Vec<u64> = of("interleaved_change")
            .iter()
            .filter(|l| l["column"] == column)
            .map(|l| l["revision"].as_u64().unwrap())
            .collect();
        assert_eq!(revisions, [2, 3, 4], "{column}");
    }
    let summaries = of("interleaved_summary");
    assert_eq!(summaries.len(), 3);
    for summary in summaries {
        assert_eq!(summary["changes"], 3);
        assert!(
            summary["from_request_p99_ms"].as_f64().unwrap() > 0.0,
            "{summary}"
        );
        assert!(summary["server_cpu_ms_per_change"].is_number(), "{summary}");
        assert!(
            summary["server_cpu_after_ms_per_change"].is_number(),
            "{summary}"
        );
        for key in ["server_cpu_fastest_half_ms", "server_cpu_slowest_tenth_ms"] {
            assert!(
                summary[key].as_f64().is_some_and(|ms| ms >= 0.0),
                "{summary}"
            );
        }
    }
    let ratios = of("interleaved_ratio");
    assert_eq!(ratios.len(), 2);
    assert!(ratios.iter().all(|r| r["p99_from_request"].is_number()));
    assert!(stdout.contains(
        "| 5 subscribers, 3 changes each, taken in turn | duofleet | etcd | floor (TCP) |"
    ));
    // The servers (duofleetd, etcd, the floor's) are gone with the bench.
    let servers = of("interleaved_column");
    assert_eq!(servers.len(), 3);
    for server in servers {
        let pid = server["server_pid"].as_u64().unwrap();
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{server} still runs"
        );
    }
}

/// The same bench with the daemon on an etcd store and agents sharing
/// connections: every phase runs, and the store's writes are counted per
/// phase (new instances are written).
#[test]
fn fanout_runs_on_an_etcd_store() {
    let stdout = run(
        "fanout",
        &[
            "--agents",
            "5",
            "--changes",
            "2",
            "--health-reports",
            "2",
            "--store-etcd",
            // Agents sharing connections: groups of 2, 2 and 1.
            "--streams-per-connection",
            "2",
        ],
    );
    let lines = json_lines(&stdout);
    let line = |metric: &str| -> &serde_json::Value {
        lines
            .iter()
            .find(|l| l["metric"] == metric)
            .unwrap_or_else(|| panic!("no {metric} in:\n{stdout}"))
    };
    let writes = line("etcd_store_writes");
    assert!(writes["connect"].as_f64().unwrap() >= 1.0, "{writes}");
    assert!(writes["changes"].as_f64().unwrap() >= 2.0, "{writes}");
    let storm = line("reconnect_storm");
    assert_eq!(storm["reconnects"], 5);
    assert_eq!(storm["configs_resent"], 0);
}

/// The dashboard benchmark at a small N: every page renders, under 1 MB.
#[test]
fn dashboard_bench_renders_every_page() {
    let stdout = run("dashboard_bench", &["--instances", "300", "--rounds", "2"]);
    for page in [
        "/",
        "/instances",
        "/health",
        "/instances/gitlab-00003",
        "/history",
    ] {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("{page} "))),
            "no figures for {page}:\n{stdout}"
        );
    }
}
