//! FleetService: the instances whose agents connected, and a live stream of
//! revisions and instance events.

use super::{blocking, caller, status};
use crate::ca::CertAuthority;
use crate::error::ConfigError;
use crate::fleet_health;
use crate::registry::Registry;
use crate::store::{Store, StoreError};
use crate::validate;
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::fleet_service_server::FleetService;
use duofleet_proto::v1::{
    DeleteInstanceRequest, FleetEvent, FleetHealth, GetFleetHealthRequest, GetInstanceRequest,
    Instance, ListInstancesRequest, ListInstancesResponse, Revision, RevisionCreated,
    UpdateInstanceRequest, WatchFleetRequest,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct FleetApi {
    store: Arc<Store>,
    registry: Arc<Registry>,
    ca: Arc<CertAuthority>,
    shutdown: watch::Receiver<bool>,
}

impl FleetApi {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        ca: Arc<CertAuthority>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        FleetApi {
            store,
            registry,
            ca,
            shutdown,
        }
    }
}

fn no_instance(instance_id: &str) -> Status {
    status(StoreError::Config(ConfigError::NotFound {
        kind: "instance",
        name: instance_id.to_string(),
    }))
}

fn revision_event(record: &Revision) -> FleetEvent {
    FleetEvent {
        time: record.create_time,
        event: Some(Event::RevisionCreated(RevisionCreated {
            revision: record.revision,
            actor: record.actor.clone(),
            summary: record.summary.clone(),
        })),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<FleetEvent, Status>> + Send>>;

#[tonic::async_trait]
impl FleetService for FleetApi {
    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        caller(&request)?;
        let selector = request.into_inner().selector.into_iter().collect();
        validate::selector("selector", &selector).map_err(|e| status(e.into()))?;
        // Slim: the transitions are GetInstance's.
        let instances = self.registry.list(&selector);
        Ok(Response::new(ListInstancesResponse { instances }))
    }

    async fn get_instance(
        &self,
        request: Request<GetInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        caller(&request)?;
        let id = &request.get_ref().instance_id;
        let mut instance = self.registry.get(id).ok_or_else(|| no_instance(id))?;
        let labels = instance.labels.clone().into_iter().collect();
        instance.effective = Some(crate::effective::public_config(
            &self.store.current(),
            &labels,
        ));
        Ok(Response::new(instance))
    }

    async fn update_instance(
        &self,
        request: Request<UpdateInstanceRequest>,
    ) -> Result<Response<Instance>, Status> {
        let caller = super::writer(&request, "change instances")?;
        let request = request.into_inner();
        let instance = super::required(request.instance, "instance")?;
        let paths = request.update_mask.map(|m| m.paths).unwrap_or_default();
        if paths != ["labels"] {
            return Err(Status::invalid_argument(format!(
                "update_mask: must be exactly [\"labels\"], the only field operators set on an instance (got {paths:?})"
            )));
        }
        validate::selector("instance.labels", &instance.labels).map_err(|e| status(e.into()))?;
        if request.validate_only {
            let mut preview = self
                .registry
                .get(&instance.instance_id)
                .ok_or_else(|| no_instance(&instance.instance_id))?;
            let labels = instance.labels.clone().into_iter().collect();
            preview.profile =
                crate::effective::desired_config(&self.store.current(), &labels).profile;
            preview.labels = instance.labels;
            return Ok(Response::new(preview));
        }
        // Written and flushed before the answer: on the blocking pool.
        let registry = self.registry.clone();
        let id = instance.instance_id.clone();
        let mut updated =
            blocking(move || registry.update_labels(&id, instance.labels, &caller.name))
                .await?
                .map_err(status)?
                .ok_or_else(|| no_instance(&instance.instance_id))?;
        // The profile the new labels match (its stream follows at once).
        if let Some(profile) =
            crate::effective::match_profile(&self.store.current(), &updated.labels)
        {
            updated.profile = profile.name.clone();
        }
        Ok(Response::new(updated))
    }

    async fn delete_instance(
        &self,
        request: Request<DeleteInstanceRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = super::writer(&request, "delete instances")?;
        let DeleteInstanceRequest {
            instance_id: id,
            validate_only,
        } = request.into_inner();
        if validate_only {
            let known =
                self.registry.peek(&id, |_| ()).is_some() || self.ca.grant_of(&id).is_some();
            return if known {
                Ok(Response::new(()))
            } else {
                Err(no_instance(&id))
            };
        }
        let registry = self.registry.clone();
        let target = id.clone();
        let ca = self.ca.clone();
        let existed = blocking(move || -> Result<bool, StoreError> {
            let known = registry.delete(&target)?;
            // Deleting revokes: its certificates no longer connect.
            let revoked = ca.revoke_instance(&target)?;
            Ok(known || revoked > 0)
        })
        .await?
        .map_err(status)?;
        if !existed {
            return Err(no_instance(&id));
        }
        tracing::info!(instance = %id, actor = %caller.name, "instance deleted");
        Ok(Response::new(()))
    }

    type WatchFleetStream = EventStream;

    async fn watch_fleet(
        &self,
        request: Request<WatchFleetRequest>,
    ) -> Result<Response<Self::WatchFleetStream>, Status> {
        caller(&request)?;
        let mut revisions = self.store.revision_events();
        let mut instance_events = self.registry.subscribe();
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(64);
        let current = self.store.current().revision;
        let first = match current {
            0 => None,
            revision => Some(self.store.revision_record(revision).map_err(status)?),
        };
        tokio::spawn(async move {
            // The current revision first, then changes as they commit.
            if let Some(record) = first
                && tx.send(Ok(revision_event(&record))).await.is_err()
            {
                return;
            }
            loop {
                let event = tokio::select! {
                    _ = shutdown.changed() => break,
                    _ = tx.closed() => break,
                    event = revisions.recv() => match event {
                        Ok(record) if record.revision <= current => continue,
                        Ok(record) => Ok(revision_event(&record)),
                        Err(lag) => Err(lag),
                    },
                    event = instance_events.recv() => event,
                };
                match event {
                    Ok(event) => {
                        if tx.send(Ok(event)).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            "a WatchFleet client fell behind; events were skipped"
                        );
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_fleet_health(
        &self,
        request: Request<GetFleetHealthRequest>,
    ) -> Result<Response<FleetHealth>, Status> {
        caller(&request)?;
        let selector = request.into_inner().selector.into_iter().collect();
        validate::selector("selector", &selector).map_err(|e| status(e.into()))?;
        Ok(Response::new(fleet_health::aggregate(
            &self.registry.list(&selector),
        )))
    }
}
