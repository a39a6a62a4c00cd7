//! The open sled database, and how the store gets a fresh one after a
//! storage failure.
//!
//! sled remembers the first I/O error it meets (a full disk, typically) and
//! fails every later operation with it, even once space is back. So after a
//! failed write the store marks itself failed, and the next write first
//! reopens the database ([`Store::recover_locked`]): it drops the failed
//! handle, opens the files again, and checks what is on disk against the
//! newest acknowledged revision.
//!
//! A commit that failed may still have reached the disk (sled writes its
//! log in the background as well), although its caller heard an error.
//! Such revisions were never acknowledged, so recovery takes them out again:
//! an error keeps meaning "nothing changed".

use super::{
    Config, MODEL_KIND, PROFILE_KIND, REVISION_KEY, Store, StoreError, split_history_key,
    unabortable,
};
use prost::Message;
use sled::Transactional;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// sled's page cache. The configuration is small and the fleet's instances
/// live in the registry's memory: sled's default 1 GiB cache would only hold
/// copies of instance records (about 30 KiB per agent at 10,000).
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// How long a reopen waits for calls still using the failed handle, and for
/// sled's flusher thread to let go of the file lock.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// One open sled database and its trees (the layout is in `store/mod.rs`).
pub(crate) struct Trees {
    pub db: sled::Db,
    pub meta: sled::Tree,
    pub models: sled::Tree,
    pub profiles: sled::Tree,
    pub revisions: sled::Tree,
    pub history: sled::Tree,
    pub instances: sled::Tree,
    pub tokens: sled::Tree,
    pub certs: sled::Tree,
    pub rollouts: sled::Tree,
}

impl Trees {
    pub fn open(dir: &Path) -> Result<Trees, sled::Error> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()?;
        Ok(Trees {
            meta: db.open_tree("meta")?,
            models: db.open_tree("models")?,
            profiles: db.open_tree("profiles")?,
            revisions: db.open_tree("revisions")?,
            history: db.open_tree("history")?,
            instances: db.open_tree("instances")?,
            tokens: db.open_tree("tokens")?,
            certs: db.open_tree("certs")?,
            rollouts: db.open_tree("rollouts")?,
            db,
        })
    }

    /// Like [`Trees::open`], retrying while the previous handle's flusher
    /// thread still holds the file lock.
    fn reopen(dir: &Path) -> Result<Trees, sled::Error> {
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            match Trees::open(dir) {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    /// The newest revision the database itself records (0 when empty).
    pub fn revision(&self) -> Result<u64, StoreError> {
        Ok(match self.meta.get(REVISION_KEY)? {
            Some(raw) => u64::from_be_bytes(raw.as_ref().try_into().unwrap_or_default()),
            None => 0,
        })
    }
}

impl Store {
    /// The open database; an error while a reopen after a storage failure
    /// has not succeeded yet.
    pub(crate) fn trees(&self) -> Result<Arc<Trees>, StoreError> {
        self.trees
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Unavailable)
    }

    /// Runs a write that is not a configuration commit (instances, tokens,
    /// certificates, the readiness probe), reopening the database first if
    /// an earlier write failed.
    pub(crate) fn write<R>(
        &self,
        op: impl FnOnce(&Trees) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        if self.failed.load(Ordering::Acquire) {
            let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            self.recover_locked()?;
        }
        let trees = self.trees()?;
        self.noting_failure(op(&trees))
    }

    /// Marks the store failed when `result` is an I/O error, so that the
    /// next write reopens the database.
    pub(crate) fn noting_failure<R>(&self, result: Result<R, StoreError>) -> Result<R, StoreError> {
        if let Err(error @ StoreError::Storage(sled::Error::Io(_))) = &result
            && !self.failed.swap(true, Ordering::AcqRel)
        {
            tracing::error!(
                error = %crate::error::error_chain(error),
                "a storage write failed; the database is reopened before the next write"
            );
        }
        result
    }

    /// After a failed write: reopens the database and puts it back at the
    /// acknowledged revision. The caller holds the writer lock, so no commit
    /// runs meanwhile. On error the store stays failed and the next write
    /// tries again.
    pub(crate) fn recover_locked(&self) -> Result<(), StoreError> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.trees.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.take() {
            // Calls that took the handle before the failure still hold it;
            // sled's file lock goes only with the last of them.
            let deadline = Instant::now() + RELEASE_WAIT;
            let mut old = old;
            loop {
                match Arc::try_unwrap(old) {
                    Ok(trees) => break drop(trees),
                    Err(shared) if Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(shared) => {
                        *slot = Some(shared);
                        return Err(StoreError::Unavailable);
                    }
                }
            }
        }
        let trees = Trees::reopen(&self.dir)?;
        let acknowledged = self.current().revision;
        let found = trees.revision()?;
        if found < acknowledged {
            return Err(StoreError::LostOnReopen {
                found,
                acknowledged,
            });
        }
        if found > acknowledged {
            self.discard_unacknowledged(&trees, &self.current(), found)?;
        }
        *slot = Some(Arc::new(trees));
        self.failed.store(false, Ordering::Release);
        tracing::info!(
            revision = acknowledged,
            "storage recovered: the database was reopened"
        );
        Ok(())
    }

    /// Takes out revisions after `acked` (which reached the disk although
    /// their commit failed): the models and profiles they touched go back
    /// to their acknowledged values, in one transaction, flushed.
    fn discard_unacknowledged(
        &self,
        trees: &Trees,
        acked: &Config,
        found: u64,
    ) -> Result<(), StoreError> {
        let mut touched = BTreeSet::new();
        let mut stale_history = Vec::new();
        for item in trees.history.iter() {
            let (key, _) = item?;
            if let Some((kind, name, at)) = split_history_key(&key)
                && at > acked.revision
            {
                touched.insert((kind, name));
                stale_history.push(key);
            }
        }
        let first_stale = (acked.revision + 1).to_be_bytes();
        let stale_revisions = trees
            .revisions
            .range(first_stale..)
            .keys()
            .collect::<Result<Vec<_>, _>>()?;
        (
            &trees.meta,
            &trees.models,
            &trees.profiles,
            &trees.revisions,
            &trees.history,
        )
            .transaction(|(meta, models, profiles, revisions, history)| {
                meta.insert(REVISION_KEY, &acked.revision.to_be_bytes())?;
                for (kind, name) in &touched {
                    match *kind {
                        MODEL_KIND => match acked.models.get(name) {
                            Some(model) => models
                                .insert(name.as_bytes(), self.seal_model(model).encode_to_vec())?,
                            None => models.remove(name.as_bytes())?,
                        },
                        PROFILE_KIND => match acked.profiles.get(name) {
                            Some(profile) => {
                                profiles.insert(name.as_bytes(), profile.encode_to_vec())?
                            }
                            None => profiles.remove(name.as_bytes())?,
                        },
                        _ => None,
                    };
                }
                for key in &stale_history {
                    history.remove(key)?;
                }
                for key in &stale_revisions {
                    revisions.remove(key)?;
                }
                Ok(())
            })
            .map_err(unabortable)?;
        trees.db.flush()?;
        tracing::warn!(
            from = acked.revision + 1,
            to = found,
            "revisions that reached the disk although their commit failed were taken out again: they were never acknowledged"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::catalog;
    use crate::secrets::Sealer;
    use crate::store::Store;
    use duofleet_proto::v1::Model;
    use std::sync::atomic::Ordering;

    fn model(name: &str) -> Model {
        Model {
            name: name.into(),
            family: "mixtral".into(),
            endpoint: "https://vllm:8000/v1".into(),
            api_key: format!("key-of-{name}"),
            ..Default::default()
        }
    }

    /// A commit whose caller heard an error, but which reached the disk
    /// anyway, is taken out again when the database is reopened.
    #[test]
    fn a_reopen_takes_out_revisions_that_were_never_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), catalog::get(), Sealer::new(&[3; 32], None)).unwrap();
        let create = |name: &str| {
            store
                .mutate("test", |c, cat| c.create_model(cat, model(name)))
                .unwrap()
        };
        create("a");
        let updated = Model {
            api_key: "rotated".into(),
            ..model("a")
        };
        store
            .mutate("test", |c, cat| c.update_model(cat, updated, &[]))
            .unwrap();
        let acknowledged = store.current();
        // Revisions 3 and 4 reach the disk; their callers hear an error.
        create("b");
        store.mutate("test", |c, _| c.delete_model("a")).unwrap();
        store.current.send_replace(acknowledged);
        store.failed.store(true, Ordering::Release);

        let commit = create("c");
        assert_eq!(commit.revision.unwrap().revision, 3);
        let config = store.current();
        assert_eq!(config.models.keys().collect::<Vec<_>>(), ["a", "c"]);
        assert_eq!(config.models["a"].api_key, "rotated");
        let revisions: Vec<_> = store
            .list_revisions(None, 10)
            .unwrap()
            .into_iter()
            .map(|r| (r.revision, r.summary))
            .collect();
        assert_eq!(
            revisions,
            [
                (3, "create model c".to_string()),
                (2, "update model a (family, endpoint, api_key)".to_string()),
                (1, "create model a".to_string())
            ]
        );
        let (_, at_three) = store.get_revision(3).unwrap();
        assert_eq!(at_three.models.keys().collect::<Vec<_>>(), ["a", "c"]);
        // And what was taken out stays out on disk.
        assert_eq!(store.load().unwrap().models, config.models);
    }
}
