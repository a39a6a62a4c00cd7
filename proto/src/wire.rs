//! What duofleetd sends on an agent's stream, encoded once.
//!
//! A fleet's agents mostly get the same DesiredConfig: one per revision and
//! profile. `ControlFrame` holds a ControlMessage already encoded, so that
//! the daemon encodes each distinct message once and every stream sends the
//! shared bytes. `agent_service_server` here is the generated AgentService
//! server with ControlFrame in place of ControlMessage (see `build.rs`);
//! the bytes on the wire are exactly the ControlMessage's encoding, so
//! agents and grpcurl decode them as before.

use crate::v1::{ControlMessage, DesiredConfig, control_message};
use prost::Message;
use prost::bytes::{Buf, BufMut, Bytes};
use prost::encoding::{DecodeContext, WireType, skip_field};
use sha2::{Digest, Sha256};

include!(concat!(env!("OUT_DIR"), "/wire/duofleet.v1.rs"));

/// An encoded ControlMessage. Cloning shares the bytes.
#[derive(Clone, Default, PartialEq)]
pub struct ControlFrame(Bytes);

impl ControlFrame {
    pub fn new(message: &ControlMessage) -> ControlFrame {
        ControlFrame(message.encode_to_vec().into())
    }

    /// The frame of a ControlMessage carrying `desired`.
    pub fn desired(desired: &DesiredConfig) -> ControlFrame {
        ControlFrame::new(&ControlMessage {
            message: Some(control_message::Message::DesiredConfig(desired.clone())),
        })
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The bytes may hold API keys: never printed.
impl std::fmt::Debug for ControlFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlFrame({} bytes)", self.0.len())
    }
}

/// Encodes as the ControlMessage it holds. Only the server encodes frames;
/// decoding one keeps nothing (agents decode ControlMessage).
impl Message for ControlFrame {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

/// The AgentService server's codec: protobuf, with small starting
/// buffers. tonic's default is 8 KiB each way per stream; an agent's
/// messages are a few hundred bytes, and the buffers grow when a message
/// needs more. With tens of thousands of streams that is most of the
/// daemon's memory per agent.
#[derive(Debug, Clone, Copy)]
pub struct AgentCodec {
    settings: tonic::codec::BufferSettings,
}

impl Default for AgentCodec {
    fn default() -> Self {
        AgentCodec {
            settings: tonic::codec::BufferSettings::new(AGENT_BUFFER_BYTES, YIELD_THRESHOLD_BYTES),
        }
    }
}

/// Where an agent stream's encode and decode buffers start.
const AGENT_BUFFER_BYTES: usize = 1024;
/// tonic's default: how much an encoder may buffer before it yields.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

impl tonic::codec::Codec for AgentCodec {
    type Encode = ControlFrame;
    type Decode = crate::v1::AgentMessage;
    type Encoder = tonic_prost::ProstEncoder<ControlFrame>;
    type Decoder = tonic_prost::ProstDecoder<crate::v1::AgentMessage>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(self.settings)
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(self.settings)
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
        // Encoded as tonic's codec does: through Message::encode.
        let mut wire = Vec::new();
        frame.encode(&mut wire).unwrap();
        assert_eq!(ControlMessage::decode(wire.as_slice()).unwrap(), message);
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
