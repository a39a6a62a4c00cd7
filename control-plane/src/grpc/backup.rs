//! BackupService: a consistent copy of the data dir while running.

use super::{blocking, status, writer};
use crate::error::ConfigError;
use crate::fsutil;
use crate::store::Store;
use duofleet_proto::v1::backup_service_server::BackupService;
use duofleet_proto::v1::{Backup, CreateBackupRequest};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Files of the data dir a restore needs beside the database.
const FILES: [&str; 6] = [
    "admin.token",
    "enroll.token",
    "secret.key",
    "token-hash.key",
    "ca.pem",
    "ca.key",
];

pub struct BackupApi {
    store: Arc<Store>,
    data_dir: PathBuf,
    /// A --secret-key-file outside the data dir, which a backup cannot hold.
    external_secret_key: Option<PathBuf>,
}

impl BackupApi {
    pub fn new(store: Arc<Store>, data_dir: PathBuf, external_secret_key: Option<PathBuf>) -> Self {
        BackupApi {
            store,
            data_dir,
            external_secret_key,
        }
    }
}

fn invalid(rule: &str) -> Status {
    status(ConfigError::invalid("directory", rule).into())
}

#[tonic::async_trait]
impl BackupService for BackupApi {
    async fn create_backup(
        &self,
        request: Request<CreateBackupRequest>,
    ) -> Result<Response<Backup>, Status> {
        let caller = writer(&request, "make backups")?;
        let directory = PathBuf::from(request.into_inner().directory);
        if !directory.is_absolute() {
            return Err(invalid("must be an absolute path on the duofleetd host"));
        }
        if directory.exists() {
            return Err(status(
                ConfigError::Blocked(format!(
                    "{} already exists; name a new directory",
                    directory.display()
                ))
                .into(),
            ));
        }
        self.store.check_backup().map_err(status)?;
        let store = self.store.clone();
        let data_dir = self.data_dir.clone();
        let dest = directory.clone();
        let result = blocking(move || -> Result<(u64, Vec<String>), String> {
            fsutil::create_private_dir(&dest)
                .map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
            let revision = store
                .backup(&dest.join("db"))
                .map_err(|e| format!("database copy failed: {e}"))?;
            let mut files = Vec::new();
            for name in FILES {
                let from = data_dir.join(name);
                if from.exists() {
                    copy_private(&from, &dest.join(name))
                        .map_err(|e| format!("cannot copy {name}: {e}"))?;
                    files.push(name.to_string());
                }
            }
            Ok((revision, files))
        })
        .await?;
        let (revision, files) = result.map_err(|e| {
            tracing::error!(error = %e, "backup failed");
            Status::internal(format!("backup failed: {e}"))
        })?;
        let not_included = self
            .external_secret_key
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        tracing::info!(directory = %directory.display(), revision, actor = %caller.name, "backup written");
        Ok(Response::new(Backup {
            directory: directory.display().to_string(),
            revision,
            files,
            not_included,
        }))
    }
}

fn copy_private(from: &Path, to: &Path) -> std::io::Result<()> {
    let bytes = std::fs::read(from)?;
    fsutil::write_atomic(to, &bytes, 0o600)
}
