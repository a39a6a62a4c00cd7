//! The duofleet.v1 gRPC contract.
//!
//! The `.proto` files under `proto/duofleet/v1/` are the source of truth for
//! every name that operators, agents and grpcurl depend on. `build.rs`
//! compiles them with protox (no protoc needed) into the tonic clients and
//! servers re-exported here, and keeps the encoded descriptor set so that
//! `duofleetd` can serve gRPC reflection.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

/// The `duofleet.v1` package: messages, clients and servers.
pub mod v1 {
    tonic::include_proto!("duofleet.v1");
}

pub mod window;
pub mod wire;

/// Trailer metadata on the status that ends an agent's stream when
/// duofleetd shuts down: how many milliseconds the agent should wait
/// before it reconnects. Each agent is given its own point in a window
/// that grows with the fleet, so that a restart is not met by the whole
/// fleet at once, and nobody waits out a long backoff.
pub const RECONNECT_AFTER_MS: &str = "duofleet-reconnect-after-ms";

/// The encoded `FileDescriptorSet` of every duofleet.v1 file and its
/// imports, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/duofleet_descriptor.bin"));

/// A GitLab version as its major and minor numbers, which is all that
/// decides what GitLab's API offers: "17.11.2-ee" is 17.11. It orders
/// numerically (17.4 < 17.11), unlike the strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GitLabVersion {
    pub major: u32,
    pub minor: u32,
}

impl GitLabVersion {
    pub const fn new(major: u32, minor: u32) -> GitLabVersion {
        GitLabVersion { major, minor }
    }

    /// "17.11.2-ee", "18.0.0-pre" or "17.4" -> Some; anything without a
    /// leading "major.minor" -> None.
    pub fn parse(text: &str) -> Option<GitLabVersion> {
        let mut parts = text.trim().splitn(3, '.');
        let major = parts.next()?.parse().ok()?;
        let minor: String = parts
            .next()?
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        Some(GitLabVersion::new(major, minor.parse().ok()?))
    }
}

impl std::fmt::Display for GitLabVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl v1::SyncState {
    /// The state as operators read it: "SYNCED", "OFFLINE", ... (the enum
    /// value's name without its prefix).
    pub fn word(self) -> &'static str {
        self.as_str_name()
            .strip_prefix("SYNC_STATE_")
            .unwrap_or("UNKNOWN")
    }
}

/// Debug that never prints an API key: `{:?}` of a request must be safe to log.
mod redact {
    use super::v1::{DesiredModel, Model};
    use std::fmt;

    fn key_state(key: &str) -> &'static str {
        if key.is_empty() {
            "<none>"
        } else {
            "<redacted>"
        }
    }

    impl fmt::Debug for Model {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("Model")
                .field("name", &self.name)
                .field("family", &self.family)
                .field("endpoint", &self.endpoint)
                .field("api_key", &key_state(&self.api_key))
                .field("has_api_key", &self.has_api_key)
                .field("identifier", &self.identifier)
                .field("revision", &self.revision)
                .field("create_time", &self.create_time)
                .field("update_time", &self.update_time)
                .finish()
        }
    }

    impl fmt::Debug for DesiredModel {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("DesiredModel")
                .field("name", &self.name)
                .field("family", &self.family)
                .field("endpoint", &self.endpoint)
                .field("api_key", &key_state(&self.api_key))
                .field("identifier", &self.identifier)
                .finish()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::GitLabVersion;
        use super::*;

        #[test]
        fn gitlab_versions_parse_and_order_numerically() {
            let v = |t| GitLabVersion::parse(t).unwrap();
            assert_eq!(v("17.11.2-ee"), GitLabVersion::new(17, 11));
            assert_eq!(v("18.0.0-pre"), GitLabVersion::new(18, 0));
            assert_eq!(v("17.4"), GitLabVersion::new(17, 4));
            assert!(v("17.4.0") < v("17.11.0"));
            assert_eq!(v("18.3.1-ee").to_string(), "18.3");
            assert_eq!(GitLabVersion::parse("garbage"), None);
            assert_eq!(GitLabVersion::parse(""), None);
        }

        #[test]
        fn debug_never_shows_the_api_key() {
            let model = Model {
                api_key: "sk-very-secret".into(),
                ..Default::default()
            };
            let shown = format!(
                "{model:?} {:?}",
                DesiredModel {
                    api_key: "sk-very-secret".into(),
                    ..Default::default()
                }
            );
            assert!(!shown.contains("sk-very-secret"), "{shown}");
            assert!(shown.contains("<redacted>"));
        }
    }
}
