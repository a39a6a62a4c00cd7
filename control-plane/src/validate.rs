//! Field rules of the API (the README's tables) and GitLab's own limits.
//! Each refusal names the field and the rule. Rules that depend on the rest of
//! the configuration (references, compatibility) live in `config`.

use crate::catalog::Catalog;
use crate::error::{ConfigError, quoted};
use duofleet_proto::v1::{FeatureSetting, Model, Profile, Provider};
use std::collections::{BTreeMap, HashSet};

pub const MODEL_NAME_MAX: usize = 255;
pub const URL_MAX: usize = 2048;
pub const IDENTIFIER_MAX: usize = 255;
pub const API_KEY_MAX: usize = 8192;
pub const PROFILE_NAME_MAX: usize = 63;
pub const SELECTOR_MAX: usize = 32;
pub const LABEL_MAX: usize = 63;
pub const DEFAULT_PROFILE: &str = "default";
const IDENTIFIER_PROVIDERS: [&str; 4] = ["custom_openai", "bedrock", "azure", "vertex_ai"];
/// A model's `provider`, as GitLab's AiSelfHostedModelProvider has it.
pub const MODEL_PROVIDERS: [&str; 3] = ["api", "bedrock", "vertex_ai"];

type Result<T = ()> = std::result::Result<T, ConfigError>;

/// Checks every field of a model that is about to be stored.
pub fn model(model: &Model, catalog: &Catalog) -> Result {
    model_name("model.name", &model.name)?;
    if catalog.family(&model.family).is_none() {
        return Err(ConfigError::invalid(
            "model.family",
            format!(
                "unknown family {}; known families: {}",
                quoted(&model.family),
                catalog.family_keys()
            ),
        ));
    }
    if !model.provider.is_empty() && !MODEL_PROVIDERS.contains(&model.provider.as_str()) {
        return Err(ConfigError::invalid(
            "model.provider",
            format!(
                "must be one of {} (got {}); empty infers it from the identifier",
                MODEL_PROVIDERS.join(", "),
                quoted(&model.provider)
            ),
        ));
    }
    identifier(&model.identifier)?;
    api_key(&model.api_key)?;
    let provider = model_provider(model);
    if model.endpoint.is_empty() && provider != "api" {
        // Bedrock and Vertex AI are reached through the AI gateway's own
        // credentials: GitLab (19.0+) takes them without an endpoint.
        return Ok(());
    }
    if model.endpoint.is_empty() {
        return Err(ConfigError::invalid(
            "model.endpoint",
            "required for api models (e.g. https://host:8000/v1); only bedrock and vertex_ai models may have none",
        ));
    }
    let endpoint = http_url("model.endpoint", &model.endpoint)?;
    if model.identifier.starts_with("custom_openai/") && !endpoint.path().ends_with("/v1") {
        return Err(ConfigError::invalid(
            "model.endpoint",
            "must end with /v1 for custom_openai models (e.g. https://host:8000/v1)",
        ));
    }
    Ok(())
}

/// The model's provider: the one given, else inferred from the identifier
/// as GitLab infers it.
pub fn model_provider(model: &Model) -> &str {
    if !model.provider.is_empty() {
        return &model.provider;
    }
    match model.identifier.split('/').next() {
        Some("bedrock") => "bedrock",
        Some("vertex_ai") => "vertex_ai",
        _ => "api",
    }
}

/// A model name: the key. 1 to 255 characters, no control characters.
pub fn model_name(field: &str, name: &str) -> Result {
    let len = name.chars().count();
    if !(1..=MODEL_NAME_MAX).contains(&len) {
        return Err(ConfigError::invalid(
            field,
            format!("must be 1 to {MODEL_NAME_MAX} characters (got {len})"),
        ));
    }
    no_control_chars(field, name)
}

fn api_key(key: &str) -> Result {
    // The value itself never appears in a message.
    if key.len() > API_KEY_MAX {
        return Err(ConfigError::invalid(
            "model.api_key",
            format!("must be at most {API_KEY_MAX} bytes"),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(ConfigError::invalid(
            "model.api_key",
            "must not contain control characters (it is sent as an HTTP header)",
        ));
    }
    Ok(())
}

fn identifier(identifier: &str) -> Result {
    const FIELD: &str = "model.identifier";
    if identifier.is_empty() {
        return Ok(());
    }
    let len = identifier.chars().count();
    if len > IDENTIFIER_MAX {
        return Err(ConfigError::invalid(
            FIELD,
            format!("must be at most {IDENTIFIER_MAX} characters (got {len})"),
        ));
    }
    if identifier
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ConfigError::invalid(
            FIELD,
            "must not contain whitespace or control characters",
        ));
    }
    match identifier.split_once('/') {
        Some((provider, rest)) if IDENTIFIER_PROVIDERS.contains(&provider) && !rest.is_empty() => {
            Ok(())
        }
        _ => Err(ConfigError::invalid(
            FIELD,
            format!(
                "must be custom_openai/<served model name>, bedrock/<model id>, azure/<deployment id> or vertex_ai/<model id> (got {})",
                quoted(identifier)
            ),
        )),
    }
}

/// `host:port` without a scheme, as GitLab takes the Duo Agent Platform
/// service address (it is gRPC), e.g. `dap.example.com:50052`.
pub fn host_port(field: &str, value: &str) -> Result {
    const EXAMPLE: &str = "host:port without a scheme, e.g. dap.example.com:50052";
    let len = value.chars().count();
    if len > URL_MAX {
        return Err(ConfigError::invalid(
            field,
            format!("must be at most {URL_MAX} characters (got {len})"),
        ));
    }
    if value.contains("://") {
        return Err(ConfigError::invalid(
            field,
            format!("must be {EXAMPLE}; GitLab takes no scheme here"),
        ));
    }
    let parsed = url::Url::parse(&format!("grpc://{value}")).ok();
    let valid = parsed.as_ref().is_some_and(|u| {
        u.host_str().is_some_and(|h| !h.is_empty())
            && u.port().is_some()
            && u.path().is_empty()
            && u.username().is_empty()
            && u.password().is_none()
            && u.query().is_none()
            && u.fragment().is_none()
    });
    if !valid {
        return Err(ConfigError::invalid(field, format!("must be {EXAMPLE}")));
    }
    Ok(())
}

/// An absolute http or https URL of at most 2048 characters, with a host and
/// no user:password part, query or fragment.
pub fn http_url(field: &str, value: &str) -> Result<url::Url> {
    let len = value.chars().count();
    if len == 0 {
        return Err(ConfigError::invalid(
            field,
            "required: an absolute http or https URL",
        ));
    }
    if len > URL_MAX {
        return Err(ConfigError::invalid(
            field,
            format!("must be at most {URL_MAX} characters (got {len})"),
        ));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ConfigError::invalid(
            field,
            "must not contain whitespace or control characters",
        ));
    }
    let url = url::Url::parse(value).map_err(|e| {
        ConfigError::invalid(
            field,
            // The value is not echoed: it may hold a credential.
            format!("must be an absolute http or https URL ({e})"),
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::invalid(
            field,
            format!(
                "scheme must be http or https (got {})",
                quoted(url.scheme())
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(field, "must name a host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        // Never echo the URL here: it carries a credential.
        return Err(ConfigError::invalid(
            field,
            "must not contain a user:password part; put credentials in api_key",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::invalid(
            field,
            "must not have a query string or fragment",
        ));
    }
    Ok(url)
}

/// Checks every field of a profile that is about to be stored, except the
/// references to models (see `config`).
pub fn profile(profile: &Profile, catalog: &Catalog) -> Result {
    profile_name("profile.name", &profile.name)?;
    if !profile.ai_gateway_url.is_empty() {
        http_url("profile.ai_gateway_url", &profile.ai_gateway_url)?;
    }
    if !profile.ai_gateway_internal_url.is_empty() {
        http_url(
            "profile.ai_gateway_internal_url",
            &profile.ai_gateway_internal_url,
        )?;
        if profile.ai_gateway_url.is_empty() && profile.parent.is_empty() {
            return Err(ConfigError::invalid(
                "profile.ai_gateway_internal_url",
                "needs ai_gateway_url to be set as well (or inherited from a parent)",
            ));
        }
    }
    if profile.ai_gateway_timeout_seconds != 0
        && !(60..=600).contains(&profile.ai_gateway_timeout_seconds)
    {
        return Err(ConfigError::invalid(
            "profile.ai_gateway_timeout_seconds",
            format!(
                "must be 60 to 600 seconds, as GitLab allows, or 0 to leave GitLab's own (got {})",
                profile.ai_gateway_timeout_seconds
            ),
        ));
    }
    if !profile.duo_agent_platform_service_url.is_empty() {
        host_port(
            "profile.duo_agent_platform_service_url",
            &profile.duo_agent_platform_service_url,
        )?;
    }
    if !profile.parent.is_empty() {
        profile_name("profile.parent", &profile.parent)?;
        if profile.name == DEFAULT_PROFILE {
            return Err(ConfigError::invalid(
                "profile.parent",
                "the default profile inherits from no other: it is where every chain may end",
            ));
        }
        if profile.parent == profile.name {
            return Err(ConfigError::invalid(
                "profile.parent",
                "a profile cannot be its own parent",
            ));
        }
    }
    if let Some(window) = &profile.reconfigure_window {
        duofleet_proto::window::Window::parse(window)
            .map_err(|e| ConfigError::invalid(format!("profile.{}", e.field), e.rule))?;
    }
    selector("profile.selector", &profile.selector)?;
    if profile.name == DEFAULT_PROFILE && !profile.selector.is_empty() {
        return Err(ConfigError::invalid(
            "profile.selector",
            "must be empty for the default profile, which matches every instance",
        ));
    }
    let mut seen = HashSet::new();
    for (index, setting) in profile.features.iter().enumerate() {
        let field = format!("profile.features[{index}]");
        feature_setting(&field, setting, catalog)?;
        if setting.provider() == Provider::Unspecified {
            return Err(ConfigError::invalid(
                format!("{field}.provider"),
                "must be PROVIDER_DISABLED, PROVIDER_VENDOR or PROVIDER_SELF_HOSTED",
            ));
        }
        if !seen.insert(setting.feature.as_str()) {
            return Err(ConfigError::invalid(
                format!("{field}.feature"),
                format!("{} is set more than once", quoted(&setting.feature)),
            ));
        }
    }
    Ok(())
}

/// An instance id or hostname as an agent reports it: 1 to 255 characters,
/// no whitespace or control characters.
pub fn instance_id(field: &str, id: &str) -> Result {
    model_name(field, id)?;
    if id.chars().any(char::is_whitespace) {
        return Err(ConfigError::invalid(field, "must not contain whitespace"));
    }
    Ok(())
}

/// A profile name: 1 to 63 characters of [a-z0-9-].
pub fn profile_name(field: &str, name: &str) -> Result {
    let len = name.chars().count();
    if !(1..=PROFILE_NAME_MAX).contains(&len) {
        return Err(ConfigError::invalid(
            field,
            format!("must be 1 to {PROFILE_NAME_MAX} characters (got {len})"),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(ConfigError::invalid(
            field,
            format!("must contain only a-z, 0-9 and '-' (got {})", quoted(name)),
        ));
    }
    Ok(())
}

/// Labels, as a selector or as an instance carries them: at most 32; keys
/// of 1 to 63 characters of [A-Za-z0-9._/-], values of at most 63 of
/// [A-Za-z0-9._-].
pub fn selector(field: &str, labels: &BTreeMap<String, String>) -> Result {
    if labels.len() > SELECTOR_MAX {
        return Err(ConfigError::invalid(
            field,
            format!("at most {SELECTOR_MAX} labels (got {})", labels.len()),
        ));
    }
    let label_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    for (key, value) in labels {
        let key_len = key.chars().count();
        if !(1..=LABEL_MAX).contains(&key_len) || !key.chars().all(|c| label_char(c) || c == '/') {
            return Err(ConfigError::invalid(
                field,
                format!(
                    "label key {} must be 1 to {LABEL_MAX} characters of A-Z a-z 0-9 . _ - /",
                    quoted(key)
                ),
            ));
        }
        if value.chars().count() > LABEL_MAX || !value.chars().all(label_char) {
            return Err(ConfigError::invalid(
                format!("{field}[{key}]"),
                format!(
                    "label value {} must be at most {LABEL_MAX} characters of A-Z a-z 0-9 . _ -",
                    quoted(value)
                ),
            ));
        }
    }
    Ok(())
}

/// One feature setting, on its own: a known feature, a known provider, and a
/// model exactly when the provider is PROVIDER_SELF_HOSTED.
pub fn feature_setting(field: &str, setting: &FeatureSetting, catalog: &Catalog) -> Result {
    let Some(feature) = catalog.feature(&setting.feature) else {
        return Err(ConfigError::invalid(
            format!("{field}.feature"),
            format!(
                "unknown feature {}; known features: {}",
                quoted(&setting.feature),
                catalog.feature_keys()
            ),
        ));
    };
    if let Some(where_set) = &feature.not_settable {
        return Err(ConfigError::invalid(
            format!("{field}.feature"),
            format!(
                "{} cannot be set per feature: {where_set}",
                quoted(&setting.feature)
            ),
        ));
    }
    let provider = Provider::try_from(setting.provider).map_err(|_| {
        ConfigError::invalid(
            format!("{field}.provider"),
            format!("unknown provider value {}", setting.provider),
        )
    })?;
    match (provider, setting.model.is_empty()) {
        (Provider::SelfHosted, true) => Err(ConfigError::invalid(
            format!("{field}.model"),
            "required with PROVIDER_SELF_HOSTED: name a model",
        )),
        (Provider::SelfHosted, false) => model_name(&format!("{field}.model"), &setting.model),
        (_, false) => Err(ConfigError::invalid(
            format!("{field}.model"),
            format!(
                "only allowed with PROVIDER_SELF_HOSTED (provider is {})",
                provider.as_str_name()
            ),
        )),
        (_, true) => Ok(()),
    }
}

fn no_control_chars(field: &str, value: &str) -> Result {
    match value.chars().position(char::is_control) {
        Some(position) => Err(ConfigError::invalid(
            field,
            format!(
                "must not contain control characters (found U+{:04X} at position {position})",
                value.chars().nth(position).map_or(0, u32::from)
            ),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog;

    fn mk_model() -> Model {
        Model {
            name: "mixtral-prod".into(),
            family: "mixtral".into(),
            endpoint: "https://vllm.internal:8000/v1".into(),
            identifier: "custom_openai/Mixtral-8x7B-Instruct-v0.1".into(),
            ..Default::default()
        }
    }

    fn model_err(edit: impl FnOnce(&mut Model)) -> String {
        let mut m = mk_model();
        edit(&mut m);
        model(&m, catalog::get()).unwrap_err().to_string()
    }

    #[test]
    fn gitlab_settings_follow_gitlab_rules() {
        let catalog = catalog::get();
        let mut p = Profile {
            name: "default".into(),
            ai_gateway_timeout_seconds: 59,
            ..Default::default()
        };
        assert!(
            profile(&p, catalog)
                .unwrap_err()
                .to_string()
                .starts_with("profile.ai_gateway_timeout_seconds: must be 60 to 600 seconds")
        );
        p.ai_gateway_timeout_seconds = 600;
        profile(&p, catalog).unwrap();
        for bad in [
            "https://dap.example.com:50052",
            "dap.example.com",
            "dap:50052/x",
            "u:p@dap:1",
        ] {
            p.duo_agent_platform_service_url = bad.into();
            let err = profile(&p, catalog).unwrap_err().to_string();
            assert!(
                err.starts_with("profile.duo_agent_platform_service_url: must be host:port"),
                "{bad}: {err}"
            );
        }
        p.duo_agent_platform_service_url = "dap.example.com:50052".into();
        profile(&p, catalog).unwrap();
    }

    #[test]
    fn accepts_a_typical_vllm_model() {
        model(&mk_model(), catalog::get()).unwrap();
    }

    #[test]
    fn names_field_and_rule() {
        assert_eq!(
            model_err(|m| m.name = String::new()),
            "model.name: must be 1 to 255 characters (got 0)"
        );
        assert_eq!(
            model_err(|m| m.name = "a\u{7}b".into()),
            "model.name: must not contain control characters (found U+0007 at position 1)"
        );
        assert!(
            model_err(|m| m.family = "nope".into())
                .starts_with("model.family: unknown family \"nope\"")
        );
        assert_eq!(
            model_err(|m| m.endpoint = "https://vllm:8000".into()),
            "model.endpoint: must end with /v1 for custom_openai models (e.g. https://host:8000/v1)"
        );
        assert_eq!(
            model_err(|m| m.endpoint = "https://u:secret@vllm:8000/v1".into()),
            "model.endpoint: must not contain a user:password part; put credentials in api_key"
        );
        assert_eq!(
            model_err(|m| m.endpoint = "ftp://vllm/v1".into()),
            "model.endpoint: scheme must be http or https (got \"ftp\")"
        );
        assert!(
            model_err(|m| m.identifier = "openai/x".into())
                .starts_with("model.identifier: must be custom_openai/")
        );
    }

    #[test]
    fn bedrock_endpoint_needs_no_v1() {
        let mut m = mk_model();
        m.identifier = "bedrock/mistral.mixtral-8x7b-instruct-v0:1".into();
        m.endpoint = "https://bedrock-runtime.us-east-1.amazonaws.com".into();
        model(&m, catalog::get()).unwrap();
    }

    #[test]
    fn hostile_values_are_not_echoed_whole() {
        let err = model_err(|m| m.family = "x".repeat(1 << 20));
        assert!(err.len() < 500, "{}", err.len());
    }

    #[test]
    fn api_key_never_appears_in_a_refusal() {
        let err = model_err(|m| m.api_key = "sk-secret\nvalue".into());
        assert!(!err.contains("sk-secret"));
        assert!(err.starts_with("model.api_key:"));
    }

    #[test]
    fn profile_rules() {
        let catalog = catalog::get();
        let mut p = Profile {
            name: "Canary".into(),
            ..Default::default()
        };
        assert!(
            profile(&p, catalog)
                .unwrap_err()
                .to_string()
                .starts_with("profile.name: must contain only")
        );
        p.name = "canary".into();
        p.features.push(FeatureSetting {
            feature: "duo_chat".into(),
            provider: Provider::Vendor as i32,
            model: "m".into(),
        });
        assert_eq!(
            profile(&p, catalog).unwrap_err().to_string(),
            "profile.features[0].model: only allowed with PROVIDER_SELF_HOSTED (provider is PROVIDER_VENDOR)"
        );
        p.features[0].model.clear();
        p.features.push(FeatureSetting {
            feature: "embeddings_code".into(),
            provider: Provider::Vendor as i32,
            model: String::new(),
        });
        assert_eq!(
            profile(&p, catalog).unwrap_err().to_string(),
            "profile.features[1].feature: \"embeddings_code\" cannot be set per feature: GitLab sets it through Semantic Search (Admin > GitLab Duo), not through its feature settings API"
        );
        p.features.pop();
        p.features.push(p.features[0].clone());
        assert_eq!(
            profile(&p, catalog).unwrap_err().to_string(),
            "profile.features[1].feature: \"duo_chat\" is set more than once"
        );
        p.features.pop();
        p.selector = (0..33)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert_eq!(
            profile(&p, catalog).unwrap_err().to_string(),
            "profile.selector: at most 32 labels (got 33)"
        );
    }
}
