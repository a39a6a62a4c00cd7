//! An instance's last health state changes, as kept in memory. The API and
//! the instance records carry them as `EndpointHealth` messages, each with
//! its own copy of the target's name and error text: about 200 bytes a
//! change, 20 KiB for an instance whose model flaps. Here a change shares
//! those strings with the change before it for the same target, and the
//! messages are built only when an instance is read or saved.

use duofleet_proto::v1::EndpointHealth;
use std::collections::VecDeque;
use std::sync::Arc;

/// How many health state changes an instance keeps.
pub const HEALTH_TRANSITIONS: usize = 100;

/// One change: an `EndpointHealth` with shared strings.
struct Change {
    kind: i32,
    state: i32,
    latency_ms: u32,
    target: Arc<str>,
    /// None when empty.
    error: Option<Arc<str>>,
    check_time: Option<prost_types::Timestamp>,
}

/// The last `HEALTH_TRANSITIONS` changes, oldest first.
#[derive(Default)]
pub struct Transitions(VecDeque<Change>);

impl Transitions {
    /// From a record's list (loaded, or saved by another replica).
    pub fn from_records(records: Vec<EndpointHealth>) -> Transitions {
        let mut transitions = Transitions::default();
        for record in &records {
            transitions.push(record);
        }
        transitions
    }

    /// Appends a change, forgetting the oldest beyond the limit.
    pub fn push(&mut self, health: &EndpointHealth) {
        let same_target = |c: &&Change| c.kind == health.kind && *c.target == *health.target;
        let target = match self.0.iter().rev().find(same_target) {
            Some(c) => c.target.clone(),
            None => Arc::from(health.target.as_str()),
        };
        let error = if health.error.is_empty() {
            None
        } else {
            // The target's last error, whatever changes came between.
            let last = self
                .0
                .iter()
                .rev()
                .filter(same_target)
                .find_map(|c| c.error.as_ref());
            match last {
                Some(same) if **same == *health.error => Some(same.clone()),
                _ => Some(Arc::from(health.error.as_str())),
            }
        };
        if self.0.len() == HEALTH_TRANSITIONS {
            self.0.pop_front();
        }
        self.0.push_back(Change {
            kind: health.kind,
            state: health.state,
            latency_ms: health.latency_ms,
            target,
            error,
            check_time: health.check_time,
        });
    }

    /// The changes as the API and the records carry them, oldest first.
    pub fn to_records(&self) -> Vec<EndpointHealth> {
        self.0
            .iter()
            .map(|c| EndpointHealth {
                kind: c.kind,
                target: c.target.to_string(),
                state: c.state,
                error: c.error.as_deref().unwrap_or_default().to_string(),
                latency_ms: c.latency_ms,
                check_time: c.check_time,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duofleet_proto::v1::{HealthState, TargetKind};

    fn change(target: &str, state: HealthState, error: &str, second: i64) -> EndpointHealth {
        EndpointHealth {
            kind: TargetKind::Model as i32,
            target: target.into(),
            state: state as i32,
            error: error.into(),
            latency_ms: second as u32,
            check_time: Some(prost_types::Timestamp {
                seconds: second,
                nanos: 7,
            }),
        }
    }

    #[test]
    fn keeps_the_last_hundred_exactly_and_shares_repeated_strings() {
        let mut transitions = Transitions::default();
        let mut pushed = Vec::new();
        for second in 0..250 {
            let (state, error) = if second % 2 == 1 {
                (HealthState::Unhealthy, "HTTP 503")
            } else {
                (HealthState::Healthy, "")
            };
            let target = if second % 5 == 0 {
                "codestral"
            } else {
                "mixtral"
            };
            let c = change(target, state, error, second);
            transitions.push(&c);
            pushed.push(c);
        }
        let kept = transitions.to_records();
        assert_eq!(kept.len(), HEALTH_TRANSITIONS);
        assert_eq!(kept, pushed[pushed.len() - HEALTH_TRANSITIONS..]);
        let mixtral: Vec<&Change> = transitions
            .0
            .iter()
            .filter(|c| &*c.target == "mixtral")
            .collect();
        assert!(
            mixtral
                .windows(2)
                .all(|w| Arc::ptr_eq(&w[0].target, &w[1].target)),
            "one copy of a target's name"
        );
        let errors: Vec<&Arc<str>> = mixtral.iter().filter_map(|c| c.error.as_ref()).collect();
        assert!(errors.len() > 10);
        assert!(
            errors.windows(2).any(|w| Arc::ptr_eq(w[0], w[1])),
            "a repeated error is shared"
        );
    }

    #[test]
    fn a_record_round_trips() {
        let records = vec![
            change("a", HealthState::Healthy, "", 1),
            change("b", HealthState::Unhealthy, "refused", 2),
            change("a", HealthState::Unhealthy, "timed out", 3),
        ];
        assert_eq!(
            Transitions::from_records(records.clone()).to_records(),
            records
        );
    }
}
