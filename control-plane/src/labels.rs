//! Who decides an instance's labels, which decide its profile and so which
//! API keys reach it. Not the host: an agent's Hello is a claim. Labels are
//! taken from it once, at the instance's first registration, and only as
//! far as the token that admitted the agent allows; afterwards only
//! operators change them (FleetService/UpdateInstance).

use crate::effective::Labels;
use std::collections::BTreeMap;

/// What a join token lets its agents set at first registration. Kept with
/// each certificate it was used for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelGrant {
    /// Labels every instance it admits gets, whatever its agent says.
    #[prost(btree_map = "string, string", tag = "1")]
    pub fixed: BTreeMap<String, String>,
    /// The keys the agent's Hello may set. Empty: every key.
    #[prost(string, repeated, tag = "2")]
    pub allowed_keys: Vec<String>,
}

impl LabelGrant {
    /// The default enroll token's grant: every key the agent reports.
    pub fn all() -> LabelGrant {
        LabelGrant::default()
    }

    /// The labels of a first registration that reported `reported`.
    pub fn apply(&self, reported: &Labels) -> Labels {
        let mut labels: Labels = reported
            .iter()
            .filter(|(k, _)| self.allowed_keys.is_empty() || self.allowed_keys.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.extend(self.fixed.clone());
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::effective::tests::labels;

    #[test]
    fn a_grant_keeps_allowed_keys_and_fixes_the_rest() {
        let reported = labels(&[("ring", "canary"), ("region", "eu"), ("team", "x")]);
        assert_eq!(LabelGrant::all().apply(&reported), reported);
        let grant = LabelGrant {
            fixed: labels(&[("ring", "stable")]).into_iter().collect(),
            allowed_keys: vec!["region".into()],
        };
        assert_eq!(
            grant.apply(&reported),
            labels(&[("region", "eu"), ("ring", "stable")])
        );
    }
}
