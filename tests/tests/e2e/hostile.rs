//! Hostile input gets a clear, short error, and the daemon keeps serving.

use crate::{fresh_daemon, list_models, revision_numbers};
use duofleet_proto::v1::{CreateModelRequest, CreateProfileRequest, Model};
use duofleet_tests::{grpcurl, mk};
use tonic::Code;

#[tokio::test]
async fn huge_and_binary_input_is_refused_clearly() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;

    let huge = c
        .models
        .create_model(CreateModelRequest {
            model: Some(Model {
                name: "x".repeat(1 << 20),
                ..mk::model("")
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::InvalidArgument);
    assert_eq!(
        huge.message(),
        "model.name: must be 1 to 255 characters (got 1048576)"
    );

    let huge_family = c
        .models
        .create_model(CreateModelRequest {
            model: Some(Model {
                family: "f".repeat(1 << 20),
                ..mk::model("m")
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(huge_family.code(), Code::InvalidArgument);
    assert!(
        huge_family.message().len() < 1024,
        "a hostile value is echoed whole: {} bytes",
        huge_family.message().len()
    );

    let control = c
        .models
        .create_model(CreateModelRequest {
            model: Some(mk::model("line\nbreak\0")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(control.code(), Code::InvalidArgument);
    assert_eq!(
        control.message(),
        "model.name: must not contain control characters (found U+000A at position 4)"
    );

    let mut profile = mk::profile("wide");
    profile.selector = (0..10_000)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    let wide = c
        .profiles
        .create_profile(CreateProfileRequest {
            profile: Some(profile),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(wide.code(), Code::InvalidArgument);
    assert_eq!(
        wide.message(),
        "profile.selector: at most 32 labels (got 10000)"
    );

    assert!(revision_numbers(&mut c).await.is_empty());
    let check = grpcurl(&daemon.grpc_addr, &[], &["grpc.health.v1.Health/Check"]);
    assert_eq!(check.json()["status"], "SERVING");
}

#[tokio::test]
async fn fifty_concurrent_creates_of_one_name_have_one_winner() {
    let (_dir, daemon) = fresh_daemon();
    let clients = daemon.clients().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = clients.clone();
        tasks.push(tokio::spawn(async move {
            let mut model = mk::model("contended");
            model.endpoint = format!("https://vllm-{i}:8000/v1");
            c.models
                .create_model(CreateModelRequest {
                    model: Some(model),
                    ..Default::default()
                })
                .await
        }));
    }
    let mut ok = 0;
    let mut exists = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
                assert_eq!(status.message(), "model \"contended\" already exists");
                exists += 1;
            }
        }
    }
    assert_eq!((ok, exists), (1, 49));
    let mut c = clients.clone();
    let models = list_models(&mut c).await;
    assert_eq!(models.len(), 1);
    assert_eq!(revision_numbers(&mut c).await, [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_connections_are_capped() {
    use std::io::Read;
    let (_dir, daemon) = daemon_with(&["--max-connections", "2", "--first-byte-timeout-ms", "300"]);

    // Two clients that connect and say nothing are dropped.
    let mut silent: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(&daemon.grpc_addr).unwrap())
        .collect();
    for stream in &mut silent {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        // The server speaks first (HTTP/2 settings), then closes.
        let mut seen = Vec::new();
        let closed = match stream.read_to_end(&mut seen) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        assert!(closed, "a silent connection was kept open");
    }
    let check = grpcurl(
        &daemon.grpc_addr,
        &["-max-time", "5"],
        &["grpc.health.v1.Health/Check"],
    );
    assert_eq!(check.exit_code, 0, "{check:?}");

    // Two live (authenticated) connections fill the daemon; a third waits
    // until one closes.
    let mut first = daemon.clients().await;
    list_models(&mut first).await;
    let mut second = daemon.clients().await;
    list_models(&mut second).await;
    let waiting = grpcurl(
        &daemon.grpc_addr,
        &["-max-time", "2"],
        &["grpc.health.v1.Health/Check"],
    );
    assert_ne!(
        waiting.exit_code, 0,
        "a third connection was served: {waiting:?}"
    );
    drop(first);
    let admitted = grpcurl(
        &daemon.grpc_addr,
        &["-max-time", "10"],
        &["grpc.health.v1.Health/Check"],
    );
    assert_eq!(admitted.exit_code, 0, "{admitted:?}");
    drop(second);
}

/// Bytes that are not the method's message, and a message over the size
/// limit: INVALID_ARGUMENT saying what is wrong, not INTERNAL or
/// OUT_OF_RANGE.
#[tokio::test]
async fn undecodable_and_oversized_requests_are_invalid_arguments() {
    let (_dir, daemon) = fresh_daemon();
    let mut grpc = tonic::client::Grpc::new(daemon.channel().await);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(prost_types::Duration {
        seconds: 5,
        nanos: 0,
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", daemon.token()).parse().unwrap(),
    );
    let path = "/duofleet.v1.ModelService/CreateModel".parse().unwrap();
    let codec: tonic_prost::ProstCodec<prost_types::Duration, prost_types::Duration> =
        tonic_prost::ProstCodec::default();
    let wrong = grpc.unary(request, path, codec).await.unwrap_err();
    assert_eq!(wrong.code(), Code::InvalidArgument, "{wrong:?}");
    assert!(
        wrong
            .message()
            .starts_with("request: not a valid message for this method ("),
        "{}",
        wrong.message()
    );

    let mut c = daemon.clients().await;
    let huge = c
        .models
        .create_model(CreateModelRequest {
            model: Some(Model {
                name: "n".repeat(5 << 20),
                ..mk::model("")
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::InvalidArgument, "{huge:?}");
    assert!(
        huge.message().starts_with("request: the message is ")
            && huge.message().contains("over the limit of 4194304 bytes"),
        "{}",
        huge.message()
    );
    // The daemon still serves.
    assert!(list_models(&mut c).await.is_empty());
}

/// An HTTP/2 client that keeps its connection busy (PINGs) but never sends
/// an authenticated request, and one that trickles a byte at a time, are
/// closed at the authentication deadline.
#[test]
fn busy_unauthenticated_connections_are_closed_at_the_deadline() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let (_dir, daemon) = daemon_with(&["--auth-timeout-ms", "1500"]);
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];
    let ping = |n: u8| [0, 0, 8, 6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n];

    // The pinger: answers everything, authenticates never.
    let mut stream = std::net::TcpStream::connect(&daemon.grpc_addr).unwrap();
    stream.write_all(PREFACE).unwrap();
    stream.write_all(&SETTINGS).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut n = 0u8;
    let closed_after = loop {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the pinger was never closed"
        );
        n = n.wrapping_add(1);
        if stream.write_all(&ping(n)).is_err() || peer_closed(&mut stream) {
            break started.elapsed();
        }
    };
    assert!(
        closed_after >= Duration::from_millis(1000),
        "closed too early: {closed_after:?}"
    );

    // The trickler: a byte every 300 ms of a preface that never ends.
    let mut stream = std::net::TcpStream::connect(&daemon.grpc_addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in PREFACE.iter().cycle().take(40) {
        if stream.write_all(&[*byte]).is_err() || peer_closed(&mut stream) {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(closed, "the trickler was kept for {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(8));
}

/// Agents fill every ordinary slot; the operators' reserve still lets an
/// admin call through, and an agent on a reserved slot is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_have_headroom_when_agents_fill_the_daemon() {
    use duofleet_proto::v1::agent_message::Message;
    use duofleet_proto::v1::agent_service_client::AgentServiceClient;
    use duofleet_proto::v1::{AgentMessage, Hello};
    let (_dir, daemon) = daemon_with(&["--max-connections", "8"]);
    let token = std::fs::read_to_string(daemon.data_dir().join("enroll.token")).unwrap();
    // 8 slots: 4 ordinary, 4 kept for operators.
    let mut streams = Vec::new();
    let mut refused = Vec::new();
    for i in 0..6 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(AgentMessage {
            message: Some(Message::Hello(Hello {
                instance_id: format!("agent-{i}"),
                hostname: "h".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token.trim()).parse().unwrap(),
        );
        let mut client = AgentServiceClient::new(daemon.channel().await);
        match client.connect(request).await {
            Ok(stream) => streams.push((tx, client, stream.into_inner())),
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(streams.len(), 4, "{refused:?}");
    assert_eq!(refused.len(), 2);
    for status in &refused {
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("kept for operators"),
            "{}",
            status.message()
        );
    }
    let started = std::time::Instant::now();
    let mut c = daemon.clients().await;
    assert!(list_models(&mut c).await.is_empty());
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

/// A peer that opens an agent stream and never says Hello does not hold a
/// restart back: it is told when to come back, as agents are, instead of
/// the daemon waiting out its 30 s for a Hello (or the 10 s grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_says_hello_does_not_hold_a_restart_back() {
    use duofleet_proto::v1::AgentMessage;
    use duofleet_proto::v1::agent_service_client::AgentServiceClient;
    use std::time::{Duration, Instant};
    let (_dir, daemon) = fresh_daemon();
    let token = std::fs::read_to_string(daemon.data_dir().join("enroll.token")).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim()).parse().unwrap(),
    );
    let mut client = AgentServiceClient::new(daemon.channel().await);
    let waiting = tokio::spawn(async move { client.connect(request).await.map(drop) });
    // Time for the stream to open (on loopback, well under this); it
    // then waits for its Hello.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "answered before any Hello");

    let started = Instant::now();
    assert!(daemon.stop("TERM").success());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shutting down took {took:?}: it waited for the Hello"
    );
    let status = waiting.await.unwrap().expect_err("refused");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("duofleetd is shutting down; reconnect in"),
        "{}",
        status.message()
    );
    drop(tx);
}

/// The HTTP port does not hold a partial request forever.
#[test]
fn the_http_port_drops_a_request_that_never_ends() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let (_dir, daemon) = daemon_with(&["--http-header-timeout-ms", "1000"]);
    let mut stream = std::net::TcpStream::connect(&daemon.http_addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut closed = false;
    for line in ["GET /metrics HTTP/1.1\r\n", "Host: x\r\n"]
        .iter()
        .cycle()
        .take(40)
    {
        if stream.write_all(line.as_bytes()).is_err() || peer_closed(&mut stream) {
            closed = true;
            break;
        }
    }
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        closed,
        "a partial request was held for {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(6));
    // The port still serves.
    let (status, _) = duofleet_tests::http_get(&daemon.http_addr, "/healthz");
    assert_eq!(status, 200);
}

/// A daemon on a fresh data dir with extra flags.
fn daemon_with(args: &[&str]) -> (tempfile::TempDir, duofleet_tests::Daemon) {
    let dir = tempfile::tempdir().unwrap();
    let options = duofleet_tests::DaemonOptions {
        args: args.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let daemon = duofleet_tests::Daemon::start_with(&dir.path().join("data"), options);
    (dir, daemon)
}

/// Reads what is there; true when the peer has closed the connection (end
/// of stream or a reset), false when it merely has nothing to say.
fn peer_closed(stream: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4096];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}
