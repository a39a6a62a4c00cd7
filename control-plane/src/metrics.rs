//! Counters and a histogram for `/metrics`, in Prometheus' text format.
//! Hand-written: a few atomics need no metrics framework.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds, in seconds, of the histograms.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0,
];

#[derive(Default)]
pub struct Metrics {
    /// RPCs by (method, gRPC status code).
    rpcs: std::sync::Mutex<std::collections::BTreeMap<(String, i32), u64>>,
    acks_applied: AtomicU64,
    acks_unchanged: AtomicU64,
    acks_failed: AtomicU64,
    health_reports: AtomicU64,
    push_to_ack: Histogram,
}

/// Durations, counted into [`BUCKETS`].
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The histogram as `name` (in seconds), with its help line.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {total}");
    }
}

impl Metrics {
    pub fn ack(&self, result: duofleet_proto::v1::AckResult) {
        use duofleet_proto::v1::AckResult;
        let counter = match result {
            AckResult::Failed => &self.acks_failed,
            AckResult::Unchanged => &self.acks_unchanged,
            _ => &self.acks_applied,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// One HealthReport taken in from an agent.
    pub fn health_report(&self) {
        self.health_reports.fetch_add(1, Ordering::Relaxed);
    }

    /// One finished RPC (for streams: the code at the response's start).
    pub fn rpc(&self, path: &str, code: i32) {
        // Only methods this server has: a client cannot grow the label set
        // with made-up paths.
        let method = if KNOWN_METHODS.contains(path) {
            path
        } else {
            "other"
        };
        let mut rpcs = self.rpcs.lock().unwrap_or_else(|e| e.into_inner());
        *rpcs.entry((method.to_string(), code)).or_insert(0) += 1;
    }

    /// From sending a DesiredConfig to the agent's ack of it.
    pub fn push_to_ack(&self, elapsed: Duration) {
        self.push_to_ack.observe(elapsed);
    }

    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP duofleet_grpc_requests_total gRPC requests by method and status code.\n# TYPE duofleet_grpc_requests_total counter"
        );
        for ((method, code), count) in self.rpcs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let code = CODES.get(*code as usize).copied().unwrap_or("UNKNOWN");
            let _ = writeln!(
                out,
                "duofleet_grpc_requests_total{{method=\"{method}\",code=\"{code}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP duofleet_acks_total Acks from agents, by result.\n# TYPE duofleet_acks_total counter"
        );
        for (result, counter) in [
            ("applied", &self.acks_applied),
            ("unchanged", &self.acks_unchanged),
            ("failed", &self.acks_failed),
        ] {
            let _ = writeln!(
                out,
                "duofleet_acks_total{{result=\"{result}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            out,
            "# HELP duofleet_health_reports_total Health reports taken in from agents.\n# TYPE duofleet_health_reports_total counter\nduofleet_health_reports_total {}",
            self.health_reports.load(Ordering::Relaxed)
        );
        self.push_to_ack.render(
            out,
            "duofleet_push_to_ack_seconds",
            "Time from sending a desired config to the agent's ack.",
        );
    }
}

const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Every gRPC method this server serves, as request paths: the duofleet.v1
/// services (from the compiled contract), health and both reflections.
static KNOWN_METHODS: std::sync::LazyLock<std::collections::HashSet<String>> =
    std::sync::LazyLock::new(|| {
        use prost::Message;
        let mut known: std::collections::HashSet<String> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(str::to_string)
        .collect();
        let set = prost_types::FileDescriptorSet::decode(duofleet_proto::FILE_DESCRIPTOR_SET)
            .expect("the compiled descriptor set decodes");
        for file in set.file.iter().filter(|f| f.package() == "duofleet.v1") {
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!("/duofleet.v1.{}/{}", service.name(), method.name()));
                }
            }
        }
        known
    });

/// Counts every gRPC request by method and the status it answered with.
#[derive(Clone)]
pub struct RpcMetricsLayer(pub std::sync::Arc<crate::registry::Registry>);

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            registry: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    registry: std::sync::Arc<crate::registry::Registry>,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<tonic::codegen::http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<RB>,
        >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let registry = self.registry.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await;
            if let Ok(r) = &mut response {
                crate::transport_errors::clarify(r.headers_mut());
                // Errors come as "trailers-only" responses: the status is in
                // the headers. Without one the call started fine.
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                registry.metrics.rpc(&path, code);
            }
            response
        })
    }
}

/// Writes one gauge with a series per value of `label`, in the order of
/// `values`; values absent from `counts` are 0.
pub fn gauge_by(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
    counts: &std::collections::BTreeMap<String, u64>,
) {
    let series: Vec<(String, u64)> = values
        .iter()
        .map(|v| {
            (
                format!("{label}=\"{v}\""),
                counts.get(*v).copied().unwrap_or(0),
            )
        })
        .collect();
    let series: Vec<(&str, u64)> = series.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    gauge(out, name, help, &series);
}

/// Writes one gauge with optional labels.
pub fn gauge(out: &mut String, name: &str, help: &str, values: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in values {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_served_methods_get_a_label() {
        let metrics = Metrics::default();
        metrics.rpc("/duofleet.v1.ModelService/CreateModel", 0);
        for i in 0..100 {
            metrics.rpc(&format!("/duofleet.v1.ModelService/Made{i}"), 12);
            metrics.rpc(&format!("/grpc.health.v1.Health/Nope{i}"), 12);
        }
        let rpcs = metrics.rpcs.lock().unwrap();
        let methods: std::collections::BTreeSet<&str> =
            rpcs.keys().map(|(m, _)| m.as_str()).collect();
        assert_eq!(
            methods,
            ["/duofleet.v1.ModelService/CreateModel", "other"].into()
        );
        assert_eq!(rpcs[&("other".to_string(), 12)], 200);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.push_to_ack(Duration::from_millis(20));
        m.push_to_ack(Duration::from_secs(3));
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("duofleet_push_to_ack_seconds_bucket{le=\"0.025\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("duofleet_push_to_ack_seconds_bucket{le=\"10\"} 2\n"),
            "{out}"
        );
        assert!(out.contains("duofleet_push_to_ack_seconds_count 2\n"));
    }
}
