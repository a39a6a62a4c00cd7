//! The gRPC port's HTTP/2 (RFC 9113), server side only: the connection
//! (`conn`), its header compression (`hpack`) and each stream as its
//! handler sees it (`stream`).
//!
//! Written here rather than taken from `h2` for what a fleet costs: with
//! `h2` a connection held about 38 KiB of buffers whatever it carried
//! (a 16 KiB write buffer, an 8 KiB read buffer, a 4 KiB header buffer and
//! a receive queue that grows to the largest burst and stays there), every
//! stream operation took the connection's lock, and every frame went
//! through a slab and a waker. Here a connection holds buffers only while
//! they hold something, and an agent's stream is served by the
//! connection's own task without either.

mod conn;
pub mod hpack;
mod stream;

pub use conn::{Settings, serve};
pub use stream::{Reset, StreamIo};
