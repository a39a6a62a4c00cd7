//! Encode once, send many. A fleet's agents mostly get the same
//! DesiredConfig: it depends only on the revision and the profile an
//! instance matches. Each distinct one is built, digested and encoded once,
//! the first time a session asks for it, and every session that gets it
//! shares the result: its stream sends the shared bytes, and deciding
//! whether an agent needs anything is a digest comparison.

use crate::config::Config;
use crate::effective::{self, Labels};
use duofleet_proto::v1::DesiredConfig;
use duofleet_proto::wire::{ControlFrame, content_digest};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How many revisions' configurations are kept: the current one, those
/// rollouts hold instances on, and a few that sessions may still be
/// moving off. The least recently used goes first.
const REVISIONS_KEPT: usize = 8;

/// One instance's desired configuration, ready to send.
pub struct Prepared {
    pub desired: DesiredConfig,
    /// `content_digest` of `desired`: equal digests, nothing to send.
    pub digest: String,
    /// The ControlMessage carrying `desired`, encoded as a gRPC message.
    pub frame: ControlFrame,
}

#[derive(Default)]
pub struct Fanout {
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// revision -> (last use, profile -> prepared)
    revisions: HashMap<u64, (u64, HashMap<String, Arc<Prepared>>)>,
    uses: u64,
}

impl Fanout {
    /// The desired configuration of an instance with `labels` at `config`.
    pub fn prepare(&self, config: &Config, labels: &Labels) -> Arc<Prepared> {
        let profile = effective::match_profile(config, labels).map_or("", |p| p.name.as_str());
        if let Some(hit) = self.lock().profiles_at(config.revision).get(profile) {
            return hit.clone();
        }
        // Built outside the lock: sessions that race here build the same
        // thing, and the first one stored wins.
        let desired = effective::desired_config(config, labels);
        let prepared = Arc::new(Prepared {
            digest: content_digest(&desired),
            frame: ControlFrame::desired(&desired),
            desired,
        });
        let mut cache = self.lock();
        let prepared = cache
            .profiles_at(config.revision)
            .entry(profile.to_string())
            .or_insert(prepared)
            .clone();
        while cache.revisions.len() > REVISIONS_KEPT {
            let oldest = cache
                .revisions
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(revision, _)| *revision);
            if let Some(revision) = oldest {
                cache.revisions.remove(&revision);
            }
        }
        prepared
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Cache {
    /// The prepared configurations of `revision`, marked as just used.
    fn profiles_at(&mut self, revision: u64) -> &mut HashMap<String, Arc<Prepared>> {
        self.uses += 1;
        let uses = self.uses;
        let (used, profiles) = self
            .revisions
            .entry(revision)
            .or_insert_with(|| (uses, HashMap::new()));
        *used = uses;
        profiles
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::default_profile;
    use crate::effective::tests::labels;
    use duofleet_proto::v1::Profile;

    fn config(revision: u64, eu_url: &str) -> Config {
        let mut config = Config {
            revision,
            ..Default::default()
        };
        let eu = Profile {
            name: "eu".into(),
            selector: labels(&[("region", "eu")]),
            ai_gateway_url: eu_url.into(),
            ..Default::default()
        };
        for p in [default_profile(), eu] {
            config.profiles.insert(p.name.clone(), p);
        }
        config
    }

    #[test]
    fn one_build_per_revision_and_profile_shared_by_every_instance() {
        let fanout = Fanout::default();
        let c1 = config(1, "https://eu-1");
        let eu = labels(&[("region", "eu"), ("host", "a")]);
        let a = fanout.prepare(&c1, &eu);
        let b = fanout.prepare(&c1, &labels(&[("region", "eu"), ("host", "b")]));
        assert!(Arc::ptr_eq(&a, &b), "same revision and profile: one build");
        let other = fanout.prepare(&c1, &Labels::new());
        assert_eq!(other.desired.profile, "default");
        assert_ne!(a.digest, other.digest);
        assert_eq!(a.desired, effective::desired_config(&c1, &eu));

        // A revision that changes only the eu profile: the default's
        // content, and so its digest, stays.
        let c2 = config(2, "https://eu-2");
        assert_eq!(fanout.prepare(&c2, &Labels::new()).digest, other.digest);
        let a2 = fanout.prepare(&c2, &eu);
        assert_ne!(a2.digest, a.digest);
        assert_eq!(a2.desired.revision, 2);
    }

    #[test]
    fn the_least_recently_used_revision_goes_first() {
        let fanout = Fanout::default();
        let base = config(1, "https://eu-1");
        let held = fanout.prepare(&base, &Labels::new());
        for revision in 2..=20 {
            fanout.prepare(&config(revision, "https://eu"), &Labels::new());
            // A rollout keeps asking for its base revision.
            assert!(Arc::ptr_eq(&held, &fanout.prepare(&base, &Labels::new())));
        }
        assert_eq!(fanout.lock().revisions.len(), REVISIONS_KEPT);
    }
}
