//! A TCP proxy the test controls, to put a network partition between agents
//! and the control plane.
//!
//! A partition here behaves like packets being dropped, not like a reset:
//! connections stay open and nothing crosses them; new connections are
//! accepted (the kernel's handshake) but get no further. Bytes already
//! written wait in socket buffers, and cross once the partition heals, as
//! TCP retransmission would deliver them. Each side finds out only through
//! its own timeouts (HTTP/2 keepalive).

use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    /// `host:port` to give clients instead of the upstream's.
    pub addr: String,
    open: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap().to_string();
        let open = Arc::new(watch::Sender::new(true));
        let upstream = upstream.to_string();
        let gate = open.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let gate = gate.subscribe();
                tokio::spawn(async move {
                    let mut wait = gate.clone();
                    if wait.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::select! {
                        _ = pump(client_read, server_write, gate.clone()) => {}
                        _ = pump(server_read, client_write, gate) => {}
                    }
                });
            }
        });
        Proxy { addr, open, task }
    }

    /// Nothing crosses any more, in either direction, until [`Proxy::heal`].
    pub fn partition(&self) {
        self.open.send_replace(false);
    }

    pub fn heal(&self) {
        self.open.send_replace(true);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // With the accept loop gone and this sender dropped, every
        // connection's pumps end.
        self.task.abort();
    }
}

/// Copies `from` to `to`, reading only while the gate is open.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if gate.wait_for(|open| *open).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Closed while waiting for bytes: hold what comes next.
            _ = gate.wait_for(|open| !*open) => continue,
        };
        // Bytes read just as the partition began are held until it heals.
        if gate.wait_for(|open| *open).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
