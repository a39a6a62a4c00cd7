//! The fan-out benchmark at a small N, so that it keeps working. Its
//! figures are not asserted: timing belongs to the benchmark, not the tests.

#[test]
fn fanout_runs_and_reports_every_change() {
    let out = std::process::Command::new(duofleet_tests::bin("fanout"))
        .args(["--agents", "5", "--changes", "3"])
        .output()
        .expect("run fanout");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let changes: Vec<u64> = lines
        .iter()
        .filter(|l| l["metric"] == "change_to_all_acked")
        .map(|l| l["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(changes, [1, 2, 3]);
    let summary = lines
        .iter()
        .find(|l| l["metric"] == "summary")
        .expect("summary line");
    assert_eq!(summary["agents"], 5);
    assert!(summary["rss_per_agent_kib"].as_f64().is_some());
    assert!(stdout.contains("| agents | changes |"));
}
