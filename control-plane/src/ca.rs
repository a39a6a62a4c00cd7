//! duofleetd's certificate authority for agent identity.
//!
//! An agent enrolls once with a join token and a CSR; duofleetd signs a
//! client certificate for its instance id (default lifetime 30 days) and
//! remembers the certificate's SHA-256 fingerprint. An agent is then known
//! by the certificate it presents over mutual TLS, never by what its Hello
//! claims. Forgetting the fingerprints revokes: DeleteInstance does that.
//!
//! The CA lives in `DATA_DIR/ca.pem` and `DATA_DIR/ca.key` (0600), made on
//! first start; an operator may put their own there instead.

use crate::fsutil;
use crate::store::{Store, StoreError, Table, TableChange};
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read or write the CA in {path}")]
    Files {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA in {path} is not usable: {detail}")]
    Invalid { path: String, detail: String },
    #[error("csr_pem: not a valid PKCS#10 certificate signing request ({0})")]
    BadCsr(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What duofleetd remembers of a certificate it issued.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IssuedCert {
    #[prost(string, tag = "1")]
    pub instance_id: String,
    #[prost(message, optional, tag = "2")]
    pub not_after: Option<prost_types::Timestamp>,
    /// What the token it was enrolled with lets it set at first
    /// registration; unset: every key (the default enroll token).
    #[prost(message, optional, tag = "3")]
    pub grant: Option<crate::labels::LabelGrant>,
}

pub struct CertAuthority {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    lifetime: Duration,
    store: Arc<Store>,
    issued: RwLock<HashMap<String, IssuedCert>>,
}

impl CertAuthority {
    pub fn load_or_create(
        data_dir: &Path,
        store: Arc<Store>,
        lifetime: Duration,
    ) -> Result<Arc<Self>, CaError> {
        let cert_path = data_dir.join("ca.pem");
        let key_path = data_dir.join("ca.key");
        let files = |source| CaError::Files {
            path: data_dir.display().to_string(),
            source,
        };
        let invalid = |detail: String| CaError::Invalid {
            path: data_dir.display().to_string(),
            detail,
        };
        let (ca_pem, key) = if cert_path.exists() {
            let pem = std::fs::read_to_string(&cert_path).map_err(files)?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(files)?;
            (
                pem,
                KeyPair::from_pem(&key_pem).map_err(|e| invalid(e.to_string()))?,
            )
        } else {
            let key = KeyPair::generate().map_err(|e| invalid(e.to_string()))?;
            let mut params =
                CertificateParams::new(Vec::<String>::new()).map_err(|e| invalid(e.to_string()))?;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params
                .distinguished_name
                .push(DnType::CommonName, "duofleet agent CA");
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
            params.not_after =
                (SystemTime::now() + Duration::from_secs(10 * 365 * 24 * 3600)).into();
            let cert = params
                .self_signed(&key)
                .map_err(|e| invalid(e.to_string()))?;
            fsutil::write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(files)?;
            fsutil::write_atomic(&cert_path, cert.pem().as_bytes(), 0o644).map_err(files)?;
            (cert.pem(), key)
        };
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| invalid(e.to_string()))?;
        let issued = store.load_certs()?.into_iter().collect();
        let ca = Arc::new(CertAuthority {
            ca_pem,
            issuer,
            lifetime,
            store: store.clone(),
            issued: RwLock::new(issued),
        });
        store.follow_table(Table::Certs, &ca, CertAuthority::follow);
        Ok(ca)
    }

    /// Another replica issued or revoked a certificate: this one knows it.
    fn follow(&self, change: TableChange) {
        let decoded = |fingerprint: &str, raw: &[u8]| {
            IssuedCert::decode(raw)
                .inspect_err(|_| tracing::warn!(%fingerprint, "a stored certificate record does not decode; ignored"))
                .ok()
        };
        let mut issued = self.issued.write().unwrap_or_else(|e| e.into_inner());
        match change {
            TableChange::Snapshot(all) => {
                *issued = all
                    .iter()
                    .filter_map(|(f, raw)| Some((f.clone(), decoded(f, raw)?)))
                    .collect();
            }
            TableChange::Put(fingerprint, raw) => {
                if let Some(cert) = decoded(&fingerprint, &raw) {
                    issued.insert(fingerprint, cert);
                }
            }
            TableChange::Deleted(fingerprint) => {
                issued.remove(&fingerprint);
            }
        }
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Signs a client certificate for `instance_id` from the agent's CSR
    /// (only its public key is taken) and remembers it.
    pub fn sign(
        &self,
        instance_id: &str,
        csr_pem: &str,
        grant: Option<crate::labels::LabelGrant>,
    ) -> Result<(String, SystemTime), CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, instance_id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = not_after.into();
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial).map_err(|e| CaError::BadCsr(e.to_string()))?;
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let record = IssuedCert {
            instance_id: instance_id.to_string(),
            not_after: Some(not_after.into()),
            grant,
        };
        let fingerprint = fingerprint(cert.der());
        self.store.put_cert(&fingerprint, &record)?;
        self.issued
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fingerprint, record);
        Ok((cert.pem(), not_after))
    }

    /// The instance a presented certificate (DER) was issued to, unless revoked.
    pub fn identify(&self, der: &[u8]) -> Option<String> {
        self.issued
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fingerprint(der))
            .map(|c| c.instance_id.clone())
    }

    /// The label grant of the newest certificate of `instance_id`.
    pub fn grant_of(&self, instance_id: &str) -> Option<crate::labels::LabelGrant> {
        self.issued
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|c| c.instance_id == instance_id)
            .max_by_key(|c| c.not_after.map(|t| (t.seconds, t.nanos)))
            .and_then(|c| c.grant.clone())
    }

    /// Whether `instance_id` holds a certificate that is in force.
    pub fn holds_valid(&self, instance_id: &str) -> bool {
        let now = SystemTime::now();
        self.issued
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|c| {
                c.instance_id == instance_id
                    && c.not_after
                        .and_then(|t| SystemTime::try_from(t).ok())
                        .is_some_and(|t| t > now)
            })
    }

    /// Forgets every certificate of an instance: it cannot connect again
    /// until it enrolls anew.
    pub fn revoke_instance(&self, instance_id: &str) -> Result<usize, StoreError> {
        let mut issued = self.issued.write().unwrap_or_else(|e| e.into_inner());
        let doomed: Vec<String> = issued
            .iter()
            .filter(|(_, c)| c.instance_id == instance_id)
            .map(|(f, _)| f.clone())
            .collect();
        for fingerprint in &doomed {
            self.store.delete_cert(fingerprint)?;
            issued.remove(fingerprint);
        }
        Ok(doomed.len())
    }
}

fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}
