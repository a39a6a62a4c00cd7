//! One HTTP/2 server connection (RFC 9113), driven by one task: the frames
//! read off the socket, the streams' handlers, flow control both ways,
//! keepalive pings and the GOAWAY that ends it.
//!
//! Buffers are held only while they hold something: a quiet agent's
//! connection keeps no read or write buffer, and one that bursts does not
//! keep the burst's high-water mark for the rest of its life.

use super::hpack::{self, Decoder, Field};
use super::stream::{self, Out, Reason, Shared, StreamIo};
use crate::wake::{Source, Wakes};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tonic::codegen::http::{self, HeaderMap, HeaderName, HeaderValue, Method, Uri, uri};

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// The largest frame this side takes (the protocol's default: it is
/// never raised).
const MAX_FRAME: usize = 16_384;
/// The peer's windows before its SETTINGS say otherwise.
const DEFAULT_WINDOW: i64 = 65_535;
const MAX_WINDOW: i64 = (1 << 31) - 1;
/// The decoder's table: the protocol's default size.
const HEADER_TABLE: usize = 4_096;
/// A header block arriving in CONTINUATION frames may take this much
/// before the connection is refused.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// How much is read off the socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Past this much unwritten, handlers' data waits and nothing more is
/// read: a peer that does not read cannot make this side buffer more.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// How many times the task goes round (handlers, the socket) in one turn
/// before it yields to other connections.
const TURNS_PER_POLL: usize = 16;
/// The payload of this side's keepalive pings.
const KEEPALIVE_PING: [u8; 8] = *b"duofleet";
/// A client may cancel this many streams, and then up to half of those it
/// opens, before the connection is closed: opening streams and resetting
/// them at once costs this side a handler each and the client nothing
/// (the "rapid reset" attack).
const RESETS_ALLOWED: u32 = 1_000;

pub struct Settings {
    pub max_streams: u32,
    /// What a peer may send on a stream ahead of what has been read; the
    /// connection's window is twice it.
    pub flow_window: u32,
    /// Ping interval when the peer has sent nothing, and how long a ping
    /// may go unanswered.
    pub keepalive: Duration,
    pub max_header_list: u32,
}

/// Why a connection ended other than by a close.
#[derive(Debug)]
pub struct ConnError {
    pub reason: Reason,
    pub detail: String,
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.detail, self.reason)
    }
}

fn error(reason: Reason, detail: impl Into<String>) -> ConnError {
    ConnError {
        reason,
        detail: detail.into(),
    }
}

struct Stream {
    id: u32,
    shared: Arc<Mutex<Shared>>,
    source: Source,
    /// An agent session, polled by this task.
    session: Option<BoxFuture>,
    send_window: i64,
    recv_window: i64,
    /// Taken by the handler, not yet given back to the peer.
    recv_unacked: i64,
    recv_end: bool,
    send_end: bool,
}

struct Continuation {
    id: u32,
    end_stream: bool,
    block: BytesMut,
}

/// Everything but the streams, so that a stream can be worked on while the
/// connection's state is borrowed.
struct Core<'a> {
    settings: &'a Settings,
    wakes: &'a Arc<Wakes>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    decoder: Decoder,
    preface: bool,
    got_settings: bool,
    continuation: Option<Continuation>,
    last_stream_id: u32,
    /// GOAWAY sent: no new streams.
    going_away: bool,
    /// The peer sent GOAWAY.
    peer_going_away: bool,
    send_window: i64,
    recv_window: i64,
    recv_unacked: i64,
    peer_initial_window: i64,
    peer_max_frame: usize,
    /// When the peer was last heard from (anything read).
    last_heard: Instant,
    /// When this side's unanswered keepalive ping went out.
    ping_sent: Option<Instant>,
    /// Streams to work on again (a window opened, the write buffer
    /// drained).
    wake_all: bool,
    /// The write buffer drained below its high-water mark: read again.
    resume_reading: bool,
    /// Streams the peer opened, and how many of them it reset.
    opened: u32,
    resets: u32,
}

struct Streams(Vec<Stream>);

impl Drop for Streams {
    /// Handlers still running (calls in their own tasks) learn that the
    /// connection is gone.
    fn drop(&mut self) {
        for stream in &self.0 {
            close(stream, Some(Reason::CANCEL));
        }
    }
}

/// Serves one connection until it closes. `dispatch` gets each new
/// stream: it returns an agent session to poll here, or None when it took
/// the stream elsewhere (a task of its own). `stop` resolves when the
/// daemon shuts down: GOAWAY is sent, the open streams finish, and the
/// connection closes.
pub async fn serve<T>(
    mut io: T,
    settings: &Settings,
    stop: impl Future<Output = ()>,
    dispatch: impl Fn(http::Request<()>, StreamIo) -> Option<BoxFuture>,
) -> Result<(), ConnError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let wakes = Arc::new(Wakes::default());
    let socket = Source::new(&wakes);
    let timer = Source::new(&wakes);
    let stopped = Source::new(&wakes);
    let mut stop = Some(std::pin::pin!(stop));
    let mut keepalive: Pin<Box<Sleep>> = Box::pin(tokio::time::sleep(settings.keepalive));
    let mut core = Core::new(settings, &wakes);
    let mut streams = Streams(Vec::new());
    // The waker last registered, kept here too: a task is polled with the
    // same one all its life, and comparing it here costs no trip to the
    // shared slot's lock on every poll.
    let mut registered: Option<Waker> = None;
    let ended = poll_fn(|cx| {
        if !registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            wakes.task.register(cx.waker());
            registered = Some(cx.waker().clone());
        }
        wakes.running.store(true, Ordering::SeqCst);
        for _ in 0..TURNS_PER_POLL {
            wakes.any.store(false, Ordering::SeqCst);
            if let Some(pending) = &mut stop
                && stopped.take()
                && pending.as_mut().poll(&mut stopped.context()).is_ready()
            {
                stop = None;
                core.go_away(Reason::NO_ERROR);
                for stream in &streams.0 {
                    stream::lock(&stream.shared).stop = true;
                    stream.source.again();
                }
                wakes.any.store(true, Ordering::SeqCst);
            }
            if timer.take()
                && core
                    .keepalive(&mut keepalive, &mut timer.context())
                    .is_err()
            {
                return Poll::Ready(Err(error(
                    Reason::NO_ERROR,
                    "no answer to a keepalive ping",
                )));
            }
            let all = std::mem::take(&mut core.wake_all);
            core.work(&mut streams.0, all);
            if std::mem::take(&mut core.resume_reading) {
                socket.again();
            }
            if socket.take() {
                let cx = &mut socket.context();
                match core.read(&mut io, cx) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(_)) => {
                        // More may be waiting: read again next turn, after
                        // the handlers have taken what came.
                        socket.again();
                        wakes.any.store(true, Ordering::SeqCst);
                        if let Err(e) = core.frames(&mut streams.0, &dispatch) {
                            core.fail(&mut io, cx, &e);
                            return Poll::Ready(Err(e));
                        }
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Err(error(Reason::NO_ERROR, e.to_string())));
                    }
                    Poll::Pending => {}
                }
                if let Err(e) = core.flush(&mut io, cx) {
                    return Poll::Ready(Err(error(Reason::NO_ERROR, e.to_string())));
                }
            } else if !core.wbuf.is_empty()
                && let Err(e) = core.flush(&mut io, &mut socket.context())
            {
                return Poll::Ready(Err(error(Reason::NO_ERROR, e.to_string())));
            }
            if (core.going_away || core.peer_going_away)
                && streams.0.is_empty()
                && core.wbuf.is_empty()
            {
                let _ = Pin::new(&mut io).poll_shutdown(&mut socket.context());
                return Poll::Ready(Ok(()));
            }
            if !wakes.any.load(Ordering::SeqCst) {
                wakes.running.store(false, Ordering::SeqCst);
                // Anything woken after the look above, while this task was
                // still running, did not wake it: look again.
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
    drop(streams);
    ended
}

impl<'a> Core<'a> {
    fn new(settings: &'a Settings, wakes: &'a Arc<Wakes>) -> Core<'a> {
        let mut core = Core {
            settings,
            wakes,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            decoder: Decoder::new(HEADER_TABLE),
            preface: false,
            got_settings: false,
            continuation: None,
            last_stream_id: 0,
            going_away: false,
            peer_going_away: false,
            send_window: DEFAULT_WINDOW,
            recv_window: 2 * settings.flow_window as i64,
            recv_unacked: 0,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_frame: MAX_FRAME,
            last_heard: Instant::now(),
            ping_sent: None,
            wake_all: false,
            resume_reading: false,
            opened: 0,
            resets: 0,
        };
        // This side's preface: SETTINGS, then the connection's window
        // (which SETTINGS cannot set) opened past the default.
        let ours = [
            (SETTINGS_ENABLE_PUSH, 0),
            (SETTINGS_MAX_CONCURRENT_STREAMS, settings.max_streams),
            (SETTINGS_INITIAL_WINDOW_SIZE, settings.flow_window),
            (SETTINGS_MAX_HEADER_LIST_SIZE, settings.max_header_list),
        ];
        frame_head(&mut core.wbuf, ours.len() * 6, SETTINGS, 0, 0);
        for (id, value) in ours {
            core.wbuf.put_u16(id);
            core.wbuf.put_u32(value);
        }
        let extra = core.recv_window - DEFAULT_WINDOW;
        if extra > 0 {
            core.window_update(0, extra);
        }
        core
    }

    /// What a stream's peer may send before its window is opened again:
    /// ours, or the protocol's default until the peer has seen ours.
    fn stream_window(&self) -> i64 {
        (self.settings.flow_window as i64).max(DEFAULT_WINDOW)
    }

    fn go_away(&mut self, reason: Reason) {
        if self.going_away {
            return;
        }
        self.going_away = true;
        frame_head(&mut self.wbuf, 8, GOAWAY, 0, 0);
        self.wbuf.put_u32(self.last_stream_id);
        self.wbuf.put_u32(reason.0);
    }

    /// A connection error: GOAWAY with its reason, written if the socket
    /// takes it at once.
    fn fail<T: AsyncWrite + Unpin>(&mut self, io: &mut T, cx: &mut Context<'_>, e: &ConnError) {
        self.going_away = false;
        self.go_away(e.reason);
        let _ = self.flush(io, cx);
    }

    /// A ping once the peer has sent nothing for the interval; an error
    /// when it has sent nothing for as long again since (a busy connection
    /// is not pinged, and a dead one is found within twice the interval).
    fn keepalive(&mut self, timer: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>) -> Result<(), ()> {
        let every = self.settings.keepalive;
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if let Some(sent) = self.ping_sent {
                if self.last_heard <= sent {
                    return Err(());
                }
                self.ping_sent = None;
            }
            let next = if now.duration_since(self.last_heard) >= every {
                frame_head(&mut self.wbuf, 8, PING, 0, 0);
                self.wbuf.put_slice(&KEEPALIVE_PING);
                self.ping_sent = Some(now);
                self.wakes.any.store(true, Ordering::SeqCst);
                now + every
            } else {
                self.last_heard + every
            };
            timer.as_mut().reset(next);
        }
        Ok(())
    }

    fn read<T: AsyncRead + Unpin>(
        &mut self,
        io: &mut T,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.wbuf.len() > WRITE_HIGH_WATER {
            // The peer is not reading what we write: stop reading it.
            return Poll::Pending;
        }
        self.rbuf.reserve(READ_CHUNK);
        let read = tokio_util::io::poll_read_buf(Pin::new(io), cx, &mut self.rbuf);
        match read {
            Poll::Ready(Ok(n)) if n > 0 => self.last_heard = Instant::now(),
            // Nothing came: the buffer goes until something does.
            Poll::Pending if self.rbuf.is_empty() => self.rbuf = BytesMut::new(),
            _ => {}
        }
        read
    }

    fn flush<T: AsyncWrite + Unpin>(&mut self, io: &mut T, cx: &mut Context<'_>) -> io::Result<()> {
        let was_full = self.wbuf.len() > WRITE_HIGH_WATER;
        while !self.wbuf.is_empty() {
            match Pin::new(&mut *io).poll_write(cx, &self.wbuf) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => self.wbuf.advance(n),
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(()),
            }
        }
        // TLS keeps what it has not written yet until flushed.
        if let Poll::Ready(Err(e)) = Pin::new(&mut *io).poll_flush(cx) {
            return Err(e);
        }
        // Held only while it holds something: kept, a 10,000-agent fleet's
        // buffers cost 3 KiB an agent, and measured, no CPU.
        self.wbuf = BytesMut::new();
        if was_full {
            self.wake_all = true;
            self.resume_reading = true;
            self.wakes.any.store(true, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Polls the sessions and serves the streams that were woken (all of
    /// them when `all`).
    fn work(&mut self, streams: &mut Vec<Stream>, all: bool) {
        let mut i = 0;
        while i < streams.len() {
            let stream = &mut streams[i];
            if stream.source.take() || all {
                if let Some(session) = &mut stream.session
                    && session
                        .as_mut()
                        .poll(&mut stream.source.context())
                        .is_ready()
                {
                    stream.session = None;
                }
                if self.serve_stream(stream) {
                    let done = streams.swap_remove(i);
                    close(&done, None);
                    continue;
                }
            }
            i += 1;
        }
    }

    /// Gives back to the peer what the handler read and writes what it
    /// queued, as far as the windows allow. True when the stream is done.
    fn serve_stream(&mut self, stream: &mut Stream) -> bool {
        let mut shared = stream::lock(&stream.shared);
        let released = std::mem::take(&mut shared.released) as i64;
        if released > 0 {
            self.release(released);
            if !stream.recv_end {
                stream.recv_unacked += released;
                if stream.recv_unacked >= self.stream_window() / 2 {
                    let n = std::mem::take(&mut stream.recv_unacked);
                    stream.recv_window += n;
                    self.window_update(stream.id, n);
                }
            }
        }
        while self.wbuf.len() <= WRITE_HIGH_WATER && !stream.send_end {
            let Some(out) = shared.out.pop_front() else {
                break;
            };
            match out {
                Out::Head(head, end) => {
                    let mut block = BytesMut::new();
                    hpack::encode_status(&mut block, head.status.as_u16());
                    encode_headers(&mut block, &head.headers);
                    self.header_frames(stream.id, &block, end);
                    stream.send_end = end;
                }
                Out::Data(mut data, end) => {
                    if data.is_empty() {
                        if end {
                            frame_head(&mut self.wbuf, 0, DATA, END_STREAM, stream.id);
                            stream.send_end = true;
                        }
                        continue;
                    }
                    let room = stream
                        .send_window
                        .min(self.send_window)
                        .min(self.peer_max_frame as i64);
                    if room <= 0 {
                        // Waits for a window to open, at the front.
                        shared.out.push_front(Out::Data(data, end));
                        break;
                    }
                    let n = data.len().min(room as usize);
                    let chunk = data.split_to(n);
                    let last = data.is_empty();
                    let flags = if last && end { END_STREAM } else { 0 };
                    frame_head(&mut self.wbuf, n, DATA, flags, stream.id);
                    self.wbuf.put_slice(&chunk);
                    stream.send_window -= n as i64;
                    self.send_window -= n as i64;
                    if last {
                        stream.send_end = end;
                    } else {
                        shared.out.push_front(Out::Data(data, end));
                    }
                }
                Out::Trailers(trailers) => {
                    let mut block = BytesMut::new();
                    encode_headers(&mut block, &trailers);
                    self.header_frames(stream.id, &block, true);
                    stream.send_end = true;
                }
            }
        }
        if stream.send_end {
            shared.out.clear();
        }
        if shared.out.is_empty() {
            shared.wake_writer();
        }
        if !self.wbuf.is_empty() {
            self.wakes.any.store(true, Ordering::SeqCst);
        }
        let idle = stream.session.is_none() && shared.dropped;
        drop(shared);
        if stream.send_end && stream.recv_end {
            return true;
        }
        if stream.send_end && idle {
            // Answered, and nobody reads the rest of the request: tell
            // the peer to stop sending it.
            self.rst(stream.id, Reason::NO_ERROR);
            return true;
        }
        if idle && !stream.send_end {
            // The handler gave up without finishing the response.
            self.rst(stream.id, Reason::CANCEL);
            return true;
        }
        false
    }

    fn header_frames(&mut self, id: u32, block: &[u8], end_stream: bool) {
        let mut chunks = block.chunks(self.peer_max_frame).peekable();
        let mut kind = HEADERS;
        let mut flags = if end_stream { END_STREAM } else { 0 };
        if block.is_empty() {
            frame_head(&mut self.wbuf, 0, HEADERS, flags | END_HEADERS, id);
            return;
        }
        while let Some(chunk) = chunks.next() {
            if chunks.peek().is_none() {
                flags |= END_HEADERS;
            }
            frame_head(&mut self.wbuf, chunk.len(), kind, flags, id);
            self.wbuf.put_slice(chunk);
            kind = CONTINUATION;
            flags = 0;
        }
    }

    fn rst(&mut self, id: u32, reason: Reason) {
        frame_head(&mut self.wbuf, 4, RST_STREAM, 0, id);
        self.wbuf.put_u32(reason.0);
        self.wakes.any.store(true, Ordering::SeqCst);
    }

    fn window_update(&mut self, id: u32, n: i64) {
        frame_head(&mut self.wbuf, 4, WINDOW_UPDATE, 0, id);
        self.wbuf.put_u32(n as u32);
        self.wakes.any.store(true, Ordering::SeqCst);
    }

    /// Counts bytes taken off the connection's window as read; opens it
    /// again once half is used.
    fn release(&mut self, n: i64) {
        self.recv_unacked += n;
        if self.recv_unacked >= self.settings.flow_window as i64 {
            let n = std::mem::take(&mut self.recv_unacked);
            self.recv_window += n;
            self.window_update(0, n);
        }
    }

    /// Takes in every whole frame read so far.
    fn frames(
        &mut self,
        streams: &mut Vec<Stream>,
        dispatch: &impl Fn(http::Request<()>, StreamIo) -> Option<BoxFuture>,
    ) -> Result<(), ConnError> {
        if !self.preface {
            let n = self.rbuf.len().min(PREFACE.len());
            if self.rbuf[..n] != PREFACE[..n] {
                return Err(error(
                    Reason::PROTOCOL_ERROR,
                    "not an HTTP/2 connection preface",
                ));
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            self.rbuf.advance(PREFACE.len());
            self.preface = true;
        }
        while self.rbuf.len() >= 9 {
            let head = &self.rbuf[..9];
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let kind = head[3];
            let flags = head[4];
            let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            if len > MAX_FRAME {
                return Err(error(
                    Reason::FRAME_SIZE_ERROR,
                    format!("a frame of {len} bytes, over the {MAX_FRAME} allowed"),
                ));
            }
            if self.rbuf.len() < 9 + len {
                self.rbuf.reserve(9 + len - self.rbuf.len());
                break;
            }
            self.rbuf.advance(9);
            let payload = self.rbuf.split_to(len).freeze();
            if !self.got_settings && kind != SETTINGS {
                return Err(error(
                    Reason::PROTOCOL_ERROR,
                    "the first frame was not SETTINGS",
                ));
            }
            if self.continuation.is_some() && kind != CONTINUATION {
                return Err(error(
                    Reason::PROTOCOL_ERROR,
                    "a frame inside a header block",
                ));
            }
            match kind {
                DATA => self.data(streams, id, flags, payload)?,
                HEADERS => self.headers(streams, dispatch, id, flags, payload)?,
                PRIORITY => {
                    if id == 0 {
                        return Err(error(Reason::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                    }
                    if len != 5 {
                        self.reset(streams, id, Reason::FRAME_SIZE_ERROR);
                    }
                }
                RST_STREAM => {
                    if id == 0 || id > self.last_stream_id {
                        return Err(error(
                            Reason::PROTOCOL_ERROR,
                            "RST_STREAM on an idle stream",
                        ));
                    }
                    if len != 4 {
                        return Err(error(Reason::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes"));
                    }
                    let reason = Reason(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                    if remove(streams, id, reason) {
                        self.resets += 1;
                        if self.resets > RESETS_ALLOWED && self.resets > self.opened / 2 {
                            return Err(error(
                                Reason::ENHANCE_YOUR_CALM,
                                format!(
                                    "{} of {} streams reset by the client",
                                    self.resets, self.opened
                                ),
                            ));
                        }
                    }
                }
                SETTINGS => self.settings_frame(streams, id, flags, &payload)?,
                PUSH_PROMISE => {
                    return Err(error(Reason::PROTOCOL_ERROR, "PUSH_PROMISE from a client"));
                }
                PING => {
                    if id != 0 {
                        return Err(error(Reason::PROTOCOL_ERROR, "PING on a stream"));
                    }
                    if len != 8 {
                        return Err(error(Reason::FRAME_SIZE_ERROR, "PING not 8 bytes"));
                    }
                    // An answer to this side's ping needs nothing more: the
                    // peer was heard from.
                    if flags & ACK == 0 {
                        frame_head(&mut self.wbuf, 8, PING, ACK, 0);
                        self.wbuf.put_slice(&payload);
                    }
                }
                GOAWAY => {
                    if id != 0 {
                        return Err(error(Reason::PROTOCOL_ERROR, "GOAWAY on a stream"));
                    }
                    if len < 8 {
                        return Err(error(Reason::FRAME_SIZE_ERROR, "GOAWAY under 8 bytes"));
                    }
                    self.peer_going_away = true;
                }
                WINDOW_UPDATE => self.window_update_frame(streams, id, &payload)?,
                CONTINUATION => {
                    let Some(mut pending) = self.continuation.take() else {
                        return Err(error(
                            Reason::PROTOCOL_ERROR,
                            "CONTINUATION after no HEADERS",
                        ));
                    };
                    if pending.id != id {
                        return Err(error(
                            Reason::PROTOCOL_ERROR,
                            "CONTINUATION on another stream",
                        ));
                    }
                    if pending.block.len() + len > MAX_HEADER_BLOCK {
                        return Err(error(Reason::ENHANCE_YOUR_CALM, "a header block too large"));
                    }
                    pending.block.extend_from_slice(&payload);
                    if flags & END_HEADERS != 0 {
                        let block = pending.block.freeze();
                        self.header_block(streams, dispatch, id, pending.end_stream, &block)?;
                    } else {
                        self.continuation = Some(pending);
                    }
                }
                // Unknown frame types are ignored (RFC 9113, 4.1).
                _ => {}
            }
        }
        if self.rbuf.is_empty() {
            // Held only while it holds something.
            self.rbuf = BytesMut::new();
        }
        Ok(())
    }

    fn data(
        &mut self,
        streams: &mut Vec<Stream>,
        id: u32,
        flags: u8,
        payload: Bytes,
    ) -> Result<(), ConnError> {
        if id == 0 {
            return Err(error(Reason::PROTOCOL_ERROR, "DATA on stream 0"));
        }
        let len = payload.len() as i64;
        self.recv_window -= len;
        if self.recv_window < 0 {
            return Err(error(
                Reason::FLOW_CONTROL_ERROR,
                "DATA past the connection's window",
            ));
        }
        let data = unpad(flags, payload)?;
        let padding = len - data.len() as i64;
        let Some(i) = streams.iter().position(|s| s.id == id) else {
            if id > self.last_stream_id {
                return Err(error(Reason::PROTOCOL_ERROR, "DATA on an idle stream"));
            }
            // A stream already closed here: the peer sent before it knew.
            self.release(len);
            return Ok(());
        };
        let stream = &mut streams[i];
        if stream.recv_end {
            self.release(len);
            self.reset(streams, id, Reason::STREAM_CLOSED);
            return Ok(());
        }
        stream.recv_window -= len;
        if stream.recv_window < 0 {
            self.release(len);
            self.reset(streams, id, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        if padding > 0 {
            self.release(padding);
            stream.recv_unacked += padding;
        }
        let mut shared = stream::lock(&stream.shared);
        if !data.is_empty() {
            shared.data.push_back(data);
        }
        if flags & END_STREAM != 0 {
            stream.recv_end = true;
            shared.end = true;
        }
        shared.wake_reader();
        drop(shared);
        // The stream may be done (answered, and now ended by the peer).
        stream.source.again();
        self.wakes.any.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn headers(
        &mut self,
        streams: &mut Vec<Stream>,
        dispatch: &impl Fn(http::Request<()>, StreamIo) -> Option<BoxFuture>,
        id: u32,
        flags: u8,
        payload: Bytes,
    ) -> Result<(), ConnError> {
        if id == 0 {
            return Err(error(Reason::PROTOCOL_ERROR, "HEADERS on stream 0"));
        }
        let mut block = unpad(flags, payload)?;
        if flags & PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                return Err(error(
                    Reason::FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority",
                ));
            }
            block.advance(5);
        }
        let end_stream = flags & END_STREAM != 0;
        if flags & END_HEADERS == 0 {
            self.continuation = Some(Continuation {
                id,
                end_stream,
                block: BytesMut::from(&block[..]),
            });
            return Ok(());
        }
        self.header_block(streams, dispatch, id, end_stream, &block)
    }

    fn header_block(
        &mut self,
        streams: &mut Vec<Stream>,
        dispatch: &impl Fn(http::Request<()>, StreamIo) -> Option<BoxFuture>,
        id: u32,
        end_stream: bool,
        block: &[u8],
    ) -> Result<(), ConnError> {
        // Decoded whatever becomes of the stream: the table must keep up.
        let mut fields = Vec::new();
        let within = self
            .decoder
            .decode(block, self.settings.max_header_list as usize, |f| {
                fields.push(f)
            })
            .map_err(|e| error(Reason::COMPRESSION_ERROR, e.0))?;
        if let Some(i) = streams.iter().position(|s| s.id == id) {
            // Trailers: they end the request (gRPC sends none).
            let stream = &mut streams[i];
            if stream.recv_end || !end_stream {
                self.reset(streams, id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
            stream.recv_end = true;
            let mut shared = stream::lock(&stream.shared);
            shared.end = true;
            shared.wake_reader();
            drop(shared);
            stream.source.again();
            self.wakes.any.store(true, Ordering::SeqCst);
            return Ok(());
        }
        if id.is_multiple_of(2) || id <= self.last_stream_id {
            return Err(error(
                Reason::PROTOCOL_ERROR,
                format!(
                    "HEADERS opening stream {id}, not after {}",
                    self.last_stream_id
                ),
            ));
        }
        self.last_stream_id = id;
        if self.going_away
            || self.peer_going_away
            || streams.len() >= self.settings.max_streams as usize
        {
            self.rst(id, Reason::REFUSED_STREAM);
            return Ok(());
        }
        if !within {
            // Too many headers: 431, as hyper answers.
            let mut block = BytesMut::new();
            hpack::encode_status(&mut block, 431);
            self.header_frames(id, &block, true);
            if !end_stream {
                self.rst(id, Reason::NO_ERROR);
            }
            return Ok(());
        }
        let request = match request(fields) {
            Ok(request) => request,
            Err(why) => {
                tracing::debug!(stream = id, why, "a malformed request");
                self.rst(id, Reason::PROTOCOL_ERROR);
                return Ok(());
            }
        };
        let source = Source::new(self.wakes);
        let shared = Arc::new(Mutex::new(Shared {
            end: end_stream,
            connection: Some(source.waker()),
            ..Default::default()
        }));
        self.opened = self.opened.saturating_add(1);
        let session = dispatch(request, StreamIo::new(shared.clone()));
        if session.is_some() {
            // Polled here, and served right after each poll: what it does
            // to its stream needs no wake-up.
            stream::lock(&shared).connection = None;
        }
        streams.push(Stream {
            id,
            shared,
            source,
            session,
            send_window: self.peer_initial_window,
            recv_window: self.stream_window(),
            recv_unacked: 0,
            recv_end: end_stream,
            send_end: false,
        });
        self.wakes.any.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn settings_frame(
        &mut self,
        streams: &mut [Stream],
        id: u32,
        flags: u8,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        if id != 0 {
            return Err(error(Reason::PROTOCOL_ERROR, "SETTINGS on a stream"));
        }
        if flags & ACK != 0 {
            if !payload.is_empty() {
                return Err(error(
                    Reason::FRAME_SIZE_ERROR,
                    "a SETTINGS ACK with a payload",
                ));
            }
            return Ok(());
        }
        if !payload.len().is_multiple_of(6) {
            return Err(error(
                Reason::FRAME_SIZE_ERROR,
                "SETTINGS not a multiple of 6 bytes",
            ));
        }
        for setting in payload.chunks(6) {
            let ident = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match ident {
                SETTINGS_ENABLE_PUSH if value > 1 => {
                    return Err(error(Reason::PROTOCOL_ERROR, "ENABLE_PUSH neither 0 nor 1"));
                }
                SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = value as i64;
                    if value > MAX_WINDOW {
                        return Err(error(
                            Reason::FLOW_CONTROL_ERROR,
                            "INITIAL_WINDOW_SIZE over 2^31-1",
                        ));
                    }
                    let delta = value - self.peer_initial_window;
                    self.peer_initial_window = value;
                    for stream in streams.iter_mut() {
                        stream.send_window += delta;
                        if stream.send_window > MAX_WINDOW {
                            return Err(error(
                                Reason::FLOW_CONTROL_ERROR,
                                "a stream's window over 2^31-1",
                            ));
                        }
                    }
                    self.wake_all = true;
                }
                SETTINGS_MAX_FRAME_SIZE => {
                    if !(16_384..=16_777_215).contains(&value) {
                        return Err(error(Reason::PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range"));
                    }
                    self.peer_max_frame = value as usize;
                }
                // The table size (this side's encoder never indexes), the
                // peer's stream limit (this side opens none) and the rest.
                _ => {}
            }
        }
        self.got_settings = true;
        frame_head(&mut self.wbuf, 0, SETTINGS, ACK, 0);
        Ok(())
    }

    fn window_update_frame(
        &mut self,
        streams: &mut Vec<Stream>,
        id: u32,
        payload: &[u8],
    ) -> Result<(), ConnError> {
        if payload.len() != 4 {
            return Err(error(Reason::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes"));
        }
        let n = (u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff)
            as i64;
        if id == 0 {
            if n == 0 {
                return Err(error(Reason::PROTOCOL_ERROR, "a WINDOW_UPDATE of 0"));
            }
            self.send_window += n;
            if self.send_window > MAX_WINDOW {
                return Err(error(
                    Reason::FLOW_CONTROL_ERROR,
                    "the connection's window over 2^31-1",
                ));
            }
            self.wake_all = true;
            self.wakes.any.store(true, Ordering::SeqCst);
            return Ok(());
        }
        let Some(i) = streams.iter().position(|s| s.id == id) else {
            if id > self.last_stream_id {
                return Err(error(
                    Reason::PROTOCOL_ERROR,
                    "WINDOW_UPDATE on an idle stream",
                ));
            }
            return Ok(());
        };
        if n == 0 {
            self.reset(streams, id, Reason::PROTOCOL_ERROR);
            return Ok(());
        }
        let stream = &mut streams[i];
        stream.send_window += n;
        if stream.send_window > MAX_WINDOW {
            self.reset(streams, id, Reason::FLOW_CONTROL_ERROR);
            return Ok(());
        }
        stream.source.again();
        self.wakes.any.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// A stream error: RST_STREAM, and the stream is gone.
    fn reset(&mut self, streams: &mut Vec<Stream>, id: u32, reason: Reason) {
        self.rst(id, reason);
        remove(streams, id, reason);
    }
}

/// Takes stream `id` off the connection, ended by `reason`; false when it
/// is not there (already closed).
fn remove(streams: &mut Vec<Stream>, id: u32, reason: Reason) -> bool {
    let Some(i) = streams.iter().position(|s| s.id == id) else {
        return false;
    };
    let done = streams.swap_remove(i);
    close(&done, Some(reason));
    true
}

/// A stream leaves the connection: a handler still running sees `reset`
/// (None when it ended normally).
fn close(stream: &Stream, reset: Option<Reason>) {
    let mut shared = stream::lock(&stream.shared);
    shared.connection = None;
    if !(stream.send_end && stream.recv_end) || reset.is_some() {
        shared.reset.get_or_insert(reset.unwrap_or(Reason::CANCEL));
    }
    shared.wake_reader();
    shared.wake_writer();
}

fn frame_head(buf: &mut BytesMut, len: usize, kind: u8, flags: u8, id: u32) {
    buf.reserve(9 + len);
    buf.put_slice(&(len as u32).to_be_bytes()[1..]);
    buf.put_u8(kind);
    buf.put_u8(flags);
    buf.put_u32(id);
}

/// A DATA or HEADERS payload without its padding.
fn unpad(flags: u8, mut payload: Bytes) -> Result<Bytes, ConnError> {
    if flags & PADDED == 0 {
        return Ok(payload);
    }
    let Some(&pad) = payload.first() else {
        return Err(error(
            Reason::PROTOCOL_ERROR,
            "a padded frame with no pad length",
        ));
    };
    let pad = pad as usize;
    if pad >= payload.len() {
        return Err(error(
            Reason::PROTOCOL_ERROR,
            "padding longer than the frame",
        ));
    }
    payload.advance(1);
    payload.truncate(payload.len() - pad);
    Ok(payload)
}

/// Response headers and trailers: HTTP/2 carries no connection-specific
/// fields.
fn encode_headers(block: &mut BytesMut, headers: &HeaderMap) {
    for (name, value) in headers {
        if is_connection_specific(name.as_str().as_bytes()) {
            continue;
        }
        hpack::encode_field(block, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn is_connection_specific(name: &[u8]) -> bool {
    matches!(
        name,
        b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding" | b"upgrade"
    )
}

/// The request a header block opens, checked as RFC 9113 (8.2, 8.3) asks.
fn request(fields: Vec<Field>) -> Result<http::Request<()>, &'static str> {
    let (mut method, mut path, mut scheme, mut authority) = (None, None, None, None);
    let mut headers = HeaderMap::with_capacity(fields.len());
    let mut regular = false;
    for (name, value) in fields {
        if name.first() == Some(&b':') {
            if regular {
                return Err("a pseudo-header after a regular header");
            }
            let slot = match &name[..] {
                b":method" => &mut method,
                b":path" => &mut path,
                b":scheme" => &mut scheme,
                b":authority" => &mut authority,
                _ => return Err("an unknown pseudo-header"),
            };
            if slot.replace(value).is_some() {
                return Err("a repeated pseudo-header");
            }
            continue;
        }
        regular = true;
        if name.iter().any(u8::is_ascii_uppercase) {
            return Err("an upper-case header name");
        }
        if is_connection_specific(&name) {
            return Err("a connection-specific header");
        }
        if &name[..] == b"te" && &value[..] != b"trailers" {
            return Err("TE other than \"trailers\"");
        }
        let name = HeaderName::from_bytes(&name).map_err(|_| "an invalid header name")?;
        let value = HeaderValue::from_maybe_shared(value).map_err(|_| "an invalid header value")?;
        headers.append(name, value);
    }
    let method = Method::from_bytes(&method.ok_or("no :method")?).map_err(|_| "a bad :method")?;
    let scheme = scheme.ok_or("no :scheme")?;
    let path = path.ok_or("no :path")?;
    if path.is_empty() {
        return Err("an empty :path");
    }
    let mut uri = Uri::builder()
        .path_and_query(uri::PathAndQuery::from_maybe_shared(path).map_err(|_| "a bad :path")?);
    if let Some(authority) = authority {
        uri = uri
            .scheme(uri::Scheme::try_from(&scheme[..]).map_err(|_| "a bad :scheme")?)
            .authority(
                uri::Authority::from_maybe_shared(authority).map_err(|_| "a bad :authority")?,
            );
    }
    let mut request = http::Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri.build().map_err(|_| "a bad request target")?;
    *request.version_mut() = http::Version::HTTP_2;
    *request.headers_mut() = headers;
    Ok(request)
}
