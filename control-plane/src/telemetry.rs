//! Logging to stderr (human or JSON) and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
//! is set, spans over OTLP/gRPC through tracing-opentelemetry.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Keeps the OTLP exporter alive; [`Telemetry::shutdown`] flushes it.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber. `DUOFLEET_LOG` (or `RUST_LOG`) sets the
/// filter; the default is `info`.
pub fn init(
    service: &'static str,
    format: LogFormat,
) -> Result<Telemetry, Box<dyn std::error::Error>> {
    let filter = EnvFilter::try_from_env("DUOFLEET_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
    let ansi = std::io::stderr().is_terminal();
    layers.push(match format {
        LogFormat::Human => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    });
    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name(service).build())
                .build();
            layers.push(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer(service))
                    .boxed(),
            );
            Some(provider)
        }
        _ => None,
    };
    tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()?;
    if provider.is_some() {
        tracing::info!("exporting spans over OTLP");
    }
    Ok(Telemetry { provider })
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "OTLP exporter did not shut down cleanly");
        }
    }
}
