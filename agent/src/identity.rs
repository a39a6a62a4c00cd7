//! The agent's identity on a TLS control plane: a client certificate for
//! its instance id, signed by duofleetd's CA.
//!
//! First start: the agent makes a key pair (the key never leaves this host),
//! sends a CSR with the join token from --enroll-token-file to
//! EnrollmentService.Enroll, and keeps the certificate and key in the state
//! dir (mode 0600). From then on it connects with mutual TLS and renews the
//! certificate over it once two thirds of its lifetime have passed.

use crate::state::write_atomic;
use duofleet_proto::v1::enrollment_service_client::EnrollmentServiceClient;
use duofleet_proto::v1::{EnrollRequest, EnrollResponse, RenewRequest};
use rcgen::{CertificateParams, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

const CERT_FILE: &str = "agent-cert.pem";
const KEY_FILE: &str = "agent-key.pem";
const META_FILE: &str = "agent-cert.json";

#[derive(Debug, Serialize, Deserialize)]
struct CertMeta {
    issued_unix: u64,
    not_after_unix: u64,
}

pub struct AgentIdentity {
    state_dir: PathBuf,
    instance_id: String,
    /// Trust for duofleetd's server certificate (--control-plane-ca).
    server_ca_pem: Vec<u8>,
    enroll_token: Option<String>,
}

/// Why enrolling or renewing did not work.
pub enum IdentityError {
    /// The control plane said no: final.
    Refused(Status),
    /// Try again later.
    Retry(String),
}

impl AgentIdentity {
    pub fn new(
        state_dir: PathBuf,
        instance_id: String,
        server_ca_pem: Vec<u8>,
        enroll_token: Option<String>,
    ) -> Self {
        AgentIdentity {
            state_dir,
            instance_id,
            server_ca_pem,
            enroll_token,
        }
    }

    fn tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.server_ca_pem))
    }

    /// The TLS settings to connect with, enrolling first when there is no
    /// certificate yet.
    pub async fn client_tls(&self, endpoint: &Endpoint) -> Result<ClientTlsConfig, IdentityError> {
        let cert = self.state_dir.join(CERT_FILE);
        let key = self.state_dir.join(KEY_FILE);
        if !cert.exists() || !key.exists() {
            self.enroll(endpoint).await?;
        }
        let read = |p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| IdentityError::Retry(format!("cannot read {}: {e}", p.display())))
        };
        Ok(self
            .tls()
            .identity(Identity::from_pem(read(&cert)?, read(&key)?)))
    }

    async fn enroll(&self, endpoint: &Endpoint) -> Result<(), IdentityError> {
        let token = self.enroll_token.as_ref().ok_or_else(|| {
            IdentityError::Refused(Status::unauthenticated(
                "this agent has no certificate yet: pass --enroll-token-file with a join token (DATA_DIR/enroll.token on duofleetd)",
            ))
        })?;
        let channel = endpoint
            .clone()
            .tls_config(self.tls())
            .map_err(|e| IdentityError::Retry(format!("TLS settings: {e}")))?
            .connect()
            .await
            .map_err(|e| {
                IdentityError::Retry(format!("cannot reach the control plane to enroll: {e}"))
            })?;
        let (key, csr_pem) = self.csr()?;
        let mut request = Request::new(EnrollRequest {
            instance_id: self.instance_id.clone(),
            csr_pem,
        });
        let value = format!("Bearer {token}").parse().map_err(|_| {
            IdentityError::Refused(Status::unauthenticated(
                "the enroll token is not valid ASCII",
            ))
        })?;
        request.metadata_mut().insert("authorization", value);
        let response = EnrollmentServiceClient::new(channel)
            .enroll(request)
            .await
            .map_err(classify)?
            .into_inner();
        self.store(&key, &response)?;
        tracing::info!(instance = %self.instance_id, "enrolled: client certificate stored");
        Ok(())
    }

    /// Whether two thirds of the certificate's lifetime have passed.
    pub fn renewal_due(&self) -> bool {
        let Ok(text) = std::fs::read(self.state_dir.join(META_FILE)) else {
            return false;
        };
        let Ok(meta) = serde_json::from_slice::<CertMeta>(&text) else {
            return true;
        };
        let lifetime = meta.not_after_unix.saturating_sub(meta.issued_unix);
        now_unix() >= meta.issued_unix + lifetime * 2 / 3
    }

    /// Gets a new certificate over the current mutual-TLS connection.
    pub async fn renew(&self, channel: Channel) -> Result<(), IdentityError> {
        let (key, csr_pem) = self.csr()?;
        let response = EnrollmentServiceClient::new(channel)
            .renew(RenewRequest { csr_pem })
            .await
            .map_err(classify)?
            .into_inner();
        self.store(&key, &response)?;
        tracing::info!(instance = %self.instance_id, "client certificate renewed");
        Ok(())
    }

    fn csr(&self) -> Result<(KeyPair, String), IdentityError> {
        let fail =
            |e: rcgen::Error| IdentityError::Retry(format!("cannot make a key and CSR: {e}"));
        let key = KeyPair::generate().map_err(fail)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        params
            .distinguished_name
            .push(DnType::CommonName, self.instance_id.as_str());
        let csr = params
            .serialize_request(&key)
            .map_err(fail)?
            .pem()
            .map_err(fail)?;
        Ok((key, csr))
    }

    fn store(&self, key: &KeyPair, response: &EnrollResponse) -> Result<(), IdentityError> {
        let not_after = response
            .not_after
            .and_then(|t| SystemTime::try_from(t).ok())
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let meta = CertMeta {
            issued_unix: now_unix(),
            not_after_unix: not_after,
        };
        let write = |name: &str, bytes: &[u8]| {
            write_atomic(&self.state_dir.join(name), bytes, None)
                .map_err(|e| IdentityError::Retry(format!("cannot store {name}: {e}")))
        };
        // Key first: a crash leaves no certificate without its key.
        write(KEY_FILE, key.serialize_pem().as_bytes())?;
        write(CERT_FILE, response.certificate_pem.as_bytes())?;
        write(META_FILE, &serde_json::to_vec(&meta).expect("plain struct"))?;
        Ok(())
    }
}

fn classify(status: Status) -> IdentityError {
    match status.code() {
        tonic::Code::Unauthenticated
        | tonic::Code::PermissionDenied
        | tonic::Code::FailedPrecondition
        | tonic::Code::AlreadyExists => IdentityError::Refused(status),
        _ => IdentityError::Retry(format!("{:?}: {}", status.code(), status.message())),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}
