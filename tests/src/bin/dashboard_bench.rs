//! How fast the dashboard's pages render for a large fleet, and how big
//! they are. The real router (login, session check, rendering) is driven
//! in process, over a registry that holds `--instances` instances (default
//! 10,000), each with a gateway and two model targets; a tenth have a
//! model down, 1 % are FAILED and 1 % OFFLINE.
//!
//! cargo run --release -p duofleet-tests --bin dashboard_bench -- --instances 10000

use axum::body::Body;
use axum::http::{Request, StatusCode};
use duofleet_control_plane::auth::Tokens;
use duofleet_control_plane::dashboard::Dashboard;
use duofleet_control_plane::labels::LabelGrant;
use duofleet_control_plane::registry::Registry;
use duofleet_control_plane::rollout::Rollouts;
use duofleet_control_plane::secrets::Sealer;
use duofleet_control_plane::store::Store;
use duofleet_proto::v1::{
    Ack, AckResult, EndpointHealth, HealthReport, HealthState, Hello, TargetKind,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let n = arg("--instances", 10_000);
    let rounds = arg("--rounds", 20);
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        Store::open(
            &dir.path().join("db"),
            duofleet_control_plane::catalog::get(),
            Sealer::new(&[1; 32], None),
        )
        .unwrap(),
    );
    let registry = Arc::new(Registry::load(store.clone(), n + 10).unwrap());
    let rollouts = Rollouts::open(store.clone(), registry.clone()).unwrap();
    let tokens = Arc::new(Tokens::load_or_create(dir.path()).unwrap());
    let admin = std::fs::read_to_string(tokens.admin_token_path()).unwrap();

    let started = Instant::now();
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        let hello = Hello {
            instance_id: format!("gitlab-{i:05}"),
            hostname: format!("gitlab-{i:05}.example.internal"),
            labels: [(
                "ring".to_string(),
                if i % 10 == 0 { "canary" } else { "main" }.to_string(),
            )]
            .into(),
            agent_version: "0.1.0".into(),
            gitlab_version: "18.3.1-ee".into(),
            ..Default::default()
        };
        let session = registry.connect(&hello, &LabelGrant::all()).unwrap();
        // 1 % FAILED, 1 % OFFLINE: the overview lists them.
        let failed_apply = i % 100 == 7;
        registry.ack(
            &session,
            &Ack {
                revision: 0,
                result: if failed_apply {
                    AckResult::Failed
                } else {
                    AckResult::Applied
                } as i32,
                error: if failed_apply {
                    "gitlab-ctl reconfigure failed: exit status 1".into()
                } else {
                    String::new()
                },
                ..Default::default()
            },
        );
        let failing = i % 10 == 3;
        let target = |kind: TargetKind, name: &str, down: bool| EndpointHealth {
            kind: kind as i32,
            target: name.into(),
            state: if down {
                HealthState::Unhealthy
            } else {
                HealthState::Healthy
            } as i32,
            error: if down {
                "GET https://vllm-b.example.internal:8000/v1/models failed: connection refused"
                    .into()
            } else {
                String::new()
            },
            latency_ms: 12 + (i % 40) as u32,
            check_time: Some(std::time::SystemTime::now().into()),
        };
        registry.health(
            &session,
            HealthReport {
                results: vec![
                    target(
                        TargetKind::AiGateway,
                        "https://aigw.example.internal:5052",
                        false,
                    ),
                    target(TargetKind::Model, "mixtral-a", false),
                    target(TargetKind::Model, "mixtral-b", failing),
                ],
            },
        );
        if i % 100 == 8 {
            registry.disconnect(&session);
        }
        sessions.push(session);
    }
    eprintln!("{n} instances registered in {:.1?}", started.elapsed());

    let router = Dashboard::new(store, registry, rollouts, tokens, false).router();
    // Log in as a browser would: the login form's CSRF cookie, then the token.
    let body = format!("token={}&csrf=bench", admin.trim());
    let response = router
        .clone()
        .oneshot(
            Request::post("/login")
                .header("content-type", "application/x-www-form-urlencoded")
                .header("cookie", "duofleet_login=bench")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();

    println!("dashboard at {n} instances, {rounds} rounds each (release build for real figures)");
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "page", "p50 ms", "max ms", "bytes"
    );
    for path in [
        "/",
        "/instances",
        "/instances?sort=state&page=3",
        "/instances?state=SYNCED&label=ring%3Dcanary",
        "/health",
        "/instances/gitlab-00003",
        "/history",
    ] {
        let mut times = Vec::with_capacity(rounds);
        let mut size = 0;
        for _ in 0..rounds {
            let started = Instant::now();
            let response = router
                .clone()
                .oneshot(
                    Request::get(path)
                        .header("cookie", &cookie)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let bytes = axum::body::to_bytes(response.into_body(), 8 << 20)
                .await
                .unwrap();
            times.push(started.elapsed());
            size = bytes.len();
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{path:<34} {:>10.1} {:>10.1} {:>10}",
            ms(times[times.len() / 2]),
            ms(*times.last().unwrap()),
            size
        );
        assert!(size < 1 << 20, "{path} is over 1 MB: {size} bytes");
    }
    drop(sessions);
}
