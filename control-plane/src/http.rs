//! The plain-HTTP side listener: `/healthz` for probes, `/metrics` for
//! Prometheus (text exposition format).

use crate::metrics::gauge;
use crate::registry::Registry;
use crate::store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::Arc;

type Shared = (Arc<Store>, Arc<Registry>);

pub fn router(store: Arc<Store>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state((store, registry))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State((store, registry)): State<Shared>) -> impl IntoResponse {
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
    registry.render_metrics(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
