//! The gRPC port's server: connections accepted (and TLS), each served
//! by one task with this crate's HTTP/2 (`http2`).
//!
//! An agent's stream (AgentService.Connect) is served inside its
//! connection's task: a new configuration wakes that one task, which
//! writes the shared bytes as a DATA frame, and the ack that comes back is
//! read and handled by the same task. Every other call goes to tonic's
//! routes in a task of its own, as hyper would run it.

use super::agent::AgentApi;
use super::deadline::Deadline;
use super::http2::{self, Reset, StreamIo};
use crate::admission::Admitted;
use crate::metrics::RpcMetrics;
use crate::server::wait_for;
use bytes::Bytes;
use futures_util::stream::{Stream, StreamExt};
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
use tonic::codegen::http::{self, Extensions};
use tonic::service::Routes;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::Service;
use tracing::Instrument;

/// Every call but an agent's stream: tonic's routes, each call held to
/// its deadline and counted.
pub type Calls = RpcMetrics<Deadline<Routes>>;

/// The one method served inside the connection's task.
pub const CONNECT_PATH: &str = "/duofleet.v1.AgentService/Connect";

/// The largest header block a client may send: gRPC metadata is small.
const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

pub struct Settings {
    pub max_streams_per_connection: u32,
    /// What a peer may send on a stream ahead of what has been read; the
    /// connection's window is twice it.
    pub flow_window: u32,
    /// A ping when the peer has sent nothing for this long, and how long
    /// it may go unanswered.
    pub keepalive: Duration,
}

type BoxFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub struct GrpcServer {
    routes: Calls,
    agents: Arc<AgentApi>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: http2::Settings,
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
        routes: Calls,
        agents: Arc<AgentApi>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        settings: Settings,
        shutdown: watch::Receiver<bool>,
    ) -> GrpcServer {
        GrpcServer {
            routes,
            agents,
            tls,
            settings: http2::Settings {
                max_streams: settings.max_streams_per_connection,
                flow_window: settings.flow_window,
                keepalive: settings.keepalive,
                max_header_list: MAX_HEADER_LIST_BYTES,
            },
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
    /// all served by this one task.
    async fn drive<T>(&self, io: T, info: ConnectInfo)
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let ended = http2::serve(
            io,
            &self.settings,
            wait_for(self.shutdown.clone()),
            |request, stream| self.dispatch(request, stream, &info),
        )
        .await;
        if let Err(error) = ended {
            tracing::debug!(peer = ?info.peer(), %error, "closing the connection");
        }
    }

    /// An agent's stream becomes a session of this connection; any other
    /// call runs in a task of its own.
    fn dispatch(
        &self,
        request: http::Request<()>,
        stream: StreamIo,
        info: &ConnectInfo,
    ) -> Option<BoxFuture<'static>> {
        let open = Open::new(&self.streams);
        if request.uri().path() == CONNECT_PATH {
            let session = self
                .agents
                .clone()
                .session(request, stream, info.extensions());
            return Some(Box::pin(async move {
                session.await;
                drop(open);
            }));
        }
        let call = call(self.routes.clone(), request, stream, info.extensions());
        tokio::spawn(async move {
            call.await;
            drop(open);
        });
        None
    }
}

/// One call to tonic's routes: the request's body read from the stream,
/// the response written to it, and the call dropped if the client cancels.
async fn call(
    mut routes: Calls,
    request: http::Request<()>,
    stream: StreamIo,
    extensions: Extensions,
) {
    let span = rpc_span(request.uri().path());
    let stream = Arc::new(stream);
    let (mut parts, ()) = request.into_parts();
    parts.extensions.extend(extensions);
    let request = http::Request::from_parts(parts, RecvBody::new(stream.clone()));
    let handled = async {
        let ready = poll_fn(|cx| Service::<http::Request<RecvBody>>::poll_ready(&mut routes, cx));
        if ready.await.is_err() {
            return None;
        }
        let mut response = pin!(routes.call(request));
        poll_fn(|cx| {
            if stream.poll_reset(cx).is_ready() {
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
    stream.send_response(parts, end);
    if !end {
        pipe(body, &stream).await;
    }
}

/// The span of one call, named after its method.
pub(super) fn rpc_span(path: &str) -> tracing::Span {
    tracing::info_span!("rpc", otel.name = %path, rpc.system = "grpc")
}

/// Writes a response body to its stream, a frame at a time as the
/// connection takes them, until it ends or the peer cancels.
async fn pipe(body: tonic::body::Body, stream: &StreamIo) {
    let mut body = pin!(body);
    loop {
        let next = poll_fn(|cx| {
            if ready!(stream.poll_room(cx)).is_err() {
                return Poll::Ready(None);
            }
            body.as_mut().poll_frame(cx).map(Some)
        })
        .await;
        let frame = match next {
            None => return,
            Some(None) => {
                stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Some(Err(error))) => {
                // The stream is reset when this lets go of it unfinished.
                tracing::debug!(%error, "a response body failed");
                return;
            }
            Some(Some(Ok(frame))) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = http_body::Body::is_end_stream(&*body);
                stream.send_data(data, end);
                if end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers);
                }
                return;
            }
        }
    }
}

/// A request's body as tonic reads it; what is read is given back to the
/// peer's flow-control window.
struct RecvBody {
    stream: Arc<StreamIo>,
    done: bool,
}

impl RecvBody {
    fn new(stream: Arc<StreamIo>) -> RecvBody {
        RecvBody {
            stream,
            done: false,
        }
    }
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = Reset;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Reset>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(this.stream.poll_data(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
            Some(Err(reset)) => Poll::Ready(Some(Err(reset))),
            None => {
                this.done = true;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.stream.is_end_stream()
    }
}
