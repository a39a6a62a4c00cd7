//! With OTEL_EXPORTER_OTLP_ENDPOINT set, duofleetd exports one span per RPC
//! over OTLP/gRPC. The collector here is a stand-in that records what it
//! receives; the exporter and daemon are real.

use crate::create_model;
use duofleet_proto::v1::{GetModelRequest, ListModelsRequest};
use duofleet_tests::{Daemon, DaemonOptions, mk};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::sync::{Arc, Mutex};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

#[derive(Clone, Default)]
struct Collector {
    span_names: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut names = self.span_names.lock().unwrap();
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                names.extend(scope.spans.into_iter().map(|s| s.name));
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_are_exported_as_otlp_spans() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);

    let dir = tempfile::tempdir().unwrap();
    let options = DaemonOptions {
        env: vec![(
            "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
            format!("http://{collector_addr}"),
        )],
        ..Default::default()
    };
    let daemon = Daemon::start_with(&dir.path().join("data"), options);
    let mut c = daemon.clients().await;
    create_model(&mut c, mk::model("traced")).await;
    c.models.list_models(ListModelsRequest {}).await.unwrap();
    c.models
        .get_model(GetModelRequest {
            name: "traced".into(),
        })
        .await
        .unwrap();
    // Shutdown flushes the batch exporter.
    let status = tokio::task::spawn_blocking(move || daemon.stop("TERM"))
        .await
        .unwrap();
    assert!(status.success());

    let mut names = collector.span_names.lock().unwrap().clone();
    names.sort();
    assert_eq!(
        names,
        [
            "/duofleet.v1.ModelService/CreateModel",
            "/duofleet.v1.ModelService/GetModel",
            "/duofleet.v1.ModelService/ListModels",
        ]
    );
}
