//! Tokens. On first start `duofleetd` writes two random tokens (mode 0600):
//! `DATA_DIR/admin.token` for operators and `DATA_DIR/enroll.token` for
//! agents. Both are presented as `authorization: Bearer <token>`. The
//! caller's token name becomes the actor of the revisions it makes.
//!
//! The enroll token is, for now, the shared secret that agents present on
//! every connection; the security work turns it into a one-time join token
//! exchanged for a per-instance client certificate.

use crate::fsutil;
use duofleet_proto::v1 as pb;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const ENROLL_TOKEN_FILE: &str = "enroll.token";
/// Keys the hashes under which issued tokens are kept.
const TOKEN_HASH_KEY_FILE: &str = "token-hash.key";
const TOKEN_PREFIX: &str = "duofleet_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Viewer,
    /// An agent: AgentService only.
    Agent,
    /// A join token: EnrollmentService.Enroll only.
    Join,
}

/// Who is calling: the token's name and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error(
        "missing credentials: send the metadata 'authorization: Bearer <token>' (the admin token is in DATA_DIR/admin.token)"
    )]
    Missing,
    #[error(
        "invalid token: the authorization metadata must be 'Bearer <token>' with a token this duofleetd issued"
    )]
    Invalid,
    #[error("token {token:?} is read-only and cannot {action}")]
    ReadOnly { token: String, action: &'static str },
    #[error("token {token:?} has expired")]
    Expired { token: String },
    #[error("token {token:?} is {role}, not for this service")]
    WrongAudience { token: String, role: &'static str },
}

impl AuthError {
    /// The token's name, when the token was recognised.
    pub fn token(&self) -> Option<&str> {
        match self {
            AuthError::ReadOnly { token, .. }
            | AuthError::Expired { token }
            | AuthError::WrongAudience { token, .. } => Some(token),
            AuthError::Missing | AuthError::Invalid => None,
        }
    }
}

struct Token {
    secret: String,
    caller: Caller,
}

/// The tokens this daemon accepts.
pub struct Tokens {
    tokens: Vec<Token>,
    admin_token_path: PathBuf,
    /// Tokens made through TokenService, by keyed hash of their secret.
    issued: RwLock<HashMap<String, pb::Token>>,
    hash_key: Vec<u8>,
    /// Failed authentication, logged at a bounded rate.
    pub refusals: crate::refusals::Refusals,
}

impl Tokens {
    /// Reads `DATA_DIR/admin.token` and `DATA_DIR/enroll.token`, creating
    /// them (0600, atomically) on first start.
    pub fn load_or_create(data_dir: &Path) -> io::Result<Self> {
        let admin_token_path = data_dir.join(ADMIN_TOKEN_FILE);
        let tokens = vec![
            Token {
                secret: load_or_create_secret(&admin_token_path)?,
                caller: Caller {
                    name: "admin".to_string(),
                    role: Role::Admin,
                },
            },
            Token {
                secret: load_or_create_secret(&data_dir.join(ENROLL_TOKEN_FILE))?,
                caller: Caller {
                    name: "enroll".to_string(),
                    role: Role::Agent,
                },
            },
        ];
        let hash_key = load_or_create_secret(&data_dir.join(TOKEN_HASH_KEY_FILE))?.into_bytes();
        Ok(Tokens {
            tokens,
            admin_token_path,
            issued: RwLock::new(HashMap::new()),
            hash_key,
            refusals: Default::default(),
        })
    }

    pub fn admin_token_path(&self) -> &Path {
        &self.admin_token_path
    }

    /// Checks the value of the `authorization` metadata.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let presented = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or(AuthError::Invalid)?
            .trim();
        if let Some(builtin) = self
            .tokens
            .iter()
            .find(|t| constant_time_eq(t.secret.as_bytes(), presented.as_bytes()))
        {
            return Ok(builtin.caller.clone());
        }
        let issued = self.issued.read().unwrap_or_else(|e| e.into_inner());
        let token = issued
            .get(&self.hash(presented))
            .ok_or(AuthError::Invalid)?;
        if let Some(expire) = token.expire_time
            && SystemTime::try_from(expire).is_ok_and(|at| at <= SystemTime::now())
        {
            return Err(AuthError::Expired {
                token: token.name.clone(),
            });
        }
        let role = match token.role() {
            pb::Role::Admin => Role::Admin,
            pb::Role::Join => Role::Join,
            _ => Role::Viewer,
        };
        Ok(Caller {
            name: token.name.clone(),
            role,
        })
    }

    /// The keyed hash under which a token's secret is kept.
    pub fn hash(&self, secret: &str) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.hash_key).expect("HMAC takes any key length");
        mac.update(secret.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Accepts a token from now on.
    pub fn issue(&self, hash: String, token: pb::Token) {
        self.issued
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hash, token);
    }

    /// Accepts exactly these issued tokens from now on (a snapshot of
    /// what every replica issued); the data dir's tokens stay.
    pub fn replace_issued(&self, all: Vec<(String, pb::Token)>) {
        *self.issued.write().unwrap_or_else(|e| e.into_inner()) = all.into_iter().collect();
    }

    /// The issued token called `name`.
    pub fn token_named(&self, name: &str) -> Option<pb::Token> {
        let issued = self.issued.read().unwrap_or_else(|e| e.into_inner());
        issued.values().find(|t| t.name == name).cloned()
    }

    /// The stored hash of the token called `name`.
    pub fn hash_of(&self, name: &str) -> Option<String> {
        let issued = self.issued.read().unwrap_or_else(|e| e.into_inner());
        issued
            .iter()
            .find(|(_, t)| t.name == name)
            .map(|(h, _)| h.clone())
    }

    /// Stops accepting the token called `name`.
    pub fn revoke(&self, name: &str) {
        self.issued
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, t| t.name != name);
    }

    pub fn is_reserved(name: &str) -> bool {
        matches!(name, "admin" | "enroll")
    }

    /// A new secret for a token.
    pub fn new_secret() -> io::Result<String> {
        new_secret()
    }
}

impl Caller {
    /// Refuses a read-only caller for a write.
    pub fn require_admin(&self, action: &'static str) -> Result<(), AuthError> {
        match self.role {
            Role::Admin => Ok(()),
            _ => Err(AuthError::ReadOnly {
                token: self.name.clone(),
                action,
            }),
        }
    }

    /// Operator services take operator tokens; AgentService takes agent tokens.
    pub fn require_audience(&self, agent: bool) -> Result<(), AuthError> {
        match (matches!(self.role, Role::Agent | Role::Join), agent) {
            (true, true) | (false, false) => Ok(()),
            (true, false) => Err(AuthError::WrongAudience {
                token: self.name.clone(),
                role: "an agent enrollment token",
            }),
            (false, true) => Err(AuthError::WrongAudience {
                token: self.name.clone(),
                role: "an operator token",
            }),
        }
    }
}

fn load_or_create_secret(path: &Path) -> io::Result<String> {
    let secret = match std::fs::read_to_string(path) {
        Ok(contents) => contents.trim().to_string(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let secret = new_secret()?;
            fsutil::write_atomic(path, format!("{secret}\n").as_bytes(), 0o600)?;
            secret
        }
        Err(e) => return Err(e),
    };
    if secret.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is empty; delete it to have a new token made",
                path.display()
            ),
        ));
    }
    Ok(secret)
}

fn new_secret() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(io::Error::other)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex::encode(bytes)))
}

/// Compares without leaking, through timing, how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn admin_token_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::load_or_create(dir.path()).unwrap();
        let path = dir.path().join(ADMIN_TOKEN_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let secret = std::fs::read_to_string(&path).unwrap().trim().to_string();
        assert!(secret.starts_with(TOKEN_PREFIX) && secret.len() == TOKEN_PREFIX.len() + 64);
        let caller = tokens
            .authenticate(Some(&format!("Bearer {secret}")))
            .unwrap();
        assert_eq!(caller.name, "admin");
        let again = Tokens::load_or_create(dir.path()).unwrap();
        assert!(
            again
                .authenticate(Some(&format!("Bearer {secret}")))
                .is_ok()
        );
    }

    #[test]
    fn wrong_or_missing_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens::load_or_create(dir.path()).unwrap();
        assert_eq!(tokens.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            tokens.authenticate(Some("Bearer nope")),
            Err(AuthError::Invalid)
        );
        assert_eq!(
            tokens.authenticate(Some("Basic abc")),
            Err(AuthError::Invalid)
        );
    }
}
