//! GitLab's own connection check of each model (17.7+): GitLab asks the AI
//! gateway to call the model with the given settings, which tests the whole
//! path a Duo request takes. It calls the model, so the session runs it at
//! most once per --connection-check-interval, one model at a time.

use super::GitLab;
use super::api::{self, since};
use duofleet_proto::v1::{DesiredConfig, EndpointHealth, HealthState, TargetKind};
use serde_json::json;
use std::time::{Instant, SystemTime};

const CHECK: &str = "mutation duofleetCheck($input: AiSelfHostedModelConnectionCheckInput!) { aiSelfHostedModelConnectionCheck(input: $input) { result { success message } errors } }";

impl GitLab {
    /// One result per model of `desired`, as health targets of their own.
    pub async fn connection_checks(&self, desired: &DesiredConfig) -> Vec<EndpointHealth> {
        let result =
            |model: &str, state: HealthState, error: String, started: Instant| EndpointHealth {
                kind: TargetKind::GitlabConnectionCheck as i32,
                target: model.to_string(),
                state: state as i32,
                error,
                latency_ms: started.elapsed().as_millis().min(u32::MAX as u128) as u32,
                check_time: Some(SystemTime::now().into()),
            };
        let started = Instant::now();
        let version = match self.version().await.and_then(|v| api::parse_version(&v)) {
            Ok(version) => version,
            Err(error) => {
                return desired
                    .models
                    .iter()
                    .map(|m| result(&m.name, HealthState::Unknown, error.to_string(), started))
                    .collect();
            }
        };
        let mut results = Vec::new();
        for model in &desired.models {
            let started = Instant::now();
            if version < since::CONNECTION_CHECK {
                let why = format!(
                    "not supported by GitLab {version} (it came in {})",
                    since::CONNECTION_CHECK
                );
                results.push(result(&model.name, HealthState::Unknown, why, started));
                continue;
            }
            let mut input = super::models::model_input(model, version);
            if !model.api_key.is_empty() {
                input["apiToken"] = json!(model.api_key);
            }
            let answer = self
                .api
                .mutate(
                    "aiSelfHostedModelConnectionCheck",
                    CHECK,
                    "aiSelfHostedModelConnectionCheck",
                    input,
                )
                .await;
            let (state, error) = match answer {
                Ok(Ok(payload)) if payload["result"]["success"] == json!(true) => {
                    (HealthState::Healthy, String::new())
                }
                Ok(Ok(payload)) => (
                    HealthState::Unhealthy,
                    payload["result"]["message"]
                        .as_str()
                        .unwrap_or("GitLab's connection check failed")
                        .to_string(),
                ),
                Ok(Err(errors)) => (HealthState::Unhealthy, errors.join(", ")),
                Err(error) => (HealthState::Unknown, error.to_string()),
            };
            results.push(result(&model.name, state, error, started));
        }
        results
    }
}
