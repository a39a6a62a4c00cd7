//! The transport to GitLab: `GET /api/v4/version` and `POST /api/graphql`
//! with an administrator's token, and the sorting of what can go wrong.

use duofleet_proto::GitLabVersion;
use serde_json::{Value, json};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "GitLab refused the token in --gitlab-token-file (HTTP {status}: {body}); it must be an administrator's personal access token with the api scope"
    )]
    Token { status: u16, body: String },
    #[error("GitLab API {what} failed: {detail}")]
    Http { what: String, detail: String },
    /// A top-level GraphQL error: the whole request failed (an unknown
    /// argument or enum value, a missing permission, a server error).
    #[error("GitLab API {what}: {}", .errors.join("; "))]
    GraphQl { what: String, errors: Vec<String> },
}

impl SyncError {
    /// Whether the sync as a whole must stop: a refused token or a GitLab
    /// that cannot be reached. A top-level GraphQL error fails only the item
    /// it was about.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, SyncError::GraphQl { .. })
    }

    /// The message of a top-level error, without the "GitLab API" prefix.
    pub fn item_detail(&self) -> String {
        match self {
            SyncError::GraphQl { errors, .. } => errors.join("; "),
            other => other.to_string(),
        }
    }
}

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub fn new(base: &str, token: String, http: reqwest::Client) -> Api {
        Api {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        }
    }

    /// An HTTP client with the system's roots and proxy settings.
    pub fn client() -> Result<reqwest::Client, String> {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }

    /// GitLab's version as it reports it, e.g. "17.11.2-ee".
    pub async fn version(&self) -> Result<String, SyncError> {
        let what = "GET /api/v4/version".to_string();
        let response = self
            .http
            .get(format!("{}/api/v4/version", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| SyncError::Http {
                what: what.clone(),
                detail: e.to_string(),
            })?;
        let body = check_status(response, &what).await?;
        body["version"]
            .as_str()
            .map(str::to_string)
            .ok_or(SyncError::Http {
                what,
                detail: "no version in the answer".into(),
            })
    }

    /// Runs one GraphQL operation; top-level errors become `GraphQl`.
    pub async fn graphql(
        &self,
        what: &str,
        query: &str,
        variables: Value,
    ) -> Result<Value, SyncError> {
        let response = self
            .http
            .post(format!("{}/api/graphql", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "query": query, "variables": variables }))
            .send()
            .await
            .map_err(|e| SyncError::Http {
                what: what.to_string(),
                detail: e.to_string(),
            })?;
        let body = check_status(response, what).await?;
        if let Some(errors) = body["errors"].as_array().filter(|e| !e.is_empty()) {
            return Err(SyncError::GraphQl {
                what: what.to_string(),
                errors: errors
                    .iter()
                    .map(|e| e["message"].as_str().unwrap_or("unknown error").to_string())
                    .collect(),
            });
        }
        Ok(body["data"].clone())
    }

    /// A mutation whose payload is `field`: GitLab's validation messages
    /// (the payload's `errors`) come back as `Ok(Err(messages))`.
    pub async fn mutate(
        &self,
        what: &str,
        query: &str,
        field: &str,
        input: Value,
    ) -> Result<Result<Value, Vec<String>>, SyncError> {
        let data = self.graphql(what, query, json!({ "input": input })).await?;
        let payload = data[field].clone();
        let errors: Vec<String> = payload["errors"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|m| m.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(if errors.is_empty() {
            Ok(payload)
        } else {
            Err(errors)
        })
    }
}

async fn check_status(response: reqwest::Response, what: &str) -> Result<Value, SyncError> {
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    if status == 401 || status == 403 {
        return Err(SyncError::Token {
            status,
            body: body.chars().take(200).collect(),
        });
    }
    if !(200..300).contains(&status) {
        return Err(SyncError::Http {
            what: what.to_string(),
            detail: format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            ),
        });
    }
    serde_json::from_str(&body).map_err(|e| SyncError::Http {
        what: what.to_string(),
        detail: format!("not JSON: {e}"),
    })
}

/// What each GitLab version's API offers, by the version that brought it.
/// The agent picks every form from `/api/v4/version`, never from the
/// wording of an error.
pub mod since {
    use duofleet_proto::GitLabVersion as V;

    /// `aiSelfHostedModels` and `aiSelfHostedModelCreate`.
    pub const MODELS: V = V::new(17, 1);
    /// `aiSelfHostedModelUpdate` and `aiSelfHostedModelDelete`.
    pub const MODEL_UPDATE: V = V::new(17, 2);
    /// `aiFeatureSettingUpdate` with a single `feature:`.
    pub const FEATURE_UPDATE: V = V::new(17, 4);
    /// `aiFeatureSettings`.
    pub const FEATURE_LIST: V = V::new(17, 5);
    /// `aiSelfHostedModelConnectionCheck`.
    pub const CONNECTION_CHECK: V = V::new(17, 7);
    /// `duoSettings { aiGatewayUrl }` and `duoSettingsUpdate`.
    pub const DUO_SETTINGS: V = V::new(17, 9);
    /// `aiFeatureSettingUpdate(features: [...])` replaces `feature:`.
    pub const FEATURE_LIST_FORM: V = V::new(17, 11);
    /// Provider `UNASSIGNED`; only the database gateway setting is read.
    pub const V18: V = V::new(18, 0);
    /// `duoAgentPlatformServiceUrl`.
    pub const AGENT_PLATFORM_URL: V = V::new(18, 4);
    /// `aiGatewayTimeoutSeconds`.
    pub const GATEWAY_TIMEOUT: V = V::new(18, 7);
    /// A self-hosted model's `provider` (`API`, `BEDROCK`, `VERTEX_AI`).
    pub const MODEL_PROVIDER: V = V::new(18, 11);
    /// A model without an endpoint (Bedrock and Vertex AI providers).
    pub const OPTIONAL_ENDPOINT: V = V::new(19, 0);
}

/// Parses GitLab's answer to `/api/v4/version`.
pub fn parse_version(text: &str) -> Result<GitLabVersion, SyncError> {
    GitLabVersion::parse(text).ok_or_else(|| SyncError::Http {
        what: "GET /api/v4/version".into(),
        detail: format!("unrecognised version {text:?}"),
    })
}
