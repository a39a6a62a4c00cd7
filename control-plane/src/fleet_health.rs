//! GetFleetHealth: per target, across instances, how many can reach it.

use duofleet_proto::v1::{FailingInstance, FleetHealth, HealthState, Instance, TargetHealth};
use std::collections::BTreeMap;

/// Counts each instance's latest result per (kind, target). An instance
/// that is not connected counts as unknown: its last result may be stale.
pub fn aggregate(instances: &[Instance]) -> FleetHealth {
    let mut targets: BTreeMap<(i32, String), (TargetHealth, Vec<u32>)> = BTreeMap::new();
    for instance in instances {
        for result in &instance.health {
            let (target, latencies) = targets
                .entry((result.kind, result.target.clone()))
                .or_insert_with(|| {
                    (
                        TargetHealth {
                            kind: result.kind,
                            target: result.target.clone(),
                            ..Default::default()
                        },
                        Vec::new(),
                    )
                });
            match (instance.connected, result.state()) {
                (false, _) | (true, HealthState::Unknown) => target.unknown += 1,
                (true, HealthState::Healthy) => {
                    target.healthy += 1;
                    latencies.push(result.latency_ms);
                }
                (true, HealthState::Unhealthy) => {
                    target.unhealthy += 1;
                    latencies.push(result.latency_ms);
                    target.failing.push(FailingInstance {
                        instance_id: instance.instance_id.clone(),
                        error: result.error.clone(),
                    });
                }
            }
        }
    }
    FleetHealth {
        targets: targets
            .into_values()
            .map(|(mut target, mut latencies)| {
                latencies.sort_unstable();
                target.latency_p50_ms = percentile(&latencies, 50);
                target.latency_p99_ms = percentile(&latencies, 99);
                target
            })
            .collect(),
    }
}

/// Nearest-rank percentile of sorted values; 0 when there are none.
fn percentile(sorted: &[u32], p: usize) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use duofleet_proto::v1::{EndpointHealth, TargetKind};

    fn result(target: &str, state: HealthState, latency_ms: u32, error: &str) -> EndpointHealth {
        EndpointHealth {
            kind: TargetKind::Model as i32,
            target: target.into(),
            state: state as i32,
            error: error.into(),
            latency_ms,
            check_time: None,
        }
    }

    fn instance(id: &str, connected: bool, health: Vec<EndpointHealth>) -> Instance {
        Instance {
            instance_id: id.into(),
            connected,
            health,
            ..Default::default()
        }
    }

    #[test]
    fn counts_latency_and_failing_instances_per_target() {
        let fleet = aggregate(&[
            instance("a", true, vec![result("m", HealthState::Healthy, 10, "")]),
            instance(
                "b",
                true,
                vec![result(
                    "m",
                    HealthState::Unhealthy,
                    30,
                    "connection refused",
                )],
            ),
            instance("c", true, vec![result("m", HealthState::Healthy, 20, "")]),
            instance("d", false, vec![result("m", HealthState::Healthy, 5, "")]),
        ]);
        assert_eq!(fleet.targets.len(), 1);
        let m = &fleet.targets[0];
        assert_eq!((m.healthy, m.unhealthy, m.unknown), (2, 1, 1));
        assert_eq!((m.latency_p50_ms, m.latency_p99_ms), (20, 30));
        assert_eq!(m.failing.len(), 1);
        assert_eq!(m.failing[0].instance_id, "b");
        assert_eq!(m.failing[0].error, "connection refused");
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 50), 50);
        assert_eq!(percentile(&values, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(percentile(&[], 50), 0);
    }
}
