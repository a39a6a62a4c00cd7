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
                .create_model(CreateModelRequest { model: Some(model) })
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
    let dir = tempfile::tempdir().unwrap();
    let options = duofleet_tests::DaemonOptions {
        args: ["--max-connections", "2", "--first-byte-timeout-ms", "300"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ..Default::default()
    };
    let daemon = duofleet_tests::Daemon::start_with(&dir.path().join("data"), options);

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

    // Two live connections fill the daemon; a third waits until one closes.
    let first = daemon.channel().await;
    let second = daemon.channel().await;
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
