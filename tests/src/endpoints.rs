//! Stand-ins for what agents probe: an OpenAI-compatible server
//! (`/v1/models` with configurable served names and status) and an AI
//! gateway (`/monitoring/healthz`), over HTTP or over TLS with a test CA.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

#[derive(Debug)]
pub struct Behaviour {
    pub served: Vec<String>,
    pub status: u16,
    /// The `authorization` header of every request, in order.
    pub authorizations: Vec<String>,
}

pub struct Endpoint {
    /// e.g. http://127.0.0.1:41234
    pub base: String,
    pub behaviour: Arc<Mutex<Behaviour>>,
    server: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    /// Serves over plain HTTP on a free loopback port.
    pub async fn start(served: &[&str]) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (app, behaviour) = app(served);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Endpoint {
            base: format!("http://{addr}"),
            behaviour,
            server,
        }
    }

    /// Serves over TLS with a certificate for 127.0.0.1 signed by `ca`.
    pub async fn start_tls(served: &[&str], ca: &TestCa) -> Endpoint {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (app, behaviour) = app(served);
        let tls = TlsListener {
            listener,
            acceptor: ca.acceptor(),
        };
        let server = tokio::spawn(async move {
            let _ = axum::serve(tls, app).await;
        });
        Endpoint {
            base: format!("https://{addr}"),
            behaviour,
            server,
        }
    }

    /// Stops serving: new connections are refused.
    pub fn stop(&self) {
        self.server.abort();
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn app(served: &[&str]) -> (Router, Arc<Mutex<Behaviour>>) {
    let behaviour = Arc::new(Mutex::new(Behaviour {
        served: served.iter().map(|s| s.to_string()).collect(),
        status: 200,
        authorizations: Vec::new(),
    }));
    let router = Router::new()
        .route("/v1/models", get(models))
        .route("/monitoring/healthz", get(healthz))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .with_state(behaviour.clone());
    (router, behaviour)
}

async fn models(State(behaviour): State<Arc<Mutex<Behaviour>>>, headers: HeaderMap) -> Response {
    let mut b = behaviour.lock().unwrap();
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    b.authorizations.push(auth);
    let data: Vec<_> = b
        .served
        .iter()
        .map(|id| json!({ "id": id, "object": "model" }))
        .collect();
    (
        StatusCode::from_u16(b.status).unwrap(),
        axum::Json(json!({ "object": "list", "data": data })),
    )
        .into_response()
}

async fn healthz(State(behaviour): State<Arc<Mutex<Behaviour>>>) -> Response {
    let status = behaviour.lock().unwrap().status;
    (StatusCode::from_u16(status).unwrap(), "ok").into_response()
}

/// A private certificate authority for tests.
pub struct TestCa {
    pub ca_pem: String,
    /// A server certificate for 127.0.0.1 and localhost, and its key (PEM).
    pub server_cert_pem: String,
    pub server_key_pem: String,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: Vec<u8>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "duofleet test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        TestCa {
            ca_pem: ca_cert.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
            server_cert: cert.der().clone(),
            server_key: key.serialize_der(),
            issuer,
        }
    }

    /// A client certificate for `name` (its CN), and its key (PEM).
    pub fn client_cert(&self, name: &str) -> (String, String) {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn write_ca(&self, path: &Path) {
        std::fs::write(path, &self.ca_pem).unwrap();
    }

    fn acceptor(&self) -> TlsAcceptor {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(self.server_key.clone().into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .unwrap();
        TlsAcceptor::from(Arc::new(config))
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.listener.accept().await else {
                continue;
            };
            // A client that rejects our certificate fails the handshake: next.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}
