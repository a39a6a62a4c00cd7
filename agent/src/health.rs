//! Probing, from this GitLab host, what its instance depends on: the AI
//! gateway (and its internal URL) and every model of its profile. Network
//! paths, proxies and private CAs differ per host, so only a probe from here
//! answers "can this instance reach that model".
//!
//! - gateway: `GET <url>/monitoring/healthz`, healthy on 200;
//! - OpenAI-compatible models (`custom_openai/` identifiers or endpoints
//!   ending in /v1): `GET <endpoint>/models` with the API key as bearer,
//!   healthy on 200 with the served name among `data[].id`;
//! - Bedrock, Azure and other models: reachability only (DNS, TCP, TLS, any
//!   HTTP answer), saying plainly that credentials were not checked.
//!
//! Errors never carry a secret: endpoints hold no credentials (duofleetd
//! refuses user:password URLs) and keys travel only in headers.

use duofleet_proto::v1::{DesiredConfig, DesiredModel, EndpointHealth, HealthState, TargetKind};
use std::time::{Duration, Instant, SystemTime};

#[derive(Clone)]
pub struct Prober {
    http: reqwest::Client,
}

impl Prober {
    /// A client with the system's roots plus `ca_bundle` (PEM), honouring
    /// https_proxy / no_proxy.
    pub fn new(timeout: Duration, ca_bundle: Option<&std::path::Path>) -> Result<Prober, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout);
        if let Some(path) = ca_bundle {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read --ca-bundle {}: {e}", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("--ca-bundle {} is not a PEM bundle: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--ca-bundle {} holds no certificate",
                    path.display()
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .build()
            .map_err(|e| format!("cannot build the probe client: {e}"))?;
        Ok(Prober { http })
    }

    /// Probes every target of `desired`, concurrently.
    pub async fn probe_all(&self, desired: &DesiredConfig) -> Vec<EndpointHealth> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut gateways = vec![(TargetKind::AiGateway, desired.ai_gateway_url.clone())];
        if !desired.ai_gateway_internal_url.is_empty()
            && desired.ai_gateway_internal_url != desired.ai_gateway_url
        {
            gateways.push((
                TargetKind::AiGatewayInternal,
                desired.ai_gateway_internal_url.clone(),
            ));
        }
        for (index, (kind, url)) in gateways
            .into_iter()
            .filter(|(_, u)| !u.is_empty())
            .enumerate()
        {
            let prober = self.clone();
            tasks.spawn(async move { (index, prober.gateway(kind, &url).await) });
        }
        // A Bedrock or Vertex AI model without an endpoint is reached through
        // the AI gateway's cloud credentials: only GitLab's connection check
        // can test it.
        for (index, model) in desired
            .models
            .iter()
            .filter(|m| !m.endpoint.is_empty())
            .cloned()
            .enumerate()
        {
            let prober = self.clone();
            tasks.spawn(async move { (10 + index, prober.model(&model).await) });
        }
        let mut results: Vec<(usize, EndpointHealth)> = tasks.join_all().await;
        results.sort_by_key(|(index, _)| *index);
        results.into_iter().map(|(_, r)| r).collect()
    }

    async fn gateway(&self, kind: TargetKind, url: &str) -> EndpointHealth {
        let probe = format!("{}/monitoring/healthz", url.trim_end_matches('/'));
        let started = Instant::now();
        let outcome = match self.http.get(&probe).send().await {
            Ok(r) if r.status().as_u16() == 200 => Ok(()),
            Ok(r) => Err(format!("GET {probe} answered HTTP {}", r.status().as_u16())),
            Err(e) => Err(format!("GET {probe} failed: {}", describe(&e))),
        };
        result(kind, url, started, outcome)
    }

    async fn model(&self, model: &DesiredModel) -> EndpointHealth {
        let started = Instant::now();
        let openai = model.identifier.starts_with("custom_openai/")
            || model.endpoint.trim_end_matches('/').ends_with("/v1");
        let outcome = if openai {
            self.openai_models(model).await
        } else {
            self.reachable(model).await
        };
        result(TargetKind::Model, &model.name, started, outcome)
    }

    async fn openai_models(&self, model: &DesiredModel) -> Result<(), String> {
        let probe = format!("{}/models", model.endpoint.trim_end_matches('/'));
        let mut request = self.http.get(&probe);
        if !model.api_key.is_empty() {
            request = request.bearer_auth(&model.api_key);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {probe} failed: {}", describe(&e)))?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(format!("GET {probe} answered HTTP {status}"));
        }
        let Some(served_name) = model.identifier.strip_prefix("custom_openai/") else {
            return Ok(());
        };
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| format!("GET {probe}: not an OpenAI model list ({e})"))?;
        let served: Vec<&str> = body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .collect();
        if served.contains(&served_name) {
            Ok(())
        } else {
            Err(format!(
                "{probe} does not serve {served_name:?} (identifier {}); it serves: {}",
                model.identifier,
                if served.is_empty() {
                    "nothing".to_string()
                } else {
                    served.join(", ")
                }
            ))
        }
    }

    async fn reachable(&self, model: &DesiredModel) -> Result<(), String> {
        match self.http.get(&model.endpoint).send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(format!(
                "{} is not reachable: {} (credentials were not checked)",
                model.endpoint,
                describe(&e)
            )),
        }
    }
}

fn result(
    kind: TargetKind,
    target: &str,
    started: Instant,
    outcome: Result<(), String>,
) -> EndpointHealth {
    let (state, error) = match outcome {
        Ok(()) => (HealthState::Healthy, String::new()),
        Err(error) => (HealthState::Unhealthy, error),
    };
    EndpointHealth {
        kind: kind as i32,
        target: target.to_string(),
        state: state as i32,
        error,
        latency_ms: started.elapsed().as_millis().min(u32::MAX as u128) as u32,
        check_time: Some(SystemTime::now().into()),
    }
}

/// A reqwest error with its causes (e.g. the certificate verification
/// failure under "error sending request").
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return "timed out".to_string();
    }
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What a report compares on: kind, target, state and error, not timings.
pub type Signature = Vec<(i32, String, i32, String)>;

pub fn signature(results: &[EndpointHealth]) -> Signature {
    results
        .iter()
        .map(|r| (r.kind, r.target.clone(), r.state, r.error.clone()))
        .collect()
}
