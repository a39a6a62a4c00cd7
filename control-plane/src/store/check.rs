//! `duofleetd check`: decodes every record and rebuilds every revision, the
//! way fsck walks a file system, and says precisely what is damaged. It
//! opens the database without writing to it (no schema, no migration).

use super::backend::HistoryEntry;
use super::sled_backend::{REVISION_KEY, SCHEMA_KEY, split_history_key};
use super::{
    Config, SCHEMA_VERSION, SledBackend, Store, StoreError, StoredToken, decode, high_water,
};
use crate::catalog::Catalog;
use crate::error::error_chain;
use crate::secrets::Sealer;
use duofleet_proto::v1 as pb;
use duofleet_proto::v1::{Model, Profile};
use prost::Message;
use std::collections::BTreeSet;
use std::path::Path;

/// One problem, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// e.g. "revision 17", "model mixtral-prod", "meta".
    pub what: String,
    pub detail: String,
}

/// What a check read and what it found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub revision: u64,
    pub revisions: usize,
    pub records: usize,
    pub damage: Vec<Damage>,
}

impl Store {
    /// Opens `dir` to check it: nothing is written.
    pub fn open_for_check(
        dir: &Path,
        high_water: Option<&Path>,
        catalog: &'static Catalog,
        sealer: Sealer,
    ) -> Result<Store, StoreError> {
        let backend = std::sync::Arc::new(SledBackend::open(dir)?);
        Ok(Store::unprepared(backend, high_water, catalog, sealer))
    }

    /// Opens a store on any backend to check it: nothing is written.
    pub fn open_backend_for_check(
        backend: std::sync::Arc<dyn super::backend::Backend>,
        high_water: Option<&Path>,
        catalog: &'static Catalog,
        sealer: Sealer,
    ) -> Store {
        Store::unprepared(backend, high_water, catalog, sealer)
    }

    pub fn check(&self) -> CheckReport {
        let Some(sled) = self.backend.as_sled() else {
            return self.check_through_backend();
        };
        let mut report = CheckReport::default();
        let t = match sled.trees() {
            Ok(t) => t,
            Err(e) => {
                report_damage(&mut report.damage, "database".into(), error_chain(&e));
                return report;
            }
        };
        let mut damaged =
            |what: String, detail: String| report_damage(&mut report.damage, what, detail);
        match t.meta.get(SCHEMA_KEY) {
            Ok(None) => damaged(
                "meta".into(),
                "no schema version: the database is empty or its files are missing".into(),
            ),
            Ok(Some(raw)) => {
                let found = u32::from_be_bytes(raw.as_ref().try_into().unwrap_or([0xff; 4]));
                if found != SCHEMA_VERSION {
                    damaged(
                        "meta".into(),
                        format!(
                            "schema version {found}; this duofleetd reads {SCHEMA_VERSION} (start it once to migrate an older one)"
                        ),
                    );
                }
            }
            Err(e) => damaged("meta".into(), error_chain(&e)),
        }
        let revision = match t.meta.get(REVISION_KEY) {
            Ok(Some(raw)) => match <[u8; 8]>::try_from(raw.as_ref()) {
                Ok(bytes) => u64::from_be_bytes(bytes),
                Err(_) => {
                    damaged("meta".into(), "the current revision is not 8 bytes".into());
                    0
                }
            },
            Ok(None) => 0,
            Err(e) => {
                damaged("meta".into(), error_chain(&e));
                0
            }
        };
        self.check_high_water(
            revision,
            "database",
            "files are missing or an older copy was put in place",
            &mut damaged,
        );
        // Revision records: each decodes, none is missing, none is newer.
        let mut seen = BTreeSet::new();
        for item in t.revisions.iter() {
            let (key, value) = match item {
                Ok(kv) => kv,
                Err(e) => {
                    damaged("revisions".into(), error_chain(&e));
                    continue;
                }
            };
            let Ok(bytes) = <[u8; 8]>::try_from(key.as_ref()) else {
                damaged("revisions".into(), format!("a key of {} bytes", key.len()));
                continue;
            };
            let number = u64::from_be_bytes(bytes);
            seen.insert(number);
            if let Err(e) = decode::<pb::Revision>(&value, || format!("revision {number}")) {
                damaged(format!("revision {number}"), error_chain(&e));
            }
            if number > revision {
                damaged(
                    format!("revision {number}"),
                    format!("newer than the current revision {revision}"),
                );
            }
        }
        for number in (1..=revision).filter(|r| !seen.contains(r)) {
            damaged(format!("revision {number}"), "its record is missing".into());
        }
        // Every stored record decodes (and every API key opens).
        let mut records = 0;
        for (tree, kind) in [
            (&t.models, "model"),
            (&t.profiles, "profile"),
            (&t.history, "history"),
            (&t.instances, "instance"),
            (&t.tokens, "token"),
            (&t.certs, "certificate"),
        ] {
            for item in tree.iter() {
                records += 1;
                let (key, value) = match item {
                    Ok(kv) => kv,
                    Err(e) => {
                        damaged(kind.into(), error_chain(&e));
                        continue;
                    }
                };
                let name = String::from_utf8_lossy(&key).into_owned();
                let what = || format!("{kind} {name}");
                let result = match kind {
                    "model" => {
                        decode::<Model>(&value, what).and_then(|m| self.open_model(m).map(|_| ()))
                    }
                    "profile" => decode::<Profile>(&value, what).map(|_| ()),
                    "history" => match split_history_key(&key) {
                        None => {
                            damaged("history".into(), "a key that names no resource".into());
                            continue;
                        }
                        Some((_, name, at)) => {
                            decode::<HistoryEntry>(&value, || format!("history of {name} at {at}"))
                                .map(|_| ())
                        }
                    },
                    "instance" => decode::<pb::Instance>(&value, what).map(|_| ()),
                    "token" => decode::<StoredToken>(&value, what).map(|_| ()),
                    _ => decode::<crate::ca::IssuedCert>(&value, what).map(|_| ()),
                };
                if let Err(e) = result {
                    damaged(what(), error_chain(&e));
                }
            }
        }
        self.check_history(revision, &mut damaged);
        report.revision = revision;
        report.revisions = seen.len();
        report.records = records;
        report
    }
}

impl Store {
    /// The same checks through the backend's own reads (etcd): the schema,
    /// every revision record from 1 to the current one, every revision
    /// rebuilt from history, the current configuration against the newest
    /// of them, every API key opened, every record of every table decoded,
    /// and the high-water mark.
    fn check_through_backend(&self) -> CheckReport {
        let mut report = CheckReport::default();
        let mut damaged =
            |what: String, detail: String| report_damage(&mut report.damage, what, detail);
        match self.backend.schema_version() {
            Ok(None) => damaged(
                "meta".into(),
                "no schema version: nothing was ever stored under this prefix".into(),
            ),
            Ok(Some(found)) if found != SCHEMA_VERSION => damaged(
                "meta".into(),
                format!("schema version {found}; this duofleetd reads {SCHEMA_VERSION}"),
            ),
            Ok(Some(_)) => {}
            Err(e) => damaged("meta".into(), error_chain(&e)),
        }
        let revision = self.backend.revision().unwrap_or_else(|e| {
            damaged("meta".into(), error_chain(&e));
            0
        });
        self.check_high_water(
            revision,
            "store",
            "it was restored from an older snapshot, or another prefix is in use",
            &mut damaged,
        );
        let mut seen = 0;
        for number in 1..=revision {
            match self.backend.record(number) {
                Ok(Some(_)) => seen += 1,
                Ok(None) => damaged(format!("revision {number}"), "its record is missing".into()),
                Err(e) => damaged(format!("revision {number}"), error_chain(&e)),
            }
        }
        self.check_history(revision, &mut damaged);
        let mut records = 0;
        for table in super::Table::ALL {
            let rows = match self.backend.scan(table) {
                Ok(rows) => rows,
                Err(e) => {
                    damaged(table.name().into(), error_chain(&e));
                    continue;
                }
            };
            for (key, value) in rows {
                records += 1;
                let what = || format!("{} {key}", table.name());
                let decoded = match table {
                    super::Table::Instances => decode::<pb::Instance>(&value, what).map(drop),
                    super::Table::Tokens => decode::<StoredToken>(&value, what).map(drop),
                    super::Table::Certs => decode::<crate::ca::IssuedCert>(&value, what).map(drop),
                    super::Table::Rollouts => decode::<pb::Rollout>(&value, what).map(drop),
                };
                if let Err(e) = decoded {
                    damaged(what(), error_chain(&e));
                }
            }
        }
        report.revision = revision;
        report.revisions = seen;
        report.records = records;
        report
    }
}

impl Store {
    /// The store is not behind the revision this data dir acknowledged;
    /// `likely` says what may have happened to the `holder` if it is.
    fn check_high_water(
        &self,
        revision: u64,
        holder: &str,
        likely: &str,
        damaged: &mut impl FnMut(String, String),
    ) {
        let Some(path) = &self.high_water else {
            return;
        };
        match high_water::read(path) {
            Ok(acknowledged) if acknowledged > revision => damaged(
                "revision.hwm".into(),
                format!(
                    "revision {acknowledged} was acknowledged, but the {holder} holds only {revision}: {likely}"
                ),
            ),
            Ok(_) => {}
            Err(e) => damaged("revision.hwm".into(), error_chain(&e)),
        }
    }

    /// Every revision rebuilds from history, and the current state is the
    /// newest of them: never a partial configuration served as current.
    fn check_history(&self, revision: u64, damaged: &mut impl FnMut(String, String)) {
        for number in 1..=revision {
            if let Err(e) = self.config_at(number) {
                damaged(
                    format!("revision {number}"),
                    format!("cannot be rebuilt: {}", error_chain(&e)),
                );
            }
        }
        match (self.load(), self.config_at(revision)) {
            (Ok(current), Ok(rebuilt)) if !same_content(&current, &rebuilt) => damaged(
                format!("revision {revision}"),
                "the current models and profiles differ from what its history says".into(),
            ),
            (Err(e), _) => damaged("current configuration".into(), error_chain(&e)),
            _ => {}
        }
    }
}

fn report_damage(damage: &mut Vec<Damage>, what: String, detail: String) {
    damage.push(Damage { what, detail });
}

fn same_content(a: &Config, b: &Config) -> bool {
    let models = |c: &Config| {
        c.models
            .values()
            .map(|m| {
                (
                    m.name.clone(),
                    m.family.clone(),
                    m.endpoint.clone(),
                    m.identifier.clone(),
                    m.provider.clone(),
                    m.api_key.clone(),
                )
            })
            .collect::<Vec<_>>()
    };
    let profiles = |c: &Config| {
        c.profiles
            .values()
            .map(|p| {
                Profile {
                    create_time: None,
                    update_time: None,
                    revision: 0,
                    ..p.clone()
                }
                .encode_to_vec()
            })
            .collect::<Vec<_>>()
    };
    models(a) == models(b) && profiles(a) == profiles(b)
}
