//! API keys at rest: sealed with ChaCha20-Poly1305 under the data dir's
//! secret key (`DATA_DIR/secret.key`, mode 0600, or `--secret-key-file`),
//! bound to the model's name so a sealed key cannot be moved to another
//! model. Stored form: `sealed1:` + hex(nonce || ciphertext).
//!
//! Rotation: make a new key file, start once with
//! `--secret-key-file NEW --previous-secret-key-file OLD`; every stored key
//! (current models and the whole history) is re-sealed under NEW in one
//! transaction, after which OLD can be destroyed.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::io;
use std::path::Path;

const PREFIX: &str = "sealed1:";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error(
        "the API key of model {model:?} cannot be opened with the secret key (wrong --secret-key-file?)"
    )]
    WrongKey { model: String },
    #[error("the sealed API key of model {model:?} is malformed")]
    Malformed { model: String },
}

pub struct Sealer {
    current: ChaCha20Poly1305,
    previous: Option<ChaCha20Poly1305>,
}

impl Sealer {
    pub fn new(current: &[u8; 32], previous: Option<&[u8; 32]>) -> Sealer {
        Sealer {
            current: ChaCha20Poly1305::new(Key::from_slice(current)),
            previous: previous.map(|k| ChaCha20Poly1305::new(Key::from_slice(k))),
        }
    }

    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// Seals `plaintext` for model `name`; an empty key stays empty.
    pub fn seal(&self, name: &str, plaintext: &str) -> String {
        if plaintext.is_empty() {
            return String::new();
        }
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let sealed = self
            .current
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: name.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 sealing cannot fail for small inputs");
        let mut out = String::with_capacity(PREFIX.len() + 2 * (NONCE_LEN + sealed.len()));
        out.push_str(PREFIX);
        out.push_str(&hex::encode(nonce));
        out.push_str(&hex::encode(&sealed));
        out
    }

    /// Opens a stored key. Values stored before sealing existed (no prefix)
    /// are returned as they are, so that opening can migrate them.
    pub fn open(&self, name: &str, stored: &str) -> Result<String, SealError> {
        let Some(hex) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let malformed = || SealError::Malformed {
            model: name.to_string(),
        };
        if hex.len() % 2 != 0 || hex.len() < 2 * NONCE_LEN {
            return Err(malformed());
        }
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| malformed())?;
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let payload = || Payload {
            msg: sealed,
            aad: name.as_bytes(),
        };
        let opened = self
            .current
            .decrypt(Nonce::from_slice(nonce), payload())
            .or_else(|_| match &self.previous {
                Some(previous) => previous.decrypt(Nonce::from_slice(nonce), payload()),
                None => Err(chacha20poly1305::aead::Error),
            })
            .map_err(|_| SealError::WrongKey {
                model: name.to_string(),
            })?;
        String::from_utf8(opened).map_err(|_| malformed())
    }
}

/// Reads a 32-byte key (64 hex characters) from `path`, creating it with
/// mode 0600 when `create` and it does not exist.
pub fn load_key(path: &Path, create: bool) -> io::Result<[u8; 32]> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).map_err(io::Error::other)?;
            let text = format!("{}\n", hex::encode(key));
            crate::fsutil::write_atomic(path, text.as_bytes(), 0o600)?;
            return Ok(key);
        }
        Err(e) => return Err(e),
    };
    let hex = text.trim();
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} must hold 64 hex characters (a 32-byte key)",
                path.display()
            ),
        )
    };
    if hex.len() != 64 {
        return Err(invalid());
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_bound_to_the_model_name() {
        let sealer = Sealer::new(&[7; 32], None);
        let sealed = sealer.seal("mixtral", "sk-secret");
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("sk-secret"));
        assert_eq!(sealer.open("mixtral", &sealed).unwrap(), "sk-secret");
        assert!(matches!(
            sealer.open("other", &sealed),
            Err(SealError::WrongKey { .. })
        ));
        assert_ne!(
            sealer.seal("mixtral", "sk-secret"),
            sealed,
            "a fresh nonce each time"
        );
        assert_eq!(sealer.seal("m", ""), "");
        assert_eq!(
            sealer.open("m", "legacy-plaintext").unwrap(),
            "legacy-plaintext"
        );
    }

    #[test]
    fn the_previous_key_opens_during_rotation() {
        let old = Sealer::new(&[1; 32], None);
        let sealed = old.seal("m", "k");
        let rotated = Sealer::new(&[2; 32], Some(&[1; 32]));
        assert_eq!(rotated.open("m", &sealed).unwrap(), "k");
        let new_only = Sealer::new(&[2; 32], None);
        assert!(new_only.open("m", &sealed).is_err());
    }

    #[test]
    fn key_files_are_made_private_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let key = load_key(&path, true).unwrap();
        assert_eq!(load_key(&path, false).unwrap(), key);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, "short").unwrap();
        assert!(
            load_key(&path, false)
                .unwrap_err()
                .to_string()
                .contains("64 hex characters")
        );
    }
}
