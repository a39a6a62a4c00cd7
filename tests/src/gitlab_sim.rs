//! A GitLab stand-in: the REST version endpoint and the subset of GraphQL
//! that duofleet-agent uses, with GitLab's own rules. GitLab itself cannot
//! run here; everything that talks to it is real.
//!
//! The GraphQL here is dispatched on the root field named in the query and
//! reads its `variables`, which is how the agent sends every operation.
//! Rules kept: an administrator token (else HTTP 401 `Invalid token`),
//! unique model names, http(s) endpoints, upper-case family enums, the API
//! token never returned (`hasApiToken` only), family compatibility per
//! feature (GitLab's wording), cascading feature settings on model delete,
//! `duoSettingsUpdate` only from 17.9, and the single-`feature:` form of
//! `aiFeatureSettingUpdate` before 17.3 (the list form is refused).

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct SimModel {
    pub id: u64,
    pub name: String,
    pub model: String,
    pub endpoint: String,
    pub identifier: String,
    pub api_token: String,
}

/// One request the simulator answered: `query` or `mutation`, and the root field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub kind: String,
    pub field: String,
}

#[derive(Debug, Default)]
pub struct Sim {
    pub version: String,
    pub token: String,
    pub models: BTreeMap<u64, SimModel>,
    next_id: u64,
    /// feature (upper case) -> (provider, model id)
    pub features: BTreeMap<String, (String, Option<u64>)>,
    pub ai_gateway_url: Option<String>,
    pub log: Vec<Logged>,
    /// feature key -> families GitLab accepts (features not listed accept all).
    pub compatible: BTreeMap<String, Vec<String>>,
}

const FAMILIES: &[&str] = &[
    "MISTRAL",
    "MIXTRAL",
    "CODESTRAL",
    "CLAUDE_3",
    "GPT",
    "LLAMA3",
    "CODEGEMMA",
    "CODELLAMA",
    "DEEPSEEKCODER",
    "GENERAL",
    "GEMINI",
    "QWEN",
];

fn title(feature: &str) -> String {
    match feature {
        "DUO_CHAT" => "General Chat".into(),
        "CODE_GENERATIONS" => "Code Generation".into(),
        "CODE_COMPLETIONS" => "Code Completion".into(),
        "REVIEW_MERGE_REQUEST" => "Code Review".into(),
        other => other.to_lowercase(),
    }
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

fn at_least(version: &str, major: u32, minor: u32) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

impl Sim {
    pub fn mutations(&self) -> Vec<String> {
        self.log
            .iter()
            .filter(|l| l.kind == "mutation")
            .map(|l| l.field.clone())
            .collect()
    }

    /// Adds a model as an administrator would in the Admin UI.
    pub fn add_model_by_hand(&mut self, name: &str, model: &str) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.models.insert(
            id,
            SimModel {
                id,
                name: name.into(),
                model: model.into(),
                endpoint: "https://by-hand:8000/v1".into(),
                identifier: String::new(),
                api_token: String::new(),
            },
        );
        id
    }

    fn graphql(&mut self, query: &str, variables: &Value) -> Value {
        let kind = if query.trim_start().starts_with("mutation") {
            "mutation"
        } else {
            "query"
        };
        const FIELDS: &[&str] = &[
            "aiSelfHostedModelCreate",
            "aiSelfHostedModelUpdate",
            "aiSelfHostedModelDelete",
            "aiFeatureSettingUpdate",
            "duoSettingsUpdate",
            "aiSelfHostedModels",
            "aiFeatureSettings",
            "duoSettings",
        ];
        let Some(field) = FIELDS
            .iter()
            .find(|f| query.contains(&format!("{f}(")) || query.contains(&format!("{f} {{")))
        else {
            return json!({ "errors": [{ "message": "unsupported operation in the simulator" }] });
        };
        self.log.push(Logged {
            kind: kind.into(),
            field: field.to_string(),
        });
        let input = &variables["input"];
        let data = match *field {
            "aiSelfHostedModels" => json!({ "nodes": self.models.values().map(|m| json!({
                "id": gid(m.id), "name": m.name, "model": m.model, "endpoint": m.endpoint,
                "identifier": if m.identifier.is_empty() { Value::Null } else { json!(m.identifier) },
                "hasApiToken": !m.api_token.is_empty(),
            })).collect::<Vec<_>>() }),
            "aiFeatureSettings" => json!({ "nodes": self.features.iter().map(|(f, (p, m))| json!({
                "feature": f, "provider": p, "selfHostedModel": m.map(|id| json!({ "id": gid(id) })),
            })).collect::<Vec<_>>() }),
            "duoSettings" => {
                if !at_least(&self.version, 17, 9) {
                    return json!({ "errors": [{ "message": "Field 'duoSettings' doesn't exist on type 'Query'" }] });
                }
                json!({ "aiGatewayUrl": self.ai_gateway_url })
            }
            "aiSelfHostedModelCreate" => self.save_model(None, input),
            "aiSelfHostedModelUpdate" => {
                match parse_gid(&input["id"]).filter(|id| self.models.contains_key(id)) {
                    Some(id) => self.save_model(Some(id), input),
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
            "aiFeatureSettingUpdate" => {
                let list_form = at_least(&self.version, 17, 3);
                let features: Vec<String> = if input.get("features").is_some() {
                    if !list_form {
                        return json!({ "errors": [{ "message": "Field 'aiFeatureSettingUpdate' doesn't accept argument 'features'" }] });
                    }
                    input["features"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                } else if input.get("feature").is_some() {
                    if list_form {
                        return json!({ "errors": [{ "message": "Field 'aiFeatureSettingUpdate' doesn't accept argument 'feature'" }] });
                    }
                    vec![input["feature"].as_str().unwrap_or_default().to_string()]
                } else {
                    return json!({ "errors": [{ "message": "Argument 'features' is required" }] });
                };
                let provider = input["provider"].as_str().unwrap_or_default().to_string();
                if !["DISABLED", "VENDORED", "SELF_HOSTED"].contains(&provider.as_str()) {
                    return json!({ "errors": [{ "message": format!("Argument 'provider' has an invalid value ({provider})") }] });
                }
                let model = parse_gid(&input["aiSelfHostedModelId"]);
                let mut errors = Vec::new();
                if provider == "SELF_HOSTED" {
                    match model.and_then(|id| self.models.get(&id)) {
                        None => errors.push("Self-hosted model must exist".to_string()),
                        Some(m) => {
                            for feature in &features {
                                if let Some(allowed) = self.compatible.get(feature)
                                    && !allowed.contains(&m.model)
                                {
                                    let family = m.model.to_lowercase();
                                    let mut chars = family.chars();
                                    let family = chars
                                        .next()
                                        .map(|c| c.to_uppercase().chain(chars).collect::<String>())
                                        .unwrap_or_default();
                                    errors.push(format!(
                                        "{family} is incompatible with the {} feature",
                                        title(feature)
                                    ));
                                }
                            }
                        }
                    }
                }
                if errors.is_empty() {
                    for feature in features {
                        self.features.insert(
                            feature,
                            (
                                provider.clone(),
                                model.filter(|_| provider == "SELF_HOSTED"),
                            ),
                        );
                    }
                }
                json!({ "errors": errors })
            }
            "duoSettingsUpdate" => {
                if !at_least(&self.version, 17, 9) {
                    return json!({ "errors": [{ "message": "Field 'duoSettingsUpdate' doesn't exist on type 'Mutation'" }] });
                }
                self.ai_gateway_url = input["aiGatewayUrl"].as_str().map(str::to_string);
                json!({ "errors": [] })
            }
            _ => unreachable!(),
        };
        json!({ "data": { *field: data } })
    }

    fn save_model(&mut self, id: Option<u64>, input: &Value) -> Value {
        let text = |k: &str| input[k].as_str().unwrap_or_default().to_string();
        let mut errors = Vec::new();
        if text("name").is_empty() {
            errors.push("Name can't be blank".to_string());
        }
        if self
            .models
            .values()
            .any(|m| m.name == text("name") && Some(m.id) != id)
        {
            errors.push("Name has already been taken".to_string());
        }
        if !(text("endpoint").starts_with("http://") || text("endpoint").starts_with("https://")) {
            errors.push("Endpoint is blocked: Only allowed schemes are http, https".to_string());
        }
        if !FAMILIES.contains(&text("model").as_str()) {
            return json!({ "selfHostedModel": null, "errors": [format!("Argument 'model' has an invalid value ({})", text("model"))] });
        }
        if !errors.is_empty() {
            return json!({ "selfHostedModel": null, "errors": errors });
        }
        let id = id.unwrap_or_else(|| {
            self.next_id += 1;
            self.next_id
        });
        // Update is a full replace: a missing apiToken clears the token.
        let model = SimModel {
            id,
            name: text("name"),
            model: text("model"),
            endpoint: text("endpoint"),
            identifier: text("identifier"),
            api_token: text("apiToken"),
        };
        self.models.insert(id, model);
        json!({ "selfHostedModel": { "id": gid(id) }, "errors": [] })
    }
}

pub type Shared = Arc<Mutex<Sim>>;

/// Serves the simulator on a free loopback port; returns its base URL.
pub async fn start(version: &str, token: &str) -> (String, Shared) {
    let sim = Arc::new(Mutex::new(Sim {
        version: version.into(),
        token: token.into(),
        ..Default::default()
    }));
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
    });
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({ "message": "Invalid token" })),
    )
        .into_response()
}

async fn version_handler(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    let mut sim = sim.lock().unwrap();
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
    if !authorized(&sim, &headers) {
        return unauthorized(&mut sim);
    }
    let query = body["query"].as_str().unwrap_or_default().to_string();
    Json(sim.graphql(&query, &body["variables"])).into_response()
}
