use super::{blocking, caller, status, writer};
use crate::rollout::Rollouts;
use duofleet_proto::v1::rollout_service_server::RolloutService;
use duofleet_proto::v1::{
    AbortRolloutRequest, GetRolloutRequest, ListRolloutsRequest, ListRolloutsResponse,
    PauseRolloutRequest, ResumeRolloutRequest, Rollout, RolloutState, WatchRolloutRequest,
};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

pub struct RolloutApi {
    rollouts: Arc<Rollouts>,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl RolloutApi {
    pub fn new(rollouts: Arc<Rollouts>, shutdown: tokio::sync::watch::Receiver<bool>) -> Self {
        RolloutApi { rollouts, shutdown }
    }
}

type RolloutStream = Pin<Box<dyn Stream<Item = Result<Rollout, Status>> + Send>>;

fn ended(rollout: &Rollout) -> bool {
    matches!(
        rollout.state(),
        RolloutState::Succeeded | RolloutState::Aborted
    )
}

#[tonic::async_trait]
impl RolloutService for RolloutApi {
    async fn get_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        caller(&request)?;
        let rollouts = self.rollouts.clone();
        let id = request.into_inner().id;
        blocking(move || rollouts.get_fresh(&id))
            .await?
            .map(Response::new)
            .map_err(status)
    }

    async fn list_rollouts(
        &self,
        request: Request<ListRolloutsRequest>,
    ) -> Result<Response<ListRolloutsResponse>, Status> {
        caller(&request)?;
        Ok(Response::new(ListRolloutsResponse {
            rollouts: self.rollouts.list(),
        }))
    }

    type WatchRolloutStream = RolloutStream;

    async fn watch_rollout(
        &self,
        request: Request<WatchRolloutRequest>,
    ) -> Result<Response<RolloutStream>, Status> {
        caller(&request)?;
        let id = request.into_inner().id;
        let mut updates = self.rollouts.subscribe();
        let first = self.rollouts.get(&id).map_err(status)?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let shutdown = crate::server::wait_for(self.shutdown.clone());
        tokio::spawn(async move {
            let mut done = ended(&first);
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            tokio::pin!(shutdown);
            while !done {
                let update = tokio::select! {
                    () = &mut shutdown => {
                        let _ = tx
                            .send(Err(Status::unavailable(
                                "duofleetd is shutting down; watch again once it is back",
                            )))
                            .await;
                        return;
                    }
                    update = updates.recv() => update,
                };
                match update {
                    Ok(rollout) if rollout.id == id => {
                        done = ended(&rollout);
                        if tx.send(Ok(rollout)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn pause_rollout(
        &self,
        request: Request<PauseRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        let who = writer(&request, "pause rollouts")?;
        let PauseRolloutRequest { id, reason } = request.into_inner();
        let reason = if reason.is_empty() {
            format!("paused by {}", who.name)
        } else {
            format!("paused by {}: {reason}", who.name)
        };
        let rollouts = self.rollouts.clone();
        blocking(move || rollouts.pause(&id, &reason))
            .await?
            .map(Response::new)
            .map_err(status)
    }

    async fn resume_rollout(
        &self,
        request: Request<ResumeRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        writer(&request, "resume rollouts")?;
        let id = request.into_inner().id;
        let rollouts = self.rollouts.clone();
        blocking(move || rollouts.resume(&id))
            .await?
            .map(Response::new)
            .map_err(status)
    }

    async fn abort_rollout(
        &self,
        request: Request<AbortRolloutRequest>,
    ) -> Result<Response<Rollout>, Status> {
        let who = writer(&request, "abort rollouts")?;
        let id = request.into_inner().id;
        let rollouts = self.rollouts.clone();
        blocking(move || rollouts.abort(&id, &who.name))
            .await?
            .map(Response::new)
            .map_err(status)
    }
}
