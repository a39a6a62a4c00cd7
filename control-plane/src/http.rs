//! The plain-HTTP side listener: `/healthz` for probes, `/metrics` for
//! Prometheus (text exposition format).

use crate::store::Store;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::fmt::Write;
use std::sync::Arc;

pub fn router(store: Arc<Store>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(store)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(store): State<Arc<Store>>) -> impl IntoResponse {
    let config = store.current();
    let mut body = String::new();
    let gauges = [
        (
            "duofleet_config_revision",
            "The newest configuration revision.",
            config.revision,
        ),
        (
            "duofleet_models",
            "Self-hosted model deployments stored.",
            config.models.len() as u64,
        ),
        (
            "duofleet_profiles",
            "Profiles stored, default included.",
            config.profiles.len() as u64,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            body,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    }
    let _ = writeln!(
        body,
        "# HELP duofleet_build_info Build information.\n# TYPE duofleet_build_info gauge\nduofleet_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}
