//! Admission on the gRPC listener, so that unauthenticated clients cannot
//! exhaust the daemon:
//! - at most `--max-connections` open connections (more wait in the
//!   kernel's backlog), the last `OPERATOR_RESERVE` of them for operators
//!   only, so that an admin call gets through while agents and anonymous
//!   clients hold every other slot;
//! - a connection that sends nothing within the first-byte timeout (no TLS
//!   ClientHello, no HTTP/2 preface) is closed;
//! - a connection whose first authenticated request has not arrived within
//!   the authentication deadline is closed, however busy it keeps itself
//!   (PINGs, a byte at a time): a deadline, not an idle timer.
//!
//! After that, HTTP/2 keepalive drops peers that stop answering.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
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
}

struct Conn {
    authenticated: AtomicBool,
    /// Admitted into the operators' reserve: other callers are refused.
    operators_only: bool,
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
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conn) = open.get(&peer) {
            if conn.operators_only && !operator {
                return Err(Reserved);
            }
            conn.authenticated.store(true, Ordering::Relaxed);
        }
        Ok(())
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
            self.connections
                .open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&peer);
        }
    }
}

/// The deadlines of an admitted connection.
#[derive(Clone, Copy)]
pub struct Deadlines {
    pub first_byte: Duration,
    pub authenticated: Duration,
}

/// Accepts connections from `listener` while fewer than `max` are open.
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
    )
}

fn admit_with_reserve(
    listener: TcpListener,
    max: usize,
    reserve: usize,
    deadlines: Deadlines,
    connections: Arc<Connections>,
) -> ReceiverStream<io::Result<Admitted>> {
    let (tx, rx) = mpsc::channel(16);
    let slots = Arc::new(Semaphore::new(max));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break;
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
            let _ = io.set_nodelay(true);
            let operators_only = slots.available_permits() < reserve;
            let conn = Arc::new(Conn {
                authenticated: AtomicBool::new(false),
                operators_only,
            });
            // A reserved slot is given back fast unless an operator uses it.
            let authenticate_within = if operators_only {
                deadlines.authenticated.min(RESERVED_AUTH_DEADLINE)
            } else {
                deadlines.authenticated
            };
            connections
                .open
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(peer, conn.clone());
            let admitted = Admitted {
                io,
                _permit: permit,
                deadline: Some(Box::pin(tokio::time::sleep(deadlines.first_byte))),
                auth_deadline: Some(Box::pin(tokio::time::sleep(authenticate_within))),
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

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.auth_deadline.is_some() && this.conn.authenticated.load(Ordering::Relaxed) {
            this.auth_deadline = None;
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
/// most `max` connections, the first byte within `first_byte`, and each
/// connection closed `lifetime` after it opened, so that a client sending
/// partial requests holds a slot that long at most (Prometheus and probes
/// simply reconnect).
pub struct HttpListener {
    incoming: ReceiverStream<io::Result<Admitted>>,
    local: SocketAddr,
}

impl HttpListener {
    pub fn new(
        listener: TcpListener,
        max: usize,
        first_byte: Duration,
        lifetime: Duration,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let incoming = admit_with_reserve(
            listener,
            max,
            0,
            Deadlines {
                first_byte,
                authenticated: lifetime,
            },
            Arc::new(Connections::default()),
        );
        Ok(HttpListener { incoming, local })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Admitted;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.incoming.next().await {
                Some(Ok(admitted)) => {
                    let peer = admitted.peer.unwrap_or(self.local);
                    return (admitted, peer);
                }
                Some(Err(_)) => continue,
                // The accept task ended: nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
