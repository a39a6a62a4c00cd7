//! HTTP/2 by hand, client side (RFC 9113): as much as a simulated agent
//! needs, and no more. Frames are read from and written to plain buffers
//! that the agent's connection task owns; header blocks go through the
//! daemon's own HPACK decoder, so that a response head or trailers in any
//! encoding is understood.

use duofleet_proto::v1::AgentMessage;
use prost::Message as _;
use prost::bytes::{BufMut, BytesMut};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

/// END_STREAM on DATA and HEADERS; ACK on SETTINGS and PING.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
/// The error code of RST_STREAM that a client sends when it is done with
/// a stream the server has ended.
const CANCEL: u32 = 0x8;

/// Every flow-control window starts at this (RFC 9113, 6.9.2), and this
/// side never asks for more.
pub const DEFAULT_WINDOW: i64 = 65_535;

/// One frame, its payload borrowed from the read buffer.
pub struct Frame<'a> {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// The next whole frame at the start of `buffer`, and its length with
    /// the 9-byte head, if it is all there.
    pub fn parse(buffer: &'a [u8]) -> Option<(Frame<'a>, usize)> {
        let head = buffer.get(..9)?;
        let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
        let payload = buffer.get(9..9 + len)?;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let frame = Frame {
            kind: head[3],
            flags: head[4],
            stream,
            payload,
        };
        Some((frame, 9 + len))
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// A DATA or HEADERS payload without its padding (and, for HEADERS,
    /// without the priority fields).
    pub fn content(&self) -> Result<&'a [u8], String> {
        let mut payload = self.payload;
        let mut pad = 0;
        if self.has(PADDED) {
            let (&len, rest) = payload
                .split_first()
                .ok_or("a PADDED frame with no pad length")?;
            pad = len as usize;
            payload = rest;
        }
        if self.kind == HEADERS && self.has(PRIORITY) {
            payload = payload
                .get(5..)
                .ok_or("HEADERS too short for its priority")?;
        }
        let end = payload
            .len()
            .checked_sub(pad)
            .ok_or("padding longer than the frame")?;
        Ok(&payload[..end])
    }
}

pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// The connection preface and this side's (empty) SETTINGS: every
/// setting at its default.
pub fn put_preface(out: &mut BytesMut) {
    out.put_slice(PREFACE);
    put_head(out, 0, SETTINGS, 0, 0);
}

pub fn put_settings_ack(out: &mut BytesMut) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

pub fn put_ping_ack(out: &mut BytesMut, payload: &[u8]) {
    put_head(out, payload.len(), PING, ACK, 0);
    out.put_slice(payload);
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

pub fn put_cancel(out: &mut BytesMut, stream: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(CANCEL);
}

/// The request head of a gRPC call: one HEADERS frame, its fields as
/// literals (RFC 7541, 6.2.3).
pub fn put_request(out: &mut BytesMut, stream: u32, authority: &str, path: &str, bearer: &str) {
    let mut block = BytesMut::with_capacity(128 + bearer.len());
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("authorization", bearer),
    ] {
        duofleet_control_plane::grpc::hpack::encode_field(
            &mut block,
            name.as_bytes(),
            value.as_bytes(),
        );
    }
    put_head(out, block.len(), HEADERS, END_HEADERS, stream);
    out.put_slice(&block);
}

/// One gRPC message in a DATA frame (the 5-byte prefix, then the
/// protobuf); answers the bytes it takes from the flow-control windows.
pub fn put_message(out: &mut BytesMut, stream: u32, message: &AgentMessage) -> usize {
    let len = message.encoded_len();
    put_head(out, 5 + len, DATA, 0, stream);
    out.put_u8(0);
    out.put_u32(len as u32);
    message
        .encode(out)
        .expect("a BytesMut grows as it is written");
    5 + len
}

/// Calls `each` with every whole gRPC message in `partial` (the start of
/// a message that an earlier DATA brought, if any) followed by `data`;
/// what is left of a message still to come stays in `partial`. Messages
/// that arrive whole, the usual case, are read straight from `data`.
pub fn each_message(
    partial: &mut BytesMut,
    data: &[u8],
    mut each: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    if partial.is_empty() {
        let rest = whole_messages(data, &mut each)?;
        partial.extend_from_slice(rest);
        return Ok(());
    }
    partial.extend_from_slice(data);
    let joined = std::mem::take(partial);
    let rest = whole_messages(&joined, &mut each)?;
    partial.extend_from_slice(rest);
    Ok(())
}

/// Calls `each` with the whole messages at the start of `buffer`;
/// answers what follows them.
fn whole_messages<'a>(
    mut buffer: &'a [u8],
    each: &mut impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<&'a [u8], String> {
    while let Some(head) = buffer.get(..5) {
        let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
        let Some(message) = buffer.get(5..5 + len) else {
            break;
        };
        each(message)?;
        buffer = &buffer[5 + len..];
    }
    Ok(buffer)
}
