//! `DATA_DIR/revision.hwm`: the newest revision that was acknowledged,
//! written atomically after each commit, outside sled's files. sled alone
//! cannot tell "empty" from "lost": with its snapshot files gone it opens
//! empty at revision 0. Against this file, that is refused.

use super::StoreError;
use crate::fsutil;
use std::io;
use std::path::Path;

/// The recorded revision; 0 when there is no file yet (a new data dir, or
/// one from before this guard).
pub fn read(path: &Path) -> Result<u64, StoreError> {
    let failed = |source| StoreError::HighWater {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            failed(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{:?} is not a revision number", text.trim()),
            ))
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(failed(e)),
    }
}

pub fn write(path: &Path, revision: u64) -> Result<(), StoreError> {
    fsutil::write_atomic(path, format!("{revision}\n").as_bytes(), 0o600).map_err(|source| {
        StoreError::HighWater {
            path: path.to_path_buf(),
            source,
        }
    })
}
