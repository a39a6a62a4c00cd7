//! Failed authentication leaves a trace: a warning with the peer's address
//! and the token's name when it is known. One line per peer per minute at
//! most, carrying the count of refusals since the last line, so that a
//! client hammering with bad tokens cannot flood the log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
/// Peers remembered at once; older windows are forgotten first.
const PEERS_MAX: usize = 10_000;

#[derive(Default)]
pub struct Refusals {
    /// Peer -> when its last line was written, refusals since then.
    peers: Mutex<HashMap<Option<IpAddr>, (Instant, u64)>>,
}

impl Refusals {
    /// Records one refusal; returns the number of refusals the line stands
    /// for when one is written now, `None` when it is held back.
    pub fn record(&self, peer: Option<IpAddr>, token: Option<&str>, why: &str) -> Option<u64> {
        let now = Instant::now();
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if peers.len() >= PEERS_MAX && !peers.contains_key(&peer) {
            peers.retain(|_, (at, _)| now.duration_since(*at) < WINDOW);
            if peers.len() >= PEERS_MAX {
                return None;
            }
        }
        let entry = peers.entry(peer).or_insert((now - WINDOW, 0));
        entry.1 += 1;
        if now.duration_since(entry.0) < WINDOW {
            return None;
        }
        let count = entry.1;
        *entry = (now, 0);
        drop(peers);
        let peer = peer.map_or("unknown".to_string(), |p| p.to_string());
        tracing::warn!(
            %peer,
            token = token.unwrap_or("unknown"),
            refusals = count,
            reason = why,
            "authentication refused (one line per peer per minute; refusals counts them)"
        );
        Some(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_peer_per_window() {
        let refusals = Refusals::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(refusals.record(Some(a), None, "invalid token"), Some(1));
        for _ in 0..1000 {
            assert_eq!(refusals.record(Some(a), None, "invalid token"), None);
        }
        assert_eq!(refusals.record(Some(b), Some("ci"), "expired"), Some(1));
        // A window later, the next line counts what was held back.
        refusals.peers.lock().unwrap().get_mut(&Some(a)).unwrap().0 -= WINDOW;
        assert_eq!(refusals.record(Some(a), None, "invalid token"), Some(1001));
    }
}
