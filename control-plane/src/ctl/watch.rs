//! `watch`: the fleet's events, one line each; with `--until-synced`, a
//! progress bar of instances running the current revision.

use crate::{Failure, Outcome, refused, view};
use duofleet_control_plane::client::Clients;
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::{
    FleetEvent, Instance, ListInstancesRequest, ListRevisionsRequest, SyncState, WatchFleetRequest,
};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// One readable line for an event.
pub fn line(event: &FleetEvent) -> Option<String> {
    let time = event
        .time
        .as_ref()
        .map_or("-".into(), |t| view::rfc3339(t)[11..19].to_string());
    let text = match event.event.as_ref()? {
        Event::RevisionCreated(r) => {
            format!("revision {} by {}: {}", r.revision, r.actor, r.summary)
        }
        Event::InstanceConnected(i) => {
            format!("{} connected ({})", i.instance_id, i.sync_state().word())
        }
        Event::InstanceDisconnected(i) => format!("{} disconnected", i.instance_id),
        Event::Applied(i) => format!(
            "{} applied revision {} ({})",
            i.instance_id,
            i.revision,
            i.sync_state().word()
        ),
        Event::Failed(i) => format!(
            "{} FAILED at revision {}: {}",
            i.instance_id, i.revision, i.error
        ),
        Event::Drifted(i) => format!("{} drifted: {}", i.instance_id, i.error),
        Event::Deleted(i) => format!("{} deleted", i.instance_id),
        Event::HealthChanged(i) => {
            let targets: Vec<String> = i
                .targets
                .iter()
                .map(|t| {
                    let state = t.state().as_str_name().trim_start_matches("HEALTH_STATE_");
                    if t.error.is_empty() {
                        format!("{} {state}", t.target)
                    } else {
                        format!("{} {state} ({})", t.target, t.error)
                    }
                })
                .collect();
            format!("{} health: {}", i.instance_id, targets.join(", "))
        }
        Event::RolloutChanged(r) => format!(
            "rollout {} {}{}{}",
            r.id,
            r.state().as_str_name().trim_start_matches("ROLLOUT_STATE_"),
            if r.state() == duofleet_proto::v1::RolloutState::Progressing {
                format!(" (wave {})", r.wave + 1)
            } else {
                String::new()
            },
            if r.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", r.reason)
            }
        ),
        Event::LabelsChanged(l) => format!(
            "{} labels by {}: {} -> {}",
            l.instance_id,
            l.actor,
            duofleet_control_plane::diff::labels(&l.old_labels),
            duofleet_control_plane::diff::labels(&l.new_labels)
        ),
    };
    Some(format!("{time}  {text}"))
}

pub async fn watch(
    c: &mut Clients,
    until_synced: bool,
    timeout: Duration,
) -> Result<Outcome, Failure> {
    let mut events = c
        .fleet
        .watch_fleet(WatchFleetRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    if !until_synced {
        while let Some(event) = events.message().await.map_err(refused)? {
            if let Some(line) = line(&event) {
                println!("{line}");
            }
        }
        return Ok(Outcome::Done);
    }
    let deadline = Instant::now() + timeout;
    let target = c
        .history
        .list_revisions(ListRevisionsRequest {
            page_size: 1,
            page_token: String::new(),
        })
        .await
        .map_err(refused)?
        .into_inner()
        .revisions
        .first()
        .map_or(0, |r| r.revision);
    let mut instances: BTreeMap<String, Instance> = c
        .fleet
        .list_instances(ListInstancesRequest::default())
        .await
        .map_err(refused)?
        .into_inner()
        .instances
        .into_iter()
        .map(|i| (i.instance_id.clone(), i))
        .collect();
    let bar = indicatif::ProgressBar::new(instances.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} SYNCED at revision {msg}",
        )
        .expect("a valid template"),
    );
    bar.set_message(target.to_string());
    loop {
        let synced = instances
            .values()
            .filter(|i| i.sync_state() == SyncState::Synced && i.applied_revision >= target)
            .count();
        bar.set_length(instances.len() as u64);
        bar.set_position(synced as u64);
        if let Some(failed) = instances
            .values()
            .find(|i| i.sync_state() == SyncState::Failed)
        {
            bar.abandon();
            eprintln!(
                "{} FAILED at revision {}: {}",
                failed.instance_id, failed.desired_revision, failed.last_error
            );
            return Ok(Outcome::Negative);
        }
        if synced == instances.len() {
            bar.finish();
            eprintln!("all {synced} instances SYNCED at revision {target}");
            return Ok(Outcome::Done);
        }
        let next = tokio::time::timeout_at(deadline.into(), events.message()).await;
        let event = match next {
            Err(_) => {
                bar.abandon();
                let waiting: Vec<String> = instances
                    .values()
                    .filter(|i| {
                        !(i.sync_state() == SyncState::Synced && i.applied_revision >= target)
                    })
                    .map(|i| format!("{} {}", i.instance_id, i.sync_state().word()))
                    .collect();
                eprintln!(
                    "timed out after {timeout:?}; not yet SYNCED: {}",
                    waiting.join(", ")
                );
                return Ok(Outcome::TimedOut);
            }
            Ok(event) => event.map_err(refused)?,
        };
        let Some(event) = event else {
            return Err(Failure("duofleetd closed the event stream".into()));
        };
        if let Some(line) = line(&event) {
            bar.println(line);
        }
        // Re-read the one instance (or all, on a revision) for its state.
        match event.event {
            Some(Event::RevisionCreated(_) | Event::RolloutChanged(_)) | None => {}
            Some(Event::Deleted(i)) => {
                instances.remove(&i.instance_id);
            }
            Some(Event::LabelsChanged(l)) => refresh(c, &mut instances, &l.instance_id).await?,
            Some(
                Event::InstanceConnected(i)
                | Event::InstanceDisconnected(i)
                | Event::Applied(i)
                | Event::Failed(i)
                | Event::Drifted(i)
                | Event::HealthChanged(i),
            ) => refresh(c, &mut instances, &i.instance_id).await?,
        }
    }
}

async fn refresh(
    c: &mut Clients,
    instances: &mut BTreeMap<String, Instance>,
    id: &str,
) -> Result<(), Failure> {
    match c
        .fleet
        .get_instance(duofleet_proto::v1::GetInstanceRequest {
            instance_id: id.into(),
        })
        .await
    {
        Ok(instance) => {
            instances.insert(id.into(), instance.into_inner());
        }
        Err(status) if status.code() == tonic::Code::NotFound => {
            instances.remove(id);
        }
        Err(status) => return Err(refused(status)),
    }
    Ok(())
}
