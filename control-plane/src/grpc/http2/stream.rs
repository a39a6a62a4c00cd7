//! One HTTP/2 stream as its handler sees it: the request's body coming in,
//! the response going out. The connection and the handler share it; each
//! wakes the other when there is something to do.
//!
//! An agent's session is polled by its connection's task, so for it the
//! waking is a flag (`wake::Source`); a call to tonic's routes runs in a
//! task of its own and is woken as tasks are.

use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use tonic::codegen::http::{HeaderMap, response};

/// HTTP/2 error codes (RFC 9113, section 7) that this side sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reason(pub u32);

impl Reason {
    pub const NO_ERROR: Reason = Reason(0x0);
    pub const PROTOCOL_ERROR: Reason = Reason(0x1);
    pub const FLOW_CONTROL_ERROR: Reason = Reason(0x3);
    pub const STREAM_CLOSED: Reason = Reason(0x5);
    pub const FRAME_SIZE_ERROR: Reason = Reason(0x6);
    pub const REFUSED_STREAM: Reason = Reason(0x7);
    pub const CANCEL: Reason = Reason(0x8);
    pub const COMPRESSION_ERROR: Reason = Reason(0x9);
    pub const ENHANCE_YOUR_CALM: Reason = Reason(0xb);
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            0x0 => "NO_ERROR",
            0x1 => "PROTOCOL_ERROR",
            0x2 => "INTERNAL_ERROR",
            0x3 => "FLOW_CONTROL_ERROR",
            0x5 => "STREAM_CLOSED",
            0x6 => "FRAME_SIZE_ERROR",
            0x7 => "REFUSED_STREAM",
            0x8 => "CANCEL",
            0x9 => "COMPRESSION_ERROR",
            0xb => "ENHANCE_YOUR_CALM",
            _ => return write!(f, "HTTP/2 error {:#x}", self.0),
        };
        f.write_str(name)
    }
}

/// The stream ended before its time: the peer reset it, or the
/// connection closed.
#[derive(Debug)]
pub struct Reset(pub Reason);

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the stream was reset ({})", self.0)
    }
}

impl std::error::Error for Reset {}

/// What the handler queues for the connection to send.
pub(super) enum Out {
    Head(response::Parts, bool),
    Data(Bytes, bool),
    Trailers(HeaderMap),
}

#[derive(Default)]
pub(super) struct Shared {
    /// The request's body, as it arrived.
    pub(super) data: VecDeque<Bytes>,
    /// The peer ended its side.
    pub(super) end: bool,
    pub(super) reset: Option<Reason>,
    /// Bytes the handler took, not yet given back to the peer's window.
    pub(super) released: usize,
    pub(super) reader: Option<Waker>,
    pub(super) out: VecDeque<Out>,
    pub(super) writer: Option<Waker>,
    /// The connection's side: woken whenever the handler acts.
    pub(super) connection: Option<Waker>,
    /// The handler let go of the stream.
    pub(super) dropped: bool,
    /// The daemon is shutting down (see `stopping`).
    pub(super) stop: bool,
}

impl Shared {
    pub(super) fn wake_reader(&mut self) {
        if let Some(waker) = self.reader.take() {
            waker.wake();
        }
    }

    pub(super) fn wake_writer(&mut self) {
        if let Some(waker) = self.writer.take() {
            waker.wake();
        }
    }

    fn wake_connection(&self) {
        if let Some(waker) = &self.connection {
            waker.wake_by_ref();
        }
    }
}

pub(super) fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The handler's end of a stream.
pub struct StreamIo {
    shared: Arc<Mutex<Shared>>,
}

impl StreamIo {
    pub(super) fn new(shared: Arc<Mutex<Shared>>) -> StreamIo {
        StreamIo { shared }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// The next piece of the request's body; None once the peer ended its
    /// side. What is taken is given back to the peer's flow window.
    pub fn poll_data(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Reset>>> {
        let mut shared = self.lock();
        if let Some(data) = shared.data.pop_front() {
            if shared.data.is_empty() && shared.data.capacity() > 4 {
                // A burst's queue is not kept for the stream's life.
                shared.data = VecDeque::new();
            }
            shared.released += data.len();
            shared.wake_connection();
            return Poll::Ready(Some(Ok(data)));
        }
        if let Some(reason) = shared.reset {
            return Poll::Ready(Some(Err(Reset(reason))));
        }
        if shared.end {
            return Poll::Ready(None);
        }
        shared.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The daemon is shutting down: the connection sets this on an agent
    /// session's stream and polls the session again.
    pub fn stopping(&self) -> bool {
        self.lock().stop
    }

    pub fn is_end_stream(&self) -> bool {
        let shared = self.lock();
        shared.end && shared.data.is_empty()
    }

    /// Ready while the connection has taken all but the last message
    /// queued (so one more may be queued), or with the reset that ended
    /// the stream. One may wait while the next is built: a handler that
    /// queues a message is not stopped and woken again for each one that
    /// the connection writes at once.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), Reset>> {
        let mut shared = self.lock();
        if let Some(reason) = shared.reset {
            return Poll::Ready(Err(Reset(reason)));
        }
        if shared.out.len() < 2 {
            return Poll::Ready(Ok(()));
        }
        shared.writer = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ready once the peer has reset the stream (it cancelled the call).
    pub fn poll_reset(&self, cx: &mut Context<'_>) -> Poll<Reason> {
        let mut shared = self.lock();
        match shared.reset {
            Some(reason) => Poll::Ready(reason),
            None => {
                shared.writer = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    fn queue(&self, out: Out) {
        let mut shared = self.lock();
        if shared.reset.is_none() {
            shared.out.push_back(out);
            shared.wake_connection();
        }
    }

    /// The response's head; `end` when there is nothing after it (a
    /// trailers-only gRPC response).
    pub fn send_response(&self, head: response::Parts, end: bool) {
        self.queue(Out::Head(head, end));
    }

    pub fn send_data(&self, data: Bytes, end: bool) {
        self.queue(Out::Data(data, end));
    }

    pub fn send_trailers(&self, trailers: HeaderMap) {
        self.queue(Out::Trailers(trailers));
    }
}

impl Drop for StreamIo {
    fn drop(&mut self) {
        let mut shared = self.lock();
        shared.dropped = true;
        shared.reader = None;
        shared.writer = None;
        shared.wake_connection();
    }
}
