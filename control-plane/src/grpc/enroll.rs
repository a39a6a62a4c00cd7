//! EnrollmentService: join token + CSR in, client certificate out.

use super::{AgentIdentity, blocking, caller, status};
use crate::auth::{Role, Tokens};
use crate::ca::{CaError, CertAuthority};
use crate::error::ConfigError;
use crate::labels::LabelGrant;
use crate::store::{Store, StoredToken};
use crate::validate;
use duofleet_proto::v1::enrollment_service_server::EnrollmentService;
use duofleet_proto::v1::{EnrollRequest, EnrollResponse, RenewRequest};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct EnrollApi {
    ca: Arc<CertAuthority>,
    tls: bool,
    tokens: Arc<Tokens>,
    store: Arc<Store>,
}

impl EnrollApi {
    pub fn new(ca: Arc<CertAuthority>, tls: bool, tokens: Arc<Tokens>, store: Arc<Store>) -> Self {
        EnrollApi {
            ca,
            tls,
            tokens,
            store,
        }
    }

    /// Spends one use of a join token, durably and exactly once (even
    /// with replicas enrolling at the same moment), before a certificate
    /// is issued.
    async fn consume(&self, name: &str) -> Result<(), Status> {
        let store = self.store.clone();
        let owned = name.to_string();
        let spent = blocking(move || store.spend_token(&owned))
            .await?
            .map_err(status)?;
        match spent {
            Err(()) => {
                self.tokens.revoke(name);
                Err(Status::permission_denied(format!(
                    "join token {name:?} is used up"
                )))
            }
            Ok(None) => {
                self.tokens.revoke(name);
                Ok(())
            }
            Ok(Some(StoredToken {
                token: Some(token),
                hash,
            })) => {
                self.tokens.revoke(name);
                self.tokens.issue(hash, token);
                Ok(())
            }
            Ok(Some(_)) => Ok(()),
        }
    }

    async fn issue(
        &self,
        instance_id: String,
        csr_pem: String,
        grant: Option<LabelGrant>,
    ) -> Result<Response<EnrollResponse>, Status> {
        if !self.tls {
            return Err(status(
                ConfigError::Blocked(
                    "enrollment needs duofleetd to serve TLS (--tls-cert, --tls-key)".into(),
                )
                .into(),
            ));
        }
        let ca = self.ca.clone();
        let id = instance_id.clone();
        let (certificate_pem, not_after) = blocking(move || ca.sign(&id, &csr_pem, grant))
            .await?
            .map_err(|e| match e {
            CaError::BadCsr(_) => Status::invalid_argument(e.to_string()),
            other => {
                tracing::error!(error = %other, "cannot issue a certificate");
                Status::internal("cannot issue a certificate; see the duofleetd log")
            }
        })?;
        tracing::info!(instance = %instance_id, not_after = ?not_after, "client certificate issued");
        Ok(Response::new(EnrollResponse {
            certificate_pem,
            ca_pem: self.ca.ca_pem().to_string(),
            not_after: Some(not_after.into()),
        }))
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let who = caller(&request)?;
        let request = request.into_inner();
        validate::instance_id("instance_id", &request.instance_id).map_err(|e| status(e.into()))?;
        let id = request.instance_id.clone();
        if who.role == Role::Admin {
            // An operator re-enrolls explicitly: the old certificates stop.
            let ca = self.ca.clone();
            let target = id.clone();
            let revoked = blocking(move || ca.revoke_instance(&target))
                .await?
                .map_err(status)?;
            tracing::warn!(instance = %id, actor = %who.name, revoked, "instance re-enrolled by an operator");
        } else if self.ca.holds_valid(&id) {
            // One identity per instance: a join token cannot take over an
            // enrolled instance.
            tracing::warn!(instance = %id, token = %who.name, "enrollment refused: the instance is already enrolled");
            return Err(Status::already_exists(format!(
                "instance {id:?} is already enrolled and holds a valid certificate; an operator must delete it (FleetService/DeleteInstance) or re-enroll it with an admin token"
            )));
        }
        // A join token passes on what it allows of labels; the default
        // enroll token (and an operator) allow every key.
        let grant = match who.role {
            Role::Join => self.tokens.token_named(&who.name).map(|t| LabelGrant {
                fixed: t.labels,
                allowed_keys: t.allowed_label_keys,
            }),
            _ => None,
        };
        if who.role == Role::Join {
            self.consume(&who.name).await?;
        }
        self.issue(request.instance_id, request.csr_pem, grant)
            .await
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let Some(AgentIdentity(instance_id)) = request.extensions().get::<AgentIdentity>().cloned()
        else {
            return Err(Status::unauthenticated(
                "Renew needs the agent's current client certificate",
            ));
        };
        // Renewal keeps what the first enrollment granted.
        let grant = self.ca.grant_of(&instance_id);
        self.issue(instance_id, request.into_inner().csr_pem, grant)
            .await
    }
}
