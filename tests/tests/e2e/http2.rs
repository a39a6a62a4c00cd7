//! The gRPC port's HTTP/2, frame by frame: what a client that breaks the
//! protocol gets back (RFC 9113's error codes), and flow control that
//! holds with a client whose windows are small; and deadlines
//! (`grpc-timeout`), which a gRPC client sends and the server keeps.

use crate::fresh_daemon;
use duofleet_proto::v1::{CreateModelRequest, ListModelsRequest};
use duofleet_tests::{Clients, mk};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tonic::transport::Endpoint;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const PROTOCOL_ERROR: u32 = 0x1;
const FRAME_SIZE_ERROR: u32 = 0x6;
const COMPRESSION_ERROR: u32 = 0x9;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// A client that has said its preface and an empty SETTINGS.
fn client(addr: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(PREFACE).unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    tcp
}

/// The next frame, or None once the daemon has closed the connection.
fn read_frame(tcp: &mut TcpStream) -> Option<Frame> {
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// The first frame of `kind`, skipping the daemon's SETTINGS and the like.
fn next_of(tcp: &mut TcpStream, kind: u8) -> Option<Frame> {
    loop {
        let frame = read_frame(tcp)?;
        if frame.kind == kind {
            return Some(frame);
        }
    }
}

fn code(frame: &Frame, at: usize) -> u32 {
    u32::from_be_bytes(frame.payload[at..at + 4].try_into().unwrap())
}

/// The daemon ends the connection with GOAWAY and `want`, then closes it.
fn assert_goaway(tcp: &mut TcpStream, want: u32, what: &str) {
    let goaway = next_of(tcp, GOAWAY).unwrap_or_else(|| panic!("{what}: no GOAWAY"));
    assert_eq!(code(&goaway, 4), want, "{what}: GOAWAY's error code");
    assert!(
        std::iter::from_fn(|| read_frame(tcp)).count() < 10,
        "{what}: the connection stayed open"
    );
}

#[test]
fn protocol_errors_end_the_connection_with_their_code() {
    let (_dir, daemon) = fresh_daemon();

    // Not HTTP/2 at all.
    let mut tcp = TcpStream::connect(&daemon.grpc_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_goaway(&mut tcp, PROTOCOL_ERROR, "an HTTP/1.1 request");

    // A frame over the 16,384 bytes SETTINGS allows.
    let mut tcp = client(&daemon.grpc_addr);
    let mut oversized = (20_000u32).to_be_bytes()[1..].to_vec();
    oversized.extend([0x0, 0x0, 0, 0, 0, 1]);
    tcp.write_all(&oversized).unwrap();
    assert_goaway(&mut tcp, FRAME_SIZE_ERROR, "an oversized frame");

    // A header block that is not HPACK: index 0 does not exist.
    let mut tcp = client(&daemon.grpc_addr);
    tcp.write_all(&frame(HEADERS, 0x5, 1, &[0x80])).unwrap();
    assert_goaway(&mut tcp, COMPRESSION_ERROR, "a bad header block");
}

#[test]
fn a_client_that_cancels_every_stream_it_opens_is_cut_off() {
    let (_dir, daemon) = fresh_daemon();
    let mut tcp = client(&daemon.grpc_addr);
    // POST, http (static table: 3 and 6), and :path as a literal with its
    // name from the static table (4).
    let path = b"/grpc.health.v1.Health/Check";
    let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
    block.extend(path);
    let mut burst = Vec::new();
    for i in 0..1_100u32 {
        let stream = 2 * i + 1;
        burst.extend(frame(HEADERS, 0x4, stream, &block));
        burst.extend(frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    tcp.write_all(&burst).unwrap();
    assert_goaway(
        &mut tcp,
        ENHANCE_YOUR_CALM,
        "a thousand streams opened and reset",
    );
}

#[test]
fn a_malformed_request_resets_its_stream_and_the_connection_goes_on() {
    let (_dir, daemon) = fresh_daemon();
    let mut tcp = client(&daemon.grpc_addr);
    // POST with a scheme and no :path (static table: 3 and 6).
    tcp.write_all(&frame(HEADERS, 0x5, 1, &[0x83, 0x86]))
        .unwrap();
    let reset = next_of(&mut tcp, RST_STREAM).expect("RST_STREAM");
    assert_eq!((reset.stream, code(&reset, 0)), (1, PROTOCOL_ERROR));
    // Still served: a PING comes back acknowledged, with its payload.
    tcp.write_all(&frame(PING, 0, 0, b"duo-ping")).unwrap();
    let pong = next_of(&mut tcp, PING).expect("PING ACK");
    assert_eq!((pong.flags, &pong.payload[..]), (0x1, &b"duo-ping"[..]));
}

#[tokio::test]
async fn a_response_larger_than_the_clients_window_arrives_whole() {
    let (_dir, daemon) = fresh_daemon();
    let mut admin = daemon.clients().await;
    for i in 0..40 {
        let name = format!("model-{i:02}-{}", "x".repeat(200));
        admin
            .models
            .create_model(CreateModelRequest {
                model: Some(mk::model(&name)),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let everything = admin
        .models
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // A client that takes 1 KiB at a time: the 10 KiB answer comes in
    // pieces, each after the client opened its window again.
    let narrow = Endpoint::from_shared(format!("http://{}", daemon.grpc_addr))
        .unwrap()
        .initial_stream_window_size(Some(1024))
        .connect()
        .await
        .unwrap();
    let mut narrow = Clients::new(narrow, Some(daemon.token()));
    let through_narrow = narrow
        .models
        .list_models(ListModelsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(everything.models.len(), 40);
    assert_eq!(through_narrow, everything);
}

/// tonic's `Request::set_timeout` sends `grpc-timeout` and leaves keeping
/// it to the server, so what ends the stream here is the daemon.
#[tokio::test]
async fn a_stream_ends_with_deadline_exceeded_when_its_grpc_timeout_passes() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let mut request = tonic::Request::new(duofleet_proto::v1::WatchFleetRequest {});
    request.set_timeout(Duration::from_millis(700));
    let started = std::time::Instant::now();
    let mut events = c.fleet.watch_fleet(request).await.unwrap().into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match events.message().await {
                Ok(Some(_event)) => continue,
                Ok(None) => panic!("the stream ended with OK, not at its deadline"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the daemon ended the stream at its deadline");
    assert_eq!(ended.code(), tonic::Code::DeadlineExceeded, "{ended:?}");
    assert!(ended.message().contains("grpc-timeout"), "{ended:?}");
    assert!(started.elapsed() >= Duration::from_millis(700));

    // The connection goes on: a call with a deadline it meets is answered.
    let mut request = tonic::Request::new(ListModelsRequest::default());
    request.set_timeout(Duration::from_secs(10));
    c.models
        .list_models(request)
        .await
        .expect("answered within its deadline");
}

#[tokio::test]
async fn a_malformed_grpc_timeout_is_refused_naming_the_header() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let mut request = tonic::Request::new(ListModelsRequest::default());
    request
        .metadata_mut()
        .insert("grpc-timeout", "soon".parse().unwrap());
    let refused = c.models.list_models(request).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("grpc-timeout: must be 1 to 8 digits followed by a unit")
            && refused.message().contains("\"soon\""),
        "{refused:?}"
    );
}
