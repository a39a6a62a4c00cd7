//! Property tests: no input an operator or an agent can send makes the
//! validators, the agent-message limits or the configuration operations
//! panic; each answers Ok or a refusal that names a field.

use crate::agent_input;
use crate::catalog;
use crate::config::{Config, default_profile};
use crate::validate;
use duofleet_proto::v1::{AgentMessage, FeatureSetting, Model, Profile};
use proptest::prelude::*;
use prost::Message;

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,40}",
        "[a-z0-9_/:.-]{0,300}",
        "(https?|ftp|grpc)://[a-z0-9.:@/-]{0,60}",
        proptest::collection::vec(any::<char>(), 0..80).prop_map(|c| c.into_iter().collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn model_validation_never_panics(
        name in any_text(),
        family in any_text(),
        endpoint in any_text(),
        api_key in any_text(),
        identifier in any_text(),
    ) {
        let model = Model { name, family, endpoint, api_key, identifier, ..Default::default() };
        if let Err(e) = validate::model(&model, catalog::get()) {
            let text = e.to_string();
            prop_assert!(text.starts_with("model."), "{text}");
            prop_assert!(text.len() < 2048, "a refusal echoed too much: {} bytes", text.len());
        }
    }

    #[test]
    fn profile_operations_never_panic(
        name in any_text(),
        url in any_text(),
        feature in any_text(),
        provider in 0i32..6,
        model in any_text(),
        timeout in any::<u32>(),
        dap in any_text(),
    ) {
        let mut config = Config::default();
        config.profiles.insert("default".into(), default_profile());
        let profile = Profile {
            name,
            ai_gateway_url: url,
            ai_gateway_timeout_seconds: timeout,
            duo_agent_platform_service_url: dap,
            features: vec![FeatureSetting { feature, provider, model }],
            ..Default::default()
        };
        if let Err(e) = config.create_profile(catalog::get(), profile) {
            prop_assert!(!e.to_string().is_empty());
        }
    }

    #[test]
    fn agent_messages_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(message) = AgentMessage::decode(bytes.as_slice()) {
            let _ = agent_input::message(&message);
        }
    }
}
