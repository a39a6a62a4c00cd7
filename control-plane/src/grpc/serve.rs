//! The gRPC port's HTTP/2 server, on `h2` directly.
//!
//! An agent's stream (AgentService.Connect) is served inside its
//! connection's task: a new configuration wakes that one task, which
//! queues the shared bytes as a DATA frame and writes them, and the ack
//! that comes back is read and handled by the same task. Every other call
//! goes to tonic's routes in a task of its own, as hyper would run it.
//!
//! Under tonic's own server each agent stream took two tasks (hyper's
//! stream task and the connection's), five body wrappers, tonic's codec
//! and hyper's keepalive bookkeeping on every frame. Without them the
//! daemon spends 10 to 25 % less CPU per change at 10,000 agents (the
//! README's benchmark).

use super::agent::AgentApi;
use super::wake::{Source, Wakes};
use crate::admission::Admitted;
use crate::metrics::RpcMetrics;
use crate::server::wait_for;
use bytes::Bytes;
use futures_util::stream::{Stream, StreamExt};
use h2::server::SendResponse;
use h2::{Ping, PingPong, RecvStream, SendStream};
use http_body::Body as _;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, Sleep};
use tonic::codegen::http::{self, Extensions};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::Service;
use tracing::Instrument;

/// The one method served inside the connection's task.
pub const CONNECT_PATH: &str = "/duofleet.v1.AgentService/Connect";

/// The largest header block a client may send: gRPC metadata is small.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How many times a connection's task goes round (sessions, then the
/// socket) in one turn before it yields to other connections.
const TURNS_PER_POLL: usize = 16;

pub struct Settings {
    pub max_streams_per_connection: u32,
    /// What a peer may send on a stream ahead of what has been read; the
    /// connection's window is twice it.
    pub flow_window: u32,
    /// Ping interval, and how long a ping may go unanswered.
    pub keepalive: Duration,
}

type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub struct GrpcServer {
    routes: RpcMetrics<Routes>,
    agents: Arc<AgentApi>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: Settings,
    shutdown: watch::Receiver<bool>,
    streams: Arc<AtomicUsize>,
}

/// One open stream, counted until dropped.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(streams: &Arc<AtomicUsize>) -> Open {
        streams.fetch_add(1, Ordering::SeqCst);
        Open(streams.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a connection came in, as tonic's handlers read it (`remote_addr`,
/// `peer_certs`).
#[derive(Clone)]
enum ConnectInfo {
    Tcp(TcpConnectInfo),
    Tls(TlsConnectInfo<TcpConnectInfo>),
}

impl ConnectInfo {
    fn extensions(&self) -> Extensions {
        let mut extensions = Extensions::new();
        match self {
            ConnectInfo::Tcp(info) => {
                extensions.insert(info.clone());
            }
            ConnectInfo::Tls(info) => {
                extensions.insert(info.clone());
            }
        }
        extensions
    }

    fn peer(&self) -> Option<std::net::SocketAddr> {
        match self {
            ConnectInfo::Tcp(info) => info.remote_addr(),
            ConnectInfo::Tls(info) => info.get_ref().remote_addr(),
        }
    }
}

impl GrpcServer {
    pub fn new(
        routes: RpcMetrics<Routes>,
        agents: Arc<AgentApi>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        settings: Settings,
        shutdown: watch::Receiver<bool>,
    ) -> GrpcServer {
        GrpcServer {
            routes,
            agents,
            tls,
            settings,
            shutdown,
            streams: Arc::default(),
        }
    }

    /// Streams open on the port: agent sessions and calls, each counted
    /// until its last frame is queued.
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Serves `incoming` until shutdown; then each connection finishes
    /// (GOAWAY), and this returns once all have closed.
    pub async fn serve(self: Arc<Self>, incoming: impl Stream<Item = io::Result<Admitted>>) {
        let (open, mut all_closed) = mpsc::channel::<()>(1);
        {
            let mut incoming = pin!(incoming);
            let mut shutdown = pin!(wait_for(self.shutdown.clone()));
            loop {
                let io = tokio::select! {
                    () = &mut shutdown => break,
                    io = incoming.next() => match io {
                        Some(Ok(io)) => io,
                        Some(Err(error)) => {
                            tracing::debug!(%error, "accepting a connection failed");
                            continue;
                        }
                        None => break,
                    },
                };
                let server = self.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    server.connection(io).await;
                    drop(open);
                });
            }
        }
        drop(open);
        let _ = all_closed.recv().await;
    }

    /// Each step is boxed, and nothing is held across the session but
    /// the session: a task is allocated at the size of its largest state,
    /// and a TLS handshake's is several KiB that a plain connection, or
    /// one past its handshake, should not hold for hours.
    async fn connection(&self, io: Admitted) {
        let tcp = io.connect_info();
        let drive = match &self.tls {
            None => Box::pin(self.drive(io, ConnectInfo::Tcp(tcp))) as BoxFuture<'_>,
            Some(acceptor) => {
                let tls = match Box::pin(acceptor.accept(io)).await {
                    Ok(tls) => tls,
                    Err(error) => {
                        tracing::debug!(peer = ?tcp.remote_addr(), %error, "TLS handshake failed");
                        return;
                    }
                };
                let info = ConnectInfo::Tls(tls.connect_info());
                Box::pin(self.drive(tls, info))
            }
        };
        drive.await
    }

    /// One connection: its agent sessions, the socket and its keepalive,
    /// all polled by this one task.
    async fn drive<T>(&self, io: T, info: ConnectInfo)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let settings = &self.settings;
        let handshake = h2::server::Builder::new()
            .initial_window_size(settings.flow_window)
            .initial_connection_window_size(2 * settings.flow_window)
            .max_concurrent_streams(settings.max_streams_per_connection)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .handshake::<_, Bytes>(io);
        let mut conn = match Box::pin(handshake).await {
            Ok(conn) => conn,
            Err(error) => {
                tracing::debug!(peer = ?info.peer(), %error, "HTTP/2 handshake failed");
                return;
            }
        };
        let mut keepalive = conn
            .ping_pong()
            .map(|ping| Keepalive::new(ping, settings.keepalive));
        let wakes = Arc::new(Wakes::default());
        let socket = Source::new(&wakes);
        let timer = Source::new(&wakes);
        let stop = Source::new(&wakes);
        let mut sessions: Vec<(BoxFuture<'static>, Source)> = Vec::new();
        // Polled when it wakes `stop`: once to register, then at shutdown.
        let mut shutdown = Some(Box::pin(wait_for(self.shutdown.clone())));
        let ended = poll_fn(|cx| {
            wakes.task.register(cx.waker());
            wakes.running.store(true, Ordering::SeqCst);
            for _ in 0..TURNS_PER_POLL {
                wakes.any.store(false, Ordering::SeqCst);
                if let Some(stopped) = &mut shutdown
                    && stop.take()
                    && stopped.as_mut().poll(&mut stop.context()).is_ready()
                {
                    shutdown = None;
                    conn.graceful_shutdown();
                    socket.again();
                }
                if let Some(keepalive) = &mut keepalive
                    && timer.take()
                    && keepalive.poll_dead(&mut timer.context()).is_ready()
                {
                    return Poll::Ready(Err("no answer to a keepalive ping"));
                }
                // Sessions first: what they queue is written below.
                sessions.retain_mut(|(session, source)| {
                    !source.take() || session.as_mut().poll(&mut source.context()).is_pending()
                });
                // Once per turn: a socket out of tokio's budget wakes at
                // once, and the turns bound how often it is polled before
                // this task yields.
                if socket.take() {
                    let cx = &mut socket.context();
                    while let Poll::Ready(stream) = conn.poll_accept(cx) {
                        match stream {
                            Some(Ok((request, respond))) => {
                                if let Some(session) = self.dispatch(request, respond, &info) {
                                    let source = Source::new(&wakes);
                                    wakes.any.store(true, Ordering::SeqCst);
                                    sessions.push((session, source));
                                }
                            }
                            Some(Err(error)) => {
                                tracing::debug!(%error, "HTTP/2 connection failed");
                                return Poll::Ready(Ok(()));
                            }
                            None => return Poll::Ready(Ok(())),
                        }
                    }
                }
                if !wakes.any.load(Ordering::SeqCst) {
                    wakes.running.store(false, Ordering::SeqCst);
                    // Anything woken after the look above, while this task
                    // was still running, did not wake it: look again.
                    if !wakes.any.load(Ordering::SeqCst) {
                        return Poll::Pending;
                    }
                    wakes.running.store(true, Ordering::SeqCst);
                }
            }
            wakes.running.store(false, Ordering::SeqCst);
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await;
        if let Err(why) = ended {
            tracing::debug!(peer = ?info.peer(), why, "closing the connection");
        }
    }

    /// An agent's stream becomes a session of this connection; any other
    /// call runs in a task of its own.
    fn dispatch(
        &self,
        request: http::Request<RecvStream>,
        respond: SendResponse<Bytes>,
        info: &ConnectInfo,
    ) -> Option<BoxFuture<'static>> {
        let open = Open::new(&self.streams);
        if request.uri().path() == CONNECT_PATH {
            let session = self
                .agents
                .clone()
                .session(request, respond, info.extensions());
            return Some(Box::pin(async move {
                session.await;
                drop(open);
            }));
        }
        let call = call(self.routes.clone(), request, respond, info.extensions());
        tokio::spawn(async move {
            call.await;
            drop(open);
        });
        None
    }
}

/// One call to tonic's routes: the request's body read from h2, the
/// response written to it, and the call dropped if the client cancels.
async fn call(
    mut routes: RpcMetrics<Routes>,
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    extensions: Extensions,
) {
    let span = rpc_span(request.uri().path());
    let (mut parts, recv) = request.into_parts();
    parts.extensions.extend(extensions);
    let request = http::Request::from_parts(parts, RecvBody::new(recv));
    let handled = async {
        let ready = poll_fn(|cx| Service::<http::Request<RecvBody>>::poll_ready(&mut routes, cx));
        if ready.await.is_err() {
            return None;
        }
        let mut response = pin!(routes.call(request));
        poll_fn(|cx| {
            if respond.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            response.as_mut().poll(cx).map(Result::ok)
        })
        .await
    }
    .instrument(span)
    .await;
    let Some(response) = handled else {
        return;
    };
    let (parts, body) = response.into_parts();
    let end = http_body::Body::is_end_stream(&body);
    let Ok(send) = respond.send_response(http::Response::from_parts(parts, ()), end) else {
        return;
    };
    if !end {
        pipe(body, send).await;
    }
}

/// The span of one call, named after its method.
pub(super) fn rpc_span(path: &str) -> tracing::Span {
    tracing::info_span!("rpc", otel.name = %path, rpc.system = "grpc")
}

/// Writes a response body to its stream, a frame at a time as the peer
/// makes room, until it ends or the peer cancels.
async fn pipe(body: tonic::body::Body, mut send: SendStream<Bytes>) {
    let mut body = pin!(body);
    loop {
        let next = poll_fn(|cx| {
            if ready!(poll_room(&mut send, cx)).is_err() {
                return Poll::Ready(None);
            }
            body.as_mut().poll_frame(cx).map(Some)
        })
        .await;
        let frame = match next {
            None => return,
            Some(None) => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(error))) => {
                tracing::debug!(%error, "a response body failed");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = http_body::Body::is_end_stream(&*body);
                if send.send_data(data, end).is_err() || end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = send.send_trailers(trailers);
                }
                return;
            }
        }
    }
}

/// Ready once the stream may take more data (what was queued has gone
/// out), or with an error once the peer reset it. Like hyper: one byte is
/// asked for, and a whole message is queued on any room.
pub(super) fn poll_room(
    send: &mut SendStream<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), ()>> {
    if send.poll_reset(cx).is_ready() {
        return Poll::Ready(Err(()));
    }
    send.reserve_capacity(1);
    while send.capacity() == 0 {
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Poll::Ready(Err(())),
        }
    }
    Poll::Ready(Ok(()))
}

/// A request's body as tonic reads it; what is read is released to the
/// peer's flow-control window at once.
struct RecvBody {
    recv: RecvStream,
    data_done: bool,
}

impl RecvBody {
    fn new(recv: RecvStream) -> RecvBody {
        RecvBody {
            recv,
            data_done: false,
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(http_body::Frame::data(data))));
                }
                Some(Err(error)) => return Poll::Ready(Some(Err(error))),
                None => this.data_done = true,
            }
        }
        this.recv.poll_trailers(cx).map(|trailers| {
            trailers
                .transpose()
                .map(|t| t.map(http_body::Frame::trailers))
        })
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

/// HTTP/2 keepalive: a ping every interval, and the connection is dead if
/// one goes unanswered for as long again.
struct Keepalive {
    ping: PingPong,
    every: Duration,
    timer: Pin<Box<Sleep>>,
    awaiting_pong: bool,
}

impl Keepalive {
    fn new(ping: PingPong, every: Duration) -> Keepalive {
        Keepalive {
            ping,
            every,
            timer: Box::pin(tokio::time::sleep(every)),
            awaiting_pong: false,
        }
    }

    fn poll_dead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.awaiting_pong {
            match self.ping.poll_pong(cx) {
                Poll::Ready(Ok(_)) => {
                    self.awaiting_pong = false;
                    self.timer.as_mut().reset(Instant::now() + self.every);
                }
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => {}
            }
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.awaiting_pong || self.ping.send_ping(Ping::opaque()).is_err() {
                return Poll::Ready(());
            }
            self.awaiting_pong = true;
            self.timer.as_mut().reset(Instant::now() + self.every);
            // Registers for the pong.
            if self.ping.poll_pong(cx).is_ready() {
                self.awaiting_pong = false;
            }
        }
        Poll::Pending
    }
}
