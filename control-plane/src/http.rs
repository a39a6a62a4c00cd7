//! The plain-HTTP side listener: `/healthz` (liveness: the process
//! answers), `/readyz` (readiness: storage takes a durable write now),
//! `/metrics` for Prometheus (text exposition format), and the dashboard
//! (see `dashboard`).

use crate::metrics::gauge;
use crate::registry::Registry;
use crate::rollout::Rollouts;
use crate::store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

type Shared = (Arc<Store>, Arc<Registry>, Arc<Rollouts>);

pub fn router(
    store: Arc<Store>,
    registry: Arc<Registry>,
    rollouts: Arc<Rollouts>,
    tokens: Arc<crate::auth::Tokens>,
    https: bool,
) -> Router {
    let dashboard = crate::dashboard::Dashboard::new(
        store.clone(),
        registry.clone(),
        rollouts.clone(),
        tokens,
        https,
    );
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state((store, registry, rollouts))
        .merge(dashboard.router())
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when a small write reaches the disk now; 503 with the reason when
/// storage cannot write (a full disk, a failed device), so that a load
/// balancer stops sending operators to this replica.
async fn readyz(State((store, _, _)): State<Shared>) -> impl IntoResponse {
    let probe = tokio::task::spawn_blocking(move || store.probe_write()).await;
    match probe {
        Ok(Ok(())) => (axum::http::StatusCode::OK, "ready\n".to_string()),
        Ok(Err(error)) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: storage cannot write: {}\n",
                crate::error::error_chain(&error)
            ),
        ),
        Err(error) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {error}\n"),
        ),
    }
}

async fn metrics(State((store, registry, rollouts)): State<Shared>) -> impl IntoResponse {
    let config = store.current();
    let mut body = String::new();
    gauge(
        &mut body,
        "duofleet_config_revision",
        "The newest configuration revision.",
        &[("", config.revision)],
    );
    gauge(
        &mut body,
        "duofleet_models",
        "Self-hosted model deployments stored.",
        &[("", config.models.len() as u64)],
    );
    gauge(
        &mut body,
        "duofleet_profiles",
        "Profiles stored, default included.",
        &[("", config.profiles.len() as u64)],
    );
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    gauge(
        &mut body,
        "duofleet_build_info",
        "Build information.",
        &[(&version, 1)],
    );
    store.commits.render(
        &mut body,
        "duofleet_commit_seconds",
        "Time for a configuration revision to become durable in the store, before agents hear of it.",
    );
    registry.render_metrics(&mut body);
    rollouts.render_metrics(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
