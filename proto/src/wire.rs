//! What duofleetd sends on an agent's stream, encoded once.
//!
//! A fleet's agents mostly get the same DesiredConfig: one per revision and
//! profile. `ControlFrame` holds a ControlMessage already encoded as a gRPC
//! message (the flag byte, the length, the protobuf), so that the daemon
//! encodes each distinct message once and every stream sends the shared
//! bytes. Agents and grpcurl decode them as any ControlMessage.

use crate::v1::{ControlMessage, DesiredConfig, control_message};
use prost::Message;
use prost::bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

/// A ControlMessage framed for gRPC. Cloning shares the bytes.
#[derive(Clone, Default, PartialEq)]
pub struct ControlFrame(Bytes);

/// The gRPC message header: a flag byte (0: not compressed) and the
/// length, big-endian.
const GRPC_HEADER_BYTES: usize = 5;

impl ControlFrame {
    pub fn new(message: &ControlMessage) -> ControlFrame {
        let len = message.encoded_len();
        let mut buf = BytesMut::with_capacity(GRPC_HEADER_BYTES + len);
        buf.put_u8(0);
        buf.put_u32(u32::try_from(len).expect("a ControlMessage under 4 GiB"));
        message.encode_raw(&mut buf);
        ControlFrame(buf.freeze())
    }

    /// The frame of a ControlMessage carrying `desired`.
    pub fn desired(desired: &DesiredConfig) -> ControlFrame {
        ControlFrame::new(&ControlMessage {
            message: Some(control_message::Message::DesiredConfig(desired.clone())),
        })
    }

    /// The bytes to send: the gRPC message, header included.
    pub fn bytes(&self) -> &Bytes {
        &self.0
    }
}

/// The bytes may hold API keys: never printed.
impl std::fmt::Debug for ControlFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlFrame({} bytes)", self.0.len())
    }
}

/// A digest of what a DesiredConfig asks for, its revision left out: two
/// revisions that give an instance the same configuration have the same
/// digest. Hex SHA-256 of the message's protobuf encoding, so it is stable
/// across processes and versions: an agent keeps the digest of what it
/// applied and says it in its Hello, and a restarted daemon sends nothing
/// to an agent that already has the content.
pub fn content_digest(desired: &DesiredConfig) -> String {
    let content = DesiredConfig {
        revision: 0,
        ..desired.clone()
    };
    hex::encode(Sha256::digest(content.encode_to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::DesiredModel;

    fn desired(revision: u64, url: &str) -> DesiredConfig {
        DesiredConfig {
            revision,
            profile: "default".into(),
            ai_gateway_url: url.into(),
            models: vec![DesiredModel {
                name: "m".into(),
                api_key: "secret-key".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_frame_decodes_as_the_control_message_it_holds() {
        let message = ControlMessage {
            message: Some(control_message::Message::DesiredConfig(desired(
                7,
                "https://aigw",
            ))),
        };
        let frame = ControlFrame::new(&message);
        let wire = frame.bytes();
        // Not compressed, and the length of what follows.
        assert_eq!(wire[0], 0);
        let len = u32::from_be_bytes([wire[1], wire[2], wire[3], wire[4]]) as usize;
        assert_eq!(len, wire.len() - 5);
        assert_eq!(ControlMessage::decode(&wire[5..]).unwrap(), message);
        assert!(!format!("{frame:?}").contains("secret"));
    }

    #[test]
    fn the_digest_ignores_the_revision_and_nothing_else() {
        let a = content_digest(&desired(1, "https://aigw"));
        assert_eq!(a, content_digest(&desired(9, "https://aigw")));
        assert_ne!(a, content_digest(&desired(1, "https://aigw-2")));
        // Stable across versions (agents persist it): the digest of an
        // empty DesiredConfig is SHA-256 of no bytes.
        assert_eq!(
            content_digest(&DesiredConfig::default()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
