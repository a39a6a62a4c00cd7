//! Admission on the gRPC listener, so that unauthenticated clients cannot
//! exhaust the daemon:
//! - at most `--max-connections` open connections, the last
//!   `OPERATOR_RESERVE` of them for operators only, so that an admin call
//!   gets through while agents hold every other slot;
//! - when every slot is taken, a newcomer takes the place of a connection
//!   that has not authenticated yet: the oldest one from the client
//!   address that holds the most. A flood of anonymous connections from
//!   one address thus only ever evicts its own, and cannot keep an
//!   operator (or an agent) from another address out. Only when every open
//!   connection has authenticated does a newcomer wait for a slot;
//! - a connection that sends nothing within the first-byte timeout (no TLS
//!   ClientHello, no HTTP/2 preface) is closed;
//! - a connection whose first authenticated request has not arrived within
//!   the authentication deadline is closed, however busy it keeps itself
//!   (PINGs, a byte at a time): a deadline, not an idle timer.
//!
//! After that, HTTP/2 keepalive drops peers that stop answering.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Slots of `--max-connections` kept for operator tokens.
pub const OPERATOR_RESERVE: usize = 16;
/// How long a connection on a reserved slot may take to authenticate.
const RESERVED_AUTH_DEADLINE: Duration = Duration::from_secs(1);

/// What the interceptors know of each open connection, by peer address.
#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<SocketAddr, Arc<Conn>>>,
    /// Connections that have not authenticated yet, by client address,
    /// oldest first: the candidates for eviction.
    pending: Mutex<HashMap<IpAddr, VecDeque<Arc<Conn>>>>,
    evictions: Mutex<EvictionLog>,
}

#[derive(Default)]
struct EvictionLog {
    since_logged: u64,
    logged: Option<Instant>,
}

struct Conn {
    authenticated: AtomicBool,
    /// Admitted into the operators' reserve: other callers are refused.
    operators_only: bool,
    /// A newcomer took its place: the connection is closed.
    evicted: AtomicBool,
    /// Wakes the connection's reader, so that an eviction takes effect.
    reader: Mutex<Option<Waker>>,
}

impl Conn {
    fn new(operators_only: bool) -> Conn {
        Conn {
            authenticated: AtomicBool::new(false),
            operators_only,
            evicted: AtomicBool::new(false),
            reader: Mutex::new(None),
        }
    }
}

/// A caller on a reserved slot that is not an operator.
#[derive(Debug, thiserror::Error)]
#[error(
    "duofleetd is at --max-connections; its last {OPERATOR_RESERVE} connections are kept for operators"
)]
pub struct Reserved;

impl Connections {
    /// A request on the connection from `peer` authenticated; `operator`
    /// says whether its token is an admin or viewer token.
    pub fn authenticated(&self, peer: Option<SocketAddr>, operator: bool) -> Result<(), Reserved> {
        let Some(peer) = peer else { return Ok(()) };
        let conn = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .cloned();
        if let Some(conn) = conn {
            if conn.operators_only && !operator {
                return Err(Reserved);
            }
            if !conn.authenticated.swap(true, Ordering::Relaxed) {
                self.settled(peer.ip(), &conn);
            }
        }
        Ok(())
    }

    fn arrived(&self, peer: SocketAddr, conn: &Arc<Conn>) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, conn.clone());
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer.ip())
            .or_default()
            .push_back(conn.clone());
    }

    /// `conn` is no longer a candidate for eviction (authenticated, or closed).
    fn settled(&self, ip: IpAddr, conn: &Arc<Conn>) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = pending.get_mut(&ip) {
            queue.retain(|c| !Arc::ptr_eq(c, conn));
            if queue.is_empty() {
                pending.remove(&ip);
            }
        }
    }

    fn closed(&self, peer: SocketAddr, conn: &Arc<Conn>) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&peer);
        if !conn.authenticated.load(Ordering::Relaxed) && !conn.evicted.load(Ordering::Relaxed) {
            self.settled(peer.ip(), conn);
        }
    }

    /// Closes the oldest unauthenticated connection of the client address
    /// that holds the most of them, so a flood from one address evicts
    /// only its own connections; false when every open connection has
    /// authenticated.
    fn evict_one(&self) -> bool {
        let victim = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let Some(ip) = pending
                .iter()
                .max_by_key(|(_, queue)| queue.len())
                .map(|(ip, _)| *ip)
            else {
                return false;
            };
            let queue = pending.get_mut(&ip).expect("just found");
            let victim = queue.pop_front();
            if queue.is_empty() {
                pending.remove(&ip);
            }
            match victim {
                Some(victim) => victim,
                None => return false,
            }
        };
        victim.evicted.store(true, Ordering::Relaxed);
        if let Some(reader) = victim
            .reader
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            reader.wake();
        }
        self.log_eviction();
        true
    }

    /// One warning a minute at most, with the count.
    fn log_eviction(&self) {
        let mut log = self.evictions.lock().unwrap_or_else(|e| e.into_inner());
        log.since_logged += 1;
        if log
            .logged
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            tracing::warn!(
                evicted = log.since_logged,
                "every connection slot is taken: unauthenticated connections are closed, oldest first, to admit new ones (see --max-connections)"
            );
            log.since_logged = 0;
            log.logged = Some(Instant::now());
        }
    }
}

/// An accepted connection, holding its place until it closes.
pub struct Admitted {
    io: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Until the first byte arrives.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Until the first authenticated request.
    auth_deadline: Option<Pin<Box<Sleep>>>,
    conn: Arc<Conn>,
    peer: Option<SocketAddr>,
    connections: Arc<Connections>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(peer) = self.peer {
            self.connections.closed(peer, &self.conn);
        }
    }
}

/// The deadlines of an admitted connection.
#[derive(Clone, Copy)]
pub struct Deadlines {
    pub first_byte: Duration,
    /// None: the listener has no authentication (HTTP).
    pub authenticated: Option<Duration>,
}

/// Accepts connections from `listener`: at most `max` open, the oldest
/// unauthenticated one giving way to a newcomer when all are taken.
pub fn admit(
    listener: TcpListener,
    max: usize,
    deadlines: Deadlines,
    connections: Arc<Connections>,
) -> ReceiverStream<io::Result<Admitted>> {
    admit_with_reserve(
        listener,
        max,
        OPERATOR_RESERVE.min(max / 2),
        deadlines,
        connections,
        true,
    )
}

fn admit_with_reserve(
    listener: TcpListener,
    max: usize,
    reserve: usize,
    deadlines: Deadlines,
    connections: Arc<Connections>,
    evict: bool,
) -> ReceiverStream<io::Result<Admitted>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            // Without eviction, a full house waits in the kernel's backlog.
            let reserved = if evict {
                None
            } else {
                match slots.clone().acquire_owned().await {
                    Ok(permit) => Some(permit),
                    Err(_) => break,
                }
            };
            let (io, peer) = match listener.accept().await {
                Ok((io, peer)) => (io, peer),
                Err(error) => {
                    // e.g. EMFILE: wait instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match reserved {
                Some(permit) => permit,
                None => match slots.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => match make_room(&slots, &connections).await {
                        Some(permit) => permit,
                        None => break,
                    },
                },
            };
            let _ = io.set_nodelay(true);
            let operators_only = slots.available_permits() < reserve;
            let conn = Arc::new(Conn::new(operators_only));
            // A reserved slot is given back fast unless an operator uses it.
            let authenticate_within = if operators_only {
                deadlines
                    .authenticated
                    .map(|d| d.min(RESERVED_AUTH_DEADLINE))
            } else {
                deadlines.authenticated
            };
            connections.arrived(peer, &conn);
            let admitted = Admitted {
                io,
                _permit: permit,
                deadline: Some(Box::pin(tokio::time::sleep(deadlines.first_byte))),
                auth_deadline: authenticate_within.map(|d| Box::pin(tokio::time::sleep(d))),
                conn,
                peer: Some(peer),
                connections: connections.clone(),
            };
            if tx.send(Ok(admitted)).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Evicts until a slot comes free: an evicted connection gives its slot
/// back as soon as its task next reads, which a connection stuck writing
/// may not do at once, so after a short wait the next one goes. With no
/// connection left to evict, waits for one to close.
async fn make_room(
    slots: &Arc<Semaphore>,
    connections: &Connections,
) -> Option<OwnedSemaphorePermit> {
    loop {
        if !connections.evict_one() {
            return slots.clone().acquire_owned().await.ok();
        }
        let freed = tokio::time::timeout(Duration::from_millis(100), slots.clone().acquire_owned());
        if let Ok(permit) = freed.await {
            return permit.ok();
        }
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.conn.evicted.load(Ordering::Relaxed) {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to admit a newer connection: every slot was taken",
            )));
        }
        if this.auth_deadline.is_some() {
            if this.conn.authenticated.load(Ordering::Relaxed) {
                this.auth_deadline = None;
            } else {
                let mut reader = this.conn.reader.lock().unwrap_or_else(|e| e.into_inner());
                if !reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *reader = Some(cx.waker().clone());
                }
            }
        }
        if this
            .auth_deadline
            .as_mut()
            .is_some_and(|d| d.as_mut().poll(cx).is_ready())
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no authenticated request in time",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    )))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// The HTTP listener (/healthz, /readyz, /metrics) with its own cap: at
/// most `max` connections (more wait in the kernel's backlog), the first
/// byte within `first_byte`, and each request's headers within
/// `header_read`, which also bounds how long an idle keep-alive connection
/// is kept. A response being streamed has no deadline.
pub struct HttpListener {
    incoming: ReceiverStream<io::Result<Admitted>>,
    header_read: Duration,
}

impl HttpListener {
    pub fn new(
        listener: TcpListener,
        max: usize,
        first_byte: Duration,
        header_read: Duration,
    ) -> HttpListener {
        let incoming = admit_with_reserve(
            listener,
            max,
            0,
            Deadlines {
                first_byte,
                authenticated: None,
            },
            Arc::new(Connections::default()),
            false,
        );
        HttpListener {
            incoming,
            header_read,
        }
    }

    /// Serves `router` on every admitted connection until `shutdown`; then
    /// lets requests in progress finish.
    /// With `tls`, every connection is HTTPS: the handshake must finish
    /// within the header-read time.
    pub async fn serve(
        mut self,
        router: axum::Router,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()>,
    ) {
        use tokio_stream::StreamExt;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::pin!(shutdown);
        loop {
            let admitted = tokio::select! {
                next = self.incoming.next() => match next {
                    Some(Ok(admitted)) => admitted,
                    Some(Err(_)) => continue,
                    None => break,
                },
                () = &mut shutdown => break,
            };
            let router = router.clone();
            let stopped = stopped.clone();
            let header_read = self.header_read;
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve_connection(admitted, router, header_read, stopped).await,
                    Some(acceptor) => {
                        let handshake =
                            tokio::time::timeout(header_read, acceptor.accept(admitted)).await;
                        if let Ok(Ok(stream)) = handshake {
                            serve_connection(stream, router, header_read, stopped).await;
                        }
                    }
                }
            });
        }
        let _ = stop.send(true);
    }
}

/// One HTTP/1.1 connection, until it ends or the server stops.
async fn serve_connection<I>(
    io: I,
    router: axum::Router,
    header_read: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let service = hyper_util::service::TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        _ = async { stopped.wait_for(|stop| *stop).await.map(drop) } => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
