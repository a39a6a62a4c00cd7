//! A GitLab stand-in: `GET /api/v4/version` and the part of GitLab's GraphQL
//! API that duofleet-agent speaks, following real GitLab version by version
//! (the table is in `schema.rs`). GitLab itself cannot run here; everything
//! that talks to it is real.
//!
//! What it keeps from the real thing, because duofleet must cope with it:
//! - an administrator token, else HTTP 401 `{"message": "Invalid token"}`;
//! - input types checked per version: an unknown or missing argument, or an
//!   unknown enum value, is a top-level error that fails the whole request,
//!   in GitLab's wording;
//! - `model`, `feature` and `provider` come back in lower case, an unset
//!   `identifier` as `""`; `apiToken` returns the decrypted key to an
//!   administrator, as GitLab's type does;
//! - a model's `provider` from 18.11 (optional, inferred from the
//!   identifier; required by 19.3), an optional endpoint from 19.0 except
//!   for the API provider;
//! - families, features, compatibility and titles by version to 19.3, and
//!   the agent-platform licence gate (`no_dap_add_on`): a top-level
//!   "You don't have permission to update the setting ai_self_hosted_model_id.";
//! - models of beta families and beta features are hidden until the
//!   testing terms are accepted; Premium drops the vulnerability features;
//!   unset features list as `vendored` on 17.x and `unassigned` on 18.x;
//! - `aiSelfHostedModelUpdate` keeps what an omitted argument held;
//! - `aiFeatureSettingUpdate` takes `feature:` before 17.11 and `features:`
//!   from it, and saves each feature on its own (a call can half-succeed);
//! - deleting a model deletes the feature settings that point to it;
//! - `duoSettingsUpdate` trims a trailing `/`, refuses localhost in
//!   production and takes at most 2048 characters.
//!
//! Every request is logged with its variables, so that tests can show what
//! was sent, and `fail` makes one item's mutation fail at the top level.

pub mod schema;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use schema::Version;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct SimModel {
    pub id: u64,
    pub name: String,
    /// Lower case, as GitLab stores the enum.
    pub model: String,
    pub endpoint: String,
    pub identifier: String,
    pub api_token: String,
    /// Upper case (`API`, `BEDROCK`, `VERTEX_AI`); 18.11+ infers it from
    /// the identifier when none is given.
    pub provider: String,
}

/// One request the simulator answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Logged {
    /// `query`, `mutation` or `unauthorized`.
    pub kind: String,
    /// The root field, e.g. `aiSelfHostedModelCreate`.
    pub field: String,
    /// The mutation's `input` variable (`null` for queries).
    pub input: Value,
}

#[derive(Debug, Default)]
pub struct Sim {
    pub version: String,
    pub token: String,
    pub models: BTreeMap<u64, SimModel>,
    next_id: u64,
    /// feature (lower case) -> (provider, lower case; model id). Absent: unset.
    pub features: BTreeMap<String, (String, Option<u64>)>,
    /// The database setting `duoSettings.aiGatewayUrl`.
    pub ai_gateway_url: Option<String>,
    pub ai_gateway_timeout_seconds: i64,
    pub duo_agent_platform_service_url: Option<String>,
    /// "Use beta models and features" was accepted.
    pub testing_terms_accepted: bool,
    /// A Premium license: no vulnerability features.
    pub premium: bool,
    /// Development mode: localhost gateway URLs are allowed.
    pub development: bool,
    /// The license lacks the self-hosted agent-platform add-on: assigning a
    /// self-hosted model to an agent-platform feature is refused.
    pub no_dap_add_on: bool,
    pub log: Vec<Logged>,
    /// Model name or feature key -> a top-level error for its mutations.
    pub fail: BTreeMap<String, String>,
    /// GitLab is restarting: every request gets HTTP 502.
    pub down: bool,
    /// The token belongs to a user who is not an administrator: queries
    /// answer null, mutations a top-level permission error.
    pub not_admin: bool,
    /// Endpoint -> what the AI gateway answers GitLab's connection check
    /// (the gateway and the model cannot run here); absent: success.
    pub unreachable: BTreeMap<String, String>,
}

fn gid(id: u64) -> String {
    format!("gid://gitlab/Ai::SelfHostedModel/{id}")
}

fn parse_gid(value: &Value) -> Option<u64> {
    value
        .as_str()?
        .strip_prefix("gid://gitlab/Ai::SelfHostedModel/")?
        .parse()
        .ok()
}

fn top_level(message: impl Into<String>) -> Value {
    json!({ "errors": [{ "message": message.into() }] })
}

fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

const QUERIES: &[&str] = &["aiSelfHostedModels", "aiFeatureSettings", "duoSettings"];
const MUTATIONS: &[&str] = &[
    "aiSelfHostedModelCreate",
    "aiSelfHostedModelUpdate",
    "aiSelfHostedModelDelete",
    "aiSelfHostedModelConnectionCheck",
    "aiFeatureSettingUpdate",
    "duoSettingsUpdate",
];

impl Sim {
    pub fn new(version: &str, token: &str) -> Sim {
        Sim {
            version: version.into(),
            token: token.into(),
            ai_gateway_timeout_seconds: 60,
            ..Default::default()
        }
    }

    fn v(&self) -> Version {
        Version::parse(&self.version)
    }

    /// The root fields of the mutations answered, in order.
    pub fn mutations(&self) -> Vec<String> {
        self.mutation_log()
            .into_iter()
            .map(|l| l.field.clone())
            .collect()
    }

    pub fn mutation_log(&self) -> Vec<&Logged> {
        self.log.iter().filter(|l| l.kind == "mutation").collect()
    }

    /// Adds a model as an administrator would in the Admin UI (`model` in
    /// any case).
    pub fn add_model_by_hand(&mut self, name: &str, model: &str) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.models.insert(
            id,
            SimModel {
                id,
                name: name.into(),
                model: model.to_lowercase(),
                endpoint: "https://by-hand:8000/v1".into(),
                identifier: String::new(),
                api_token: String::new(),
                provider: "API".into(),
            },
        );
        id
    }

    pub fn model_named(&self, name: &str) -> Option<&SimModel> {
        self.models.values().find(|m| m.name == name)
    }

    /// The setting GitLab lists for `feature`: (provider, model id).
    pub fn feature(&self, feature: &str) -> (String, Option<u64>) {
        self.features
            .get(feature)
            .cloned()
            .unwrap_or_else(|| (self.unset_provider().to_string(), None))
    }

    fn unset_provider(&self) -> &'static str {
        if self.v().at_least(18, 0) {
            "unassigned"
        } else {
            "vendored"
        }
    }

    fn family_visible(&self, family: &str) -> bool {
        self.testing_terms_accepted
            || schema::FAMILIES
                .iter()
                .find(|f| f.name.eq_ignore_ascii_case(family))
                .is_some_and(|f| !f.beta)
    }

    /// The features `aiFeatureSettings` lists on this instance.
    fn allowed_features(&self) -> Vec<&'static schema::Feature> {
        let v = self.v();
        schema::FEATURES
            .iter()
            .filter(|f| f.since <= v && f.in_enum)
            .filter(|f| self.testing_terms_accepted || !f.beta_at(v))
            .filter(|f| !(self.premium && f.ultimate_only))
            .collect()
    }

    fn graphql(&mut self, query: &str, variables: &Value) -> Value {
        let kind = if query.trim_start().starts_with("mutation") {
            "mutation"
        } else {
            "query"
        };
        let roots: &[&str] = if kind == "mutation" {
            MUTATIONS
        } else {
            QUERIES
        };
        let Some(field) = roots
            .iter()
            .find(|f| query.contains(&format!("{f}(")) || query.contains(&format!("{f} {{")))
            .copied()
        else {
            return top_level("the simulator knows no such operation");
        };
        let input = variables["input"].clone();
        self.log.push(Logged {
            kind: kind.into(),
            field: field.into(),
            input: if kind == "mutation" {
                input.clone()
            } else {
                Value::Null
            },
        });
        let v = self.v();
        if self.not_admin {
            if kind == "query" {
                return json!({ "data": { field: null } });
            }
            return top_level(
                "The resource that you are attempting to access does not exist or you don't have permission to perform this action",
            );
        }
        if kind == "query" {
            if query_since(field).is_none_or(|since| v < since) {
                return top_level(format!("Field '{field}' doesn't exist on type 'Query'"));
            }
            if field == "aiSelfHostedModels"
                && let Some(unknown) = selection(query, "nodes")
                    .into_iter()
                    .find(|f| !schema::model_fields(v).contains(&f.as_str()))
            {
                return top_level(format!(
                    "Field '{unknown}' doesn't exist on type 'AiSelfHostedModel'"
                ));
            }
            if field == "duoSettings"
                && let Some(unknown) = selection(query, field)
                    .into_iter()
                    .find(|f| !schema::duo_settings_fields(v).contains(&f.as_str()))
            {
                return top_level(format!(
                    "Field '{unknown}' doesn't exist on type 'DuoSettings'"
                ));
            }
            let data = match field {
                "aiSelfHostedModels" => self.list_models(),
                "aiFeatureSettings" => self.list_features(),
                _ => self.duo_settings(),
            };
            return json!({ "data": { field: data } });
        }
        let Some(fields) = schema::input_fields(field, v) else {
            return top_level(format!("Field '{field}' doesn't exist on type 'Mutation'"));
        };
        if let Some(error) = check_input(field, &fields, &input, v) {
            return top_level(error);
        }
        let item = match field {
            "aiFeatureSettingUpdate" => input["features"]
                .get(0)
                .or(input.get("feature"))
                .and_then(Value::as_str)
                .map(str::to_lowercase),
            "aiSelfHostedModelCreate" | "aiSelfHostedModelUpdate" => {
                input["name"].as_str().map(str::to_string)
            }
            "aiSelfHostedModelDelete" => parse_gid(&input["id"])
                .and_then(|id| self.models.get(&id))
                .map(|m| m.name.clone()),
            _ => None,
        };
        if let Some(message) = item.and_then(|i| self.fail.get(&i)) {
            return top_level(message.clone());
        }
        if field == "aiFeatureSettingUpdate" && self.dap_gate_refuses(&input) {
            return top_level(
                "You don't have permission to update the setting ai_self_hosted_model_id.",
            );
        }
        let data = match field {
            "aiSelfHostedModelCreate" => self.save_model(None, &input),
            "aiSelfHostedModelUpdate" => {
                match parse_gid(&input["id"]).filter(|id| self.models.contains_key(id)) {
                    Some(id) => self.save_model(Some(id), &input),
                    None => {
                        json!({ "selfHostedModel": null, "errors": ["Self-hosted model not found"] })
                    }
                }
            }
            "aiSelfHostedModelDelete" => {
                match parse_gid(&input["id"]).and_then(|id| self.models.remove(&id).map(|_| id)) {
                    Some(id) => {
                        // Database cascade: settings that pointed to it go.
                        self.features.retain(|_, (_, m)| *m != Some(id));
                        json!({ "errors": [] })
                    }
                    None => json!({ "errors": ["Self-hosted model not found"] }),
                }
            }
            "aiSelfHostedModelConnectionCheck" => {
                let endpoint = input["endpoint"].as_str().unwrap_or_default();
                match self.unreachable.get(endpoint) {
                    None => json!({ "result": {
                        "success": true,
                        "message": "Successfully connected to the self-hosted model",
                    }, "errors": [] }),
                    Some(message) => json!({ "result": {
                        "success": false, "message": message,
                    }, "errors": [] }),
                }
            }
            "aiFeatureSettingUpdate" => self.update_features(&input),
            _ => self.update_duo_settings(&input),
        };
        json!({ "data": { field: data } })
    }

    fn list_models(&self) -> Value {
        let v = self.v();
        json!({ "nodes": self.models.values().filter(|m| self.family_visible(&m.model)).map(|m| {
            let mut node = json!({
                "id": gid(m.id), "name": m.name, "model": m.model,
                "endpoint": (!m.endpoint.is_empty()).then_some(&m.endpoint),
                "identifier": m.identifier, "hasApiToken": !m.api_token.is_empty(),
                // Decrypted, to an administrator.
                "apiToken": (!m.api_token.is_empty()).then_some(&m.api_token),
            });
            if v.at_least(18, 11) {
                node["provider"] = json!(m.provider);
            }
            node
        }).collect::<Vec<_>>() })
    }

    fn list_features(&self) -> Value {
        json!({ "nodes": self.allowed_features().iter().map(|f| {
            let (provider, model) = self.feature(f.key);
            json!({
                "feature": f.key, "provider": provider, "title": f.title,
                "selfHostedModel": model.map(|id| json!({ "id": gid(id) })),
            })
        }).collect::<Vec<_>>() })
    }

    fn duo_settings(&self) -> Value {
        json!({
            "aiGatewayUrl": self.ai_gateway_url,
            "aiGatewayTimeoutSeconds": self.ai_gateway_timeout_seconds,
            "duoAgentPlatformServiceUrl": self.duo_agent_platform_service_url,
        })
    }

    fn save_model(&mut self, id: Option<u64>, input: &Value) -> Value {
        let text = |k: &str| input[k].as_str().unwrap_or_default().to_string();
        let mut errors = Vec::new();
        if text("name").is_empty() {
            errors.push("Name can't be blank".to_string());
        }
        if text("name").chars().count() > 255 {
            errors.push("Name is too long (maximum is 255 characters)".to_string());
        }
        if self
            .models
            .values()
            .any(|m| m.name == text("name") && Some(m.id) != id)
        {
            errors.push("Name has already been taken".to_string());
        }
        let before = id.and_then(|id| self.models.get(&id)).cloned();
        // 18.11+: the provider given, else the stored one, else inferred
        // from the identifier as GitLab infers it.
        let identifier = match input.get("identifier").and_then(Value::as_str) {
            Some(identifier) => identifier.to_string(),
            None => before
                .as_ref()
                .map(|m| m.identifier.clone())
                .unwrap_or_default(),
        };
        let provider = match input.get("provider").and_then(Value::as_str) {
            Some(provider) => provider.to_string(),
            None => match &before {
                Some(m) if !m.provider.is_empty() => m.provider.clone(),
                _ => match identifier.split('/').next() {
                    Some("bedrock") => "BEDROCK".into(),
                    Some("vertex_ai") => "VERTEX_AI".into(),
                    _ => "API".into(),
                },
            },
        };
        let endpoint = match input.get("endpoint").and_then(Value::as_str) {
            Some(endpoint) => endpoint.to_string(),
            None => before
                .as_ref()
                .map(|m| m.endpoint.clone())
                .unwrap_or_default(),
        };
        if endpoint.is_empty() && provider == "API" {
            errors.push("Endpoint can't be blank".to_string());
        } else if !(endpoint.is_empty()
            || endpoint.starts_with("http://")
            || endpoint.starts_with("https://"))
        {
            errors.push("Endpoint is blocked: Only allowed schemes are http, https".to_string());
        }
        if endpoint.chars().count() > 2048 {
            errors.push("Endpoint is too long (maximum is 2048 characters)".to_string());
        }
        if text("identifier").chars().count() > 255 {
            errors.push("Identifier is too long (maximum is 255 characters)".to_string());
        }
        if !errors.is_empty() {
            // Create joins its messages into one; update lists them.
            let errors = if id.is_none() {
                vec![errors.join(", ")]
            } else {
                errors
            };
            return json!({ "selfHostedModel": null, "errors": errors });
        }
        let id = id.unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id
        });
        // An omitted argument keeps its stored value.
        let kept = |k: &str, old: Option<&String>| match input.get(k).and_then(Value::as_str) {
            Some(v) => v.to_string(),
            None => old.cloned().unwrap_or_default(),
        };
        let model = SimModel {
            id,
            name: text("name"),
            model: text("model").to_lowercase(),
            endpoint,
            identifier,
            api_token: kept("apiToken", before.as_ref().map(|m| &m.api_token)),
            provider: if self.v().at_least(18, 11) {
                provider
            } else {
                String::new()
            },
        };
        self.models.insert(id, model);
        json!({ "selfHostedModel": { "id": gid(id) }, "errors": [] })
    }

    /// Whether the license's missing agent-platform add-on refuses this
    /// assignment of a self-hosted model.
    fn dap_gate_refuses(&self, input: &Value) -> bool {
        let self_hosted = input["provider"]
            .as_str()
            .is_some_and(|p| p.eq_ignore_ascii_case("self_hosted"));
        let named = input["features"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(input.get("feature"))
            .filter_map(Value::as_str)
            .map(str::to_lowercase);
        self.no_dap_add_on
            && self_hosted
            && named
                .into_iter()
                .any(|f| schema::FEATURES.iter().any(|m| m.key == f && m.dap_gate))
    }

    fn update_features(&mut self, input: &Value) -> Value {
        let features: Vec<String> = match input.get("features") {
            Some(list) => list
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_lowercase))
                .collect(),
            None => vec![input["feature"].as_str().unwrap_or_default().to_lowercase()],
        };
        if features.is_empty() {
            return json!({ "aiFeatureSettings": [], "errors": ["At least one feature is required"] });
        }
        let provider = input["provider"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        let model = parse_gid(&input["aiSelfHostedModelId"]).filter(|_| provider == "self_hosted");
        let v = self.v();
        let mut errors = Vec::new();
        // Each feature is saved on its own.
        for feature in features {
            let Some(meta) = schema::FEATURES.iter().find(|f| f.key == feature) else {
                continue;
            };
            if provider == "self_hosted" {
                match model.and_then(|id| self.models.get(&id)) {
                    None => {
                        errors.push("Self hosted model can't be blank".to_string());
                        continue;
                    }
                    Some(m) if !meta.accepts(&m.model, v) => {
                        errors.push(format!(
                            "{} is incompatible with the {} feature",
                            capitalize(&m.model),
                            meta.title_at(v)
                        ));
                        continue;
                    }
                    Some(_) => {}
                }
            }
            self.features.insert(feature, (provider.clone(), model));
        }
        json!({ "errors": errors })
    }

    fn update_duo_settings(&mut self, input: &Value) -> Value {
        let mut errors = Vec::new();
        let mut next = (
            self.ai_gateway_url.clone(),
            self.ai_gateway_timeout_seconds,
            self.duo_agent_platform_service_url.clone(),
        );
        if let Some(url) = input.get("aiGatewayUrl") {
            let url = url.as_str().unwrap_or_default();
            let url = url.strip_suffix('/').unwrap_or(url);
            if url.chars().count() > 2048 {
                errors.push("Ai gateway url is too long (maximum is 2048 characters)".to_string());
            } else if !self.development
                && ["://localhost", "://127.", "://[::1]"]
                    .iter()
                    .any(|l| url.contains(l))
            {
                errors.push(
                    "Ai gateway url is blocked: Requests to localhost are not allowed".to_string(),
                );
            }
            next.0 = Some(url.to_string()).filter(|u| !u.is_empty());
        }
        if let Some(seconds) = input.get("aiGatewayTimeoutSeconds") {
            let seconds = seconds.as_i64().unwrap_or_default();
            if !(60..=600).contains(&seconds) {
                errors.push(
                    "Ai gateway timeout seconds must be between 60 and 600 seconds".to_string(),
                );
            }
            next.1 = seconds;
        }
        if let Some(url) = input.get("duoAgentPlatformServiceUrl") {
            let url = url.as_str().unwrap_or_default();
            let url = url.strip_suffix('/').unwrap_or(url);
            next.2 = Some(url.to_string()).filter(|u| !u.is_empty());
        }
        if errors.is_empty() {
            (
                self.ai_gateway_url,
                self.ai_gateway_timeout_seconds,
                self.duo_agent_platform_service_url,
            ) = next;
        }
        json!({ "duoSettings": self.duo_settings(), "errors": errors })
    }
}

fn query_since(field: &str) -> Option<Version> {
    schema::query_since(field)
}

/// The names in `field { ... }` of a query (one level, no nesting).
fn selection(query: &str, field: &str) -> Vec<String> {
    let Some(start) = query.find(&format!("{field} {{")) else {
        return Vec::new();
    };
    let rest = &query[start + field.len() + 2..];
    let end = rest.find('}').unwrap_or(rest.len());
    rest[..end].split_whitespace().map(str::to_string).collect()
}

/// GitLab's validation of a mutation's `$input` variable: every field
/// known, required ones present, enum values known. `None` when valid.
fn check_input(field: &str, fields: &[(&str, bool)], input: &Value, v: Version) -> Option<String> {
    let type_name = schema::input_type(field);
    let invalid = |name: &str, why: String| {
        format!(
            "Variable $input of type {type_name}! was provided invalid value for {name} ({why})"
        )
    };
    let Some(object) = input.as_object() else {
        return Some(invalid("input", "Expected value to not be null".into()));
    };
    for name in object.keys() {
        if !fields.iter().any(|(f, _)| f == name) {
            return Some(invalid(
                name,
                format!("Field is not defined on {type_name}"),
            ));
        }
    }
    for (name, required) in fields {
        if *required && object.get(*name).is_none_or(Value::is_null) {
            return Some(invalid(name, "Expected value to not be null".into()));
        }
    }
    let families: Vec<&str> = schema::FAMILIES
        .iter()
        .filter(|f| f.since <= v)
        .map(|f| f.name)
        .collect();
    let features: Vec<String> = schema::FEATURES
        .iter()
        .filter(|f| f.since <= v && f.in_enum)
        .map(|f| f.key.to_uppercase())
        .collect();
    let providers = schema::providers(v);
    let enum_check = |name: String, value: &Value, allowed: Vec<String>| {
        let text = value.as_str().unwrap_or_default();
        (!allowed.iter().any(|a| a == text)).then(|| {
            invalid(
                &name,
                format!("Expected \"{text}\" to be one of: {}", allowed.join(", ")),
            )
        })
    };
    let owned = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if let Some(model) = object.get("model") {
        if let Some(provider) = object.get("provider") {
            let known = enum_check("provider".into(), provider, owned(schema::MODEL_PROVIDERS));
            if known.is_some() {
                return known;
            }
        }
        return enum_check("model".into(), model, owned(&families));
    }
    if let Some(provider) = object.get("provider")
        && let Some(error) = enum_check("provider".into(), provider, owned(&providers))
    {
        return Some(error);
    }
    if let Some(feature) = object.get("feature") {
        return enum_check("feature".into(), feature, features);
    }
    if let Some(list) = object.get("features") {
        for (i, feature) in list.as_array().into_iter().flatten().enumerate() {
            if let Some(error) = enum_check(format!("features.{i}"), feature, features.clone()) {
                return Some(error);
            }
        }
    }
    None
}

pub type Shared = Arc<Mutex<Sim>>;

/// Serves a simulated GitLab `version` on a free loopback port; returns its
/// base URL.
pub async fn start(version: &str, token: &str) -> (String, Shared) {
    let sim = Arc::new(Mutex::new(Sim::new(version, token)));
    let app = Router::new()
        .route("/api/v4/version", get(version_handler))
        .route("/api/graphql", post(graphql_handler))
        .with_state(sim.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), sim)
}

fn authorized(sim: &Sim, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let private = headers.get("private-token").and_then(|v| v.to_str().ok());
    bearer.or(private) == Some(sim.token.as_str())
}

fn unauthorized(sim: &mut Sim) -> Response {
    sim.log.push(Logged {
        kind: "unauthorized".into(),
        field: String::new(),
        input: Value::Null,
    });
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "message": "Invalid token" })),
    )
        .into_response()
}

fn bad_gateway() -> Response {
    (
        StatusCode::BAD_GATEWAY,
        "502 Bad Gateway: GitLab is not responding",
    )
        .into_response()
}

async fn version_handler(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    let mut sim = sim.lock().unwrap();
    if sim.down {
        return bad_gateway();
    }
    if !authorized(&sim, &headers) {
        return unauthorized(&mut sim);
    }
    Json(json!({ "version": sim.version, "revision": "simulated" })).into_response()
}

async fn graphql_handler(
    State(sim): State<Shared>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut sim = sim.lock().unwrap();
    if sim.down {
        return bad_gateway();
    }
    if !authorized(&sim, &headers) {
        return unauthorized(&mut sim);
    }
    let query = body["query"].as_str().unwrap_or_default().to_string();
    Json(sim.graphql(&query, &body["variables"])).into_response()
}
