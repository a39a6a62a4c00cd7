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

/// The encoded `FileDescriptorSet` of every duofleet.v1 file and its
/// imports, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/duofleet_descriptor.bin"));

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
        use super::*;

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
