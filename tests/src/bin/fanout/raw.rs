//! The floor: what fan-out costs on this machine with nothing but TCP and
//! tokio. No HTTP/2, no protobuf, no store: a server process (this binary
//! with `--raw-serve`) holds N loopback connections; on each change it
//! writes a 1 KiB push to every one, and each client answers with a 16-byte
//! ack that the server reads. Like duofleetd, each connection has its own
//! task following a `watch` of the newest push. Both sides read into
//! buffers larger than a message, so that a message costs one read, as it
//! does in duofleetd and its simulated agents: a read that fills its
//! buffer exactly (`read_exact` of one message) leaves tokio unsure that
//! the socket is drained, and the next poll costs a read that finds
//! nothing (the first version of the floor paid that on every message).
//!
//! Driven over the server's stdin and stdout: the bench writes `push N`,
//! the server answers `ok N` once the push is published to the
//! connections' tasks; `count` answers how many connections it holds.

use crate::Arrivals;
use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The size of a push, about a DesiredConfig's.
pub const PUSH_BYTES: usize = 1024;
const ACK_BYTES: usize = 16;

/// The server side, run in its own process so its CPU and memory are its
/// own: `fanout --raw-serve`.
pub fn serve() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("{}", listener.local_addr().expect("address"));
        let (pushes, _) = watch::channel(Arc::new(vec![0u8; PUSH_BYTES]));
        let publisher = pushes.clone();
        let connected = Arc::new(AtomicUsize::new(0));
        let counted = connected.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if line == "count" {
                    println!("{}", counted.load(Ordering::SeqCst));
                    let _ = std::io::stdout().flush();
                    continue;
                }
                let Some(revision) = line
                    .strip_prefix("push ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
                else {
                    continue;
                };
                let mut push = vec![0u8; PUSH_BYTES];
                push[..8].copy_from_slice(&revision.to_be_bytes());
                publisher.send_replace(Arc::new(push));
                println!("ok {revision}");
                let _ = std::io::stdout().flush();
            }
            std::process::exit(0);
        });
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let _ = socket.set_nodelay(true);
            let mut updates = pushes.subscribe();
            updates.borrow_and_update();
            connected.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut read, mut write) = socket.into_split();
                // Acks are read into a buffer larger than one: a read that
                // fills its buffer leaves tokio unsure that the socket is
                // drained, and costs a second read that finds nothing.
                let mut acks = [0u8; 64 * ACK_BYTES];
                let mut pending = 0;
                loop {
                    tokio::select! {
                        changed = updates.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            let push = updates.borrow_and_update().clone();
                            if write.write_all(&push).await.is_err() {
                                return;
                            }
                        }
                        read = read.read(&mut acks[pending..]) => match read {
                            Ok(0) | Err(_) => return,
                            // Whole acks are taken; a part waits for its rest.
                            Ok(n) => pending = (pending + n) % ACK_BYTES,
                        },
                    }
                }
            });
        }
    });
}

/// The server process, from the bench's side.
pub struct RawServer {
    child: Child,
    stdin: ChildStdin,
    stdout: std::io::BufReader<ChildStdout>,
    pub addr: String,
}

impl RawServer {
    pub fn start() -> RawServer {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg("--raw-serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the raw server");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut addr = String::new();
        stdout
            .read_line(&mut addr)
            .expect("the raw server's address");
        RawServer {
            child,
            stdin,
            stdout,
            addr: addr.trim().to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many connections the server holds.
    pub fn connected(&mut self) -> usize {
        writeln!(self.stdin, "count").expect("write to the raw server");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("the raw server's answer");
        line.trim().parse().expect("a count")
    }

    /// Publishes push `revision` from a runtime's worker, which waits
    /// for the server's answer; the revision.
    pub fn push_blocking(&mut self, revision: u64) -> u64 {
        tokio::task::block_in_place(|| self.push(revision));
        revision
    }

    /// Publishes push `revision`; returns once the server says so.
    pub fn push(&mut self, revision: u64) {
        writeln!(self.stdin, "push {revision}").expect("write to the raw server");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("the raw server's answer");
        assert_eq!(line.trim(), format!("ok {revision}"));
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// N clients of `server`, each on its own connection (`clients`); returns
/// once the server holds them all.
pub async fn connect(server: &mut RawServer, n: usize, arrivals: Arc<Arrivals>) -> JoinSet<()> {
    let clients = clients(&server.addr, n, arrivals).await;
    let deadline = std::time::Instant::now() + crate::PHASE_LIMIT;
    while tokio::task::block_in_place(|| server.connected()) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "raw: too few connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    clients
}

/// N clients, each on its own connection: read a push, record its
/// revision's arrival, send the ack.
pub async fn clients(addr: &str, n: usize, arrivals: Arc<Arrivals>) -> JoinSet<()> {
    let mut set = JoinSet::new();
    for _ in 0..n {
        let socket = loop {
            match TcpStream::connect(addr).await {
                Ok(socket) => break socket,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let _ = socket.set_nodelay(true);
        let arrivals = arrivals.clone();
        set.spawn(async move {
            let (mut read, mut write) = socket.into_split();
            // Larger than a push, for the reason the server's acks are.
            let mut buffer = vec![0u8; 4 * PUSH_BYTES];
            let mut filled = 0;
            loop {
                while filled < PUSH_BYTES {
                    match read.read(&mut buffer[filled..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => filled += n,
                    }
                }
                let mut revision = [0u8; 8];
                revision.copy_from_slice(&buffer[..8]);
                buffer.copy_within(PUSH_BYTES..filled, 0);
                filled -= PUSH_BYTES;
                let mut ack = [0u8; ACK_BYTES];
                ack[..8].copy_from_slice(&revision);
                if write.write_all(&ack).await.is_err() {
                    return;
                }
                arrivals.record(u64::from_be_bytes(revision));
            }
        });
    }
    set
}
