//! TokenService: operator tokens with roles and expiry.

use super::{blocking, caller, status, writer};
use crate::auth::Tokens;
use crate::error::{ConfigError, quoted};
use crate::store::{Store, StoredToken, Table, TableChange};
use crate::validate;
use duofleet_proto::v1::token_service_server::TokenService;
use duofleet_proto::v1::{
    CreateTokenRequest, CreateTokenResponse, ListTokensRequest, ListTokensResponse,
    RevokeTokenRequest, Role, Token,
};
use prost::Message;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tonic::{Request, Response, Status};

/// The longest a token may live.
const MAX_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

pub struct TokenApi {
    store: Arc<Store>,
    tokens: Arc<Tokens>,
}

impl TokenApi {
    /// Loads the tokens made earlier into `tokens`.
    pub fn new(store: Arc<Store>, tokens: Arc<Tokens>) -> Result<Self, crate::store::StoreError> {
        for stored in store.load_tokens()? {
            if let Some(token) = stored.token {
                tokens.issue(stored.hash, token);
            }
        }
        store.follow_table(Table::Tokens, &tokens, follow);
        Ok(TokenApi { store, tokens })
    }
}

/// Another replica made, used or revoked a token: this one accepts what
/// it accepts.
fn follow(tokens: &Tokens, change: TableChange) {
    let decoded = |name: &str, raw: &[u8]| match StoredToken::decode(raw) {
        Ok(StoredToken {
            token: Some(token),
            hash,
        }) => Some((hash, token)),
        _ => {
            tracing::warn!(token = %name, "a stored token does not decode; ignored");
            None
        }
    };
    match change {
        TableChange::Snapshot(all) => {
            let all: Vec<_> = all
                .iter()
                .filter_map(|(name, raw)| decoded(name, raw))
                .collect();
            tokens.replace_issued(all);
        }
        TableChange::Put(name, raw) => {
            if let Some((hash, token)) = decoded(&name, &raw) {
                tokens.revoke(&name);
                tokens.issue(hash, token);
            }
        }
        TableChange::Deleted(name) => tokens.revoke(&name),
    }
}

fn invalid(field: &str, rule: impl Into<String>) -> Status {
    status(ConfigError::invalid(field, rule).into())
}

#[tonic::async_trait]
impl TokenService for TokenApi {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let creator = writer(&request, "create tokens")?;
        let request = request.into_inner();
        validate::profile_name("name", &request.name).map_err(|e| status(e.into()))?;
        if Tokens::is_reserved(&request.name) {
            return Err(invalid(
                "name",
                format!(
                    "{} is reserved for a token file in the data dir",
                    quoted(&request.name)
                ),
            ));
        }
        if !matches!(request.role(), Role::Admin | Role::Viewer | Role::Join) {
            return Err(invalid(
                "role",
                "must be ROLE_ADMIN, ROLE_VIEWER or ROLE_JOIN",
            ));
        }
        if request.max_uses > 0 && request.role() != Role::Join {
            return Err(invalid("max_uses", "only for ROLE_JOIN tokens"));
        }
        if request.role() != Role::Join
            && !(request.labels.is_empty() && request.allowed_label_keys.is_empty())
        {
            return Err(invalid(
                "labels",
                "labels and allowed_label_keys are only for ROLE_JOIN tokens",
            ));
        }
        validate::selector("labels", &request.labels).map_err(|e| status(e.into()))?;
        let keys = request
            .allowed_label_keys
            .iter()
            .map(|k| (k.clone(), String::new()))
            .collect();
        validate::selector("allowed_label_keys", &keys).map_err(|e| status(e.into()))?;
        let now = SystemTime::now();
        let expire_time = match request.ttl {
            None => None,
            Some(ttl) if ttl.seconds == 0 && ttl.nanos == 0 => None,
            Some(ttl) => {
                let ttl =
                    Duration::try_from(ttl).map_err(|_| invalid("ttl", "must be positive"))?;
                if ttl > MAX_TTL {
                    return Err(invalid("ttl", "must be at most 10 years"));
                }
                Some((now + ttl).into())
            }
        };
        let token = Token {
            name: request.name.clone(),
            role: request.role,
            create_time: Some(now.into()),
            expire_time,
            created_by: creator.name.clone(),
            uses_left: request.max_uses,
            labels: request.labels.clone(),
            allowed_label_keys: request.allowed_label_keys.clone(),
        };
        if request.validate_only {
            let store = self.store.clone();
            let taken = blocking(move || store.load_tokens())
                .await?
                .map_err(status)?
                .iter()
                .any(|t| t.token.as_ref().is_some_and(|t| t.name == request.name));
            if taken {
                return Err(status(
                    ConfigError::AlreadyExists {
                        kind: "token",
                        name: request.name,
                    }
                    .into(),
                ));
            }
            return Ok(Response::new(CreateTokenResponse {
                token: Some(token),
                secret: String::new(),
            }));
        }
        let secret = Tokens::new_secret()
            .map_err(|e| Status::internal(format!("cannot make a secret: {e}")))?;
        let hash = self.tokens.hash(&secret);
        let stored = StoredToken {
            token: Some(token.clone()),
            hash: hash.clone(),
        };
        let store = self.store.clone();
        let name = request.name.clone();
        let inserted = blocking(move || store.insert_token(&name, &stored))
            .await?
            .map_err(status)?;
        if !inserted {
            return Err(status(
                ConfigError::AlreadyExists {
                    kind: "token",
                    name: request.name,
                }
                .into(),
            ));
        }
        self.tokens.issue(hash, token.clone());
        tracing::info!(token = %token.name, role = ?token.role(), actor = %creator.name, "token created");
        Ok(Response::new(CreateTokenResponse {
            token: Some(token),
            secret,
        }))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        caller(&request)?;
        let store = self.store.clone();
        let stored = blocking(move || store.load_tokens())
            .await?
            .map_err(status)?;
        let mut tokens: Vec<Token> = stored.into_iter().filter_map(|s| s.token).collect();
        tokens.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<()>, Status> {
        let revoker = writer(&request, "revoke tokens")?;
        let RevokeTokenRequest {
            name,
            validate_only,
        } = request.into_inner();
        if Tokens::is_reserved(&name) {
            return Err(status(
                ConfigError::Blocked(format!(
                    "{} is a token file in the data dir: replace DATA_DIR/{name}.token and restart duofleetd",
                    quoted(&name)
                ))
                .into(),
            ));
        }
        let store = self.store.clone();
        let target = name.clone();
        let removed = blocking(move || {
            if validate_only {
                Ok(store
                    .load_tokens()?
                    .iter()
                    .any(|t| t.token.as_ref().is_some_and(|t| t.name == target)))
            } else {
                store.delete_token(&target)
            }
        })
        .await?
        .map_err(status)?;
        if !removed {
            return Err(status(
                ConfigError::NotFound {
                    kind: "token",
                    name,
                }
                .into(),
            ));
        }
        if validate_only {
            return Ok(Response::new(()));
        }
        self.tokens.revoke(&name);
        tracing::info!(token = %name, actor = %revoker.name, "token revoked");
        Ok(Response::new(()))
    }
}
