//! The operator's side of the connection, shared by `duofleetctl` and the
//! end-to-end test harness: where the token comes from, how the channel is
//! opened (plaintext on loopback, TLS like grpcurl's flags otherwise), and
//! one client per operator service that presents the token.

use duofleet_proto::v1::backup_service_client::BackupServiceClient;
use duofleet_proto::v1::config_service_client::ConfigServiceClient;
use duofleet_proto::v1::fleet_service_client::FleetServiceClient;
use duofleet_proto::v1::history_service_client::HistoryServiceClient;
use duofleet_proto::v1::model_service_client::ModelServiceClient;
use duofleet_proto::v1::profile_service_client::ProfileServiceClient;
use duofleet_proto::v1::rollout_service_client::RolloutServiceClient;
use duofleet_proto::v1::token_service_client::TokenServiceClient;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// Where `duofleetctl` looks for the token when nothing else names one.
pub const DEFAULT_TOKEN_FILE: &str = "./duofleet-data/admin.token";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the token file {}: {source}", .path.display())]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no token: pass --token-file, or set DUOFLEET_TOKEN_FILE or DUOFLEET_TOKEN (the default {DEFAULT_TOKEN_FILE} does not exist)"
    )]
    NoToken,
    #[error("the token in {origin} is empty")]
    EmptyToken { origin: String },
    #[error("cannot read {what} {}: {source}", .path.display())]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--cacert: TLS needs the CA that signed duofleetd's certificate (its --tls-cert's issuer)"
    )]
    NoCaCert,
    #[error("--cert and --key go together")]
    HalfIdentity,
    #[error(
        "{server} is not a loopback address: use TLS (--cacert, and --cert/--key for mutual TLS) or pass --plaintext knowingly"
    )]
    PlaintextRemote { server: String },
    #[error("bad --server {server:?}: {reason}")]
    BadServer { server: String, reason: String },
    #[error("cannot connect to duofleetd at {server}: {reason}")]
    Connect { server: String, reason: String },
}

/// Where the token comes from, in order: `--token-file`,
/// `DUOFLEET_TOKEN_FILE`, `DUOFLEET_TOKEN` (the token itself), and
/// `./duofleet-data/admin.token`. Never from the command line itself, so
/// it stays out of `ps`.
pub fn load_token(token_file: Option<&Path>) -> Result<String, ClientError> {
    let from_file = |path: &Path| {
        let text = std::fs::read_to_string(path).map_err(|source| ClientError::TokenFile {
            path: path.to_path_buf(),
            source,
        })?;
        non_empty(text, || path.display().to_string())
    };
    if let Some(path) = token_file {
        return from_file(path);
    }
    if let Some(path) = std::env::var_os("DUOFLEET_TOKEN_FILE").filter(|p| !p.is_empty()) {
        return from_file(Path::new(&path));
    }
    if let Ok(token) = std::env::var("DUOFLEET_TOKEN")
        && !token.is_empty()
    {
        return non_empty(token, || "DUOFLEET_TOKEN".into());
    }
    let default = Path::new(DEFAULT_TOKEN_FILE);
    if default.exists() {
        return from_file(default);
    }
    Err(ClientError::NoToken)
}

fn non_empty(text: String, origin: impl FnOnce() -> String) -> Result<String, ClientError> {
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(ClientError::EmptyToken { origin: origin() });
    }
    Ok(token)
}

/// TLS files, as grpcurl names them.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// The CA that signed duofleetd's certificate.
    pub cacert: Option<PathBuf>,
    /// A client certificate and its key, for mutual TLS.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Plaintext even to a non-loopback address.
    pub plaintext: bool,
}

impl TlsFiles {
    fn any(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// Opens a channel to `server` (`host:port`, or a URL). Plaintext is
/// implied for loopback; any other address needs TLS files or `plaintext`.
/// A call that has no answer within `request_timeout` fails (a stream's
/// answer is its first message's headers: a watch may last longer).
pub async fn connect(
    server: &str,
    tls: &TlsFiles,
    request_timeout: Duration,
) -> Result<Channel, ClientError> {
    let bad = |reason: String| ClientError::BadServer {
        server: server.to_string(),
        reason,
    };
    let use_tls = tls.any() || server.starts_with("https://");
    let url = match server.split_once("://") {
        Some(_) => server.to_string(),
        None if use_tls => format!("https://{server}"),
        None => format!("http://{server}"),
    };
    let parsed: tonic::codegen::http::Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    let host = parsed
        .host()
        .ok_or_else(|| bad("no host".into()))?
        .trim_matches(['[', ']']);
    if !use_tls && !tls.plaintext && !is_loopback(host) {
        return Err(ClientError::PlaintextRemote {
            server: server.to_string(),
        });
    }
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .timeout(request_timeout);
    if use_tls {
        let cacert = tls.cacert.as_ref().ok_or(ClientError::NoCaCert)?;
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(cacert, "--cacert")?));
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read(cert, "--cert")?,
                    read(key, "--key")?,
                ));
            }
            (None, None) => {}
            _ => return Err(ClientError::HalfIdentity),
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| bad(format!("TLS settings: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| ClientError::Connect {
        server: server.to_string(),
        reason: crate::error::error_chain(&e),
    })
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|source| ClientError::TlsFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Adds `authorization: Bearer <token>` when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<String>) -> Bearer {
        Bearer(token.and_then(|t| {
            let mut value: MetadataValue<_> = format!("Bearer {t}").parse().ok()?;
            value.set_sensitive(true);
            Some(value)
        }))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// One client per operator service, sharing a channel and a token.
#[derive(Clone)]
pub struct Clients {
    pub models: ModelServiceClient<Authed>,
    pub profiles: ProfileServiceClient<Authed>,
    pub history: HistoryServiceClient<Authed>,
    pub fleet: FleetServiceClient<Authed>,
    pub tokens: TokenServiceClient<Authed>,
    pub config: ConfigServiceClient<Authed>,
    pub backup: BackupServiceClient<Authed>,
    pub rollouts: RolloutServiceClient<Authed>,
}

impl Clients {
    pub fn new(channel: Channel, token: Option<String>) -> Clients {
        let bearer = Bearer::new(token);
        Clients {
            models: ModelServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            profiles: ProfileServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            history: HistoryServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            fleet: FleetServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            tokens: TokenServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            config: ConfigServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            backup: BackupServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            rollouts: RolloutServiceClient::with_interceptor(channel, bearer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_and_addresses() {
        for host in ["localhost", "127.0.0.1", "127.8.9.10", "::1"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["10.0.0.1", "duofleet.example.com", "::ffff:10.0.0.1"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[tokio::test]
    async fn a_remote_server_needs_tls_or_an_explicit_plaintext() {
        let err = connect(
            "10.1.2.3:7700",
            &TlsFiles::default(),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::PlaintextRemote { .. }), "{err}");
        let err = connect(
            "127.0.0.1:7700",
            &TlsFiles {
                cacert: Some("/dev/null".into()),
                cert: Some("c.pem".into()),
                ..Default::default()
            },
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::HalfIdentity), "{err}");
    }
}
