//! The connection to duofleetd: Hello, then DesiredConfigs in and acks out,
//! reconnecting with gRPC's backoff schedule (1 s, x1.6, +-20 % jitter,
//! capped) while the node keeps running on what was last applied.
//! UNAUTHENTICATED and PERMISSION_DENIED are final.

use crate::apply::{Applier, Drift};
use crate::gitlab::GitLab;
use crate::health::{self, Prober};
use crate::identity::{AgentIdentity, IdentityError};
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::agent_service_client::AgentServiceClient;
use duofleet_proto::v1::control_message;
use duofleet_proto::v1::{
    AckResult, AgentMessage, DesiredConfig, DriftReport, EndpointHealth, HealthReport, Hello,
};
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Status, Streaming};

pub struct Session {
    /// The control plane's replicas (--control-plane): one is used at a
    /// time; when it fails the agent moves on to the next.
    pub endpoints: Endpoints,
    pub token: Option<String>,
    pub hello: Hello,
    pub applier: Applier,
    pub check_interval: Duration,
    pub repair_drift: bool,
    pub backoff: Backoff,
    /// HTTP/2 keepalive interval and timeout (--keepalive).
    pub keepalive: Duration,
    /// The last config that failed, and gitlab.rb as it was then: when an
    /// administrator fixes the file, the agent tries again by itself.
    pub failed: Option<(DesiredConfig, Option<String>)>,
    pub prober: Prober,
    /// Unchanged health results are sent this often.
    pub heartbeat: Duration,
    /// The newest desired config, whose targets are probed.
    pub current: Option<DesiredConfig>,
    pub state_dir: PathBuf,
    /// The client certificate, when the control plane is https.
    pub identity: Option<AgentIdentity>,
    /// GitLab's own connection check, when asked for.
    pub connection_check: Option<ConnectionCheck>,
    /// A config whose API sync could not reach GitLab (e.g. while Puma
    /// restarts after a reconfigure): when to try again, and the delay
    /// after that (doubling, up to 10 minutes).
    pub api_retry: Option<(DesiredConfig, Instant, Duration)>,
    /// A host change waits for the reconfigure window: when it opens.
    pub window_opens: Option<jiff::Timestamp>,
}

/// GitLab's own check of each model (--connection-check-interval): it calls
/// the model, so it runs at most once per interval and never overlaps.
pub struct ConnectionCheck {
    pub gitlab: GitLab,
    pub interval: Duration,
    pub last: Option<Instant>,
    pub running: bool,
    /// The latest results, sent with every health report.
    pub results: Vec<EndpointHealth>,
}

/// The control plane's replicas, in the order given, and the one in use.
#[derive(Debug, Clone)]
pub struct Endpoints {
    urls: Vec<String>,
    current: usize,
}

impl Endpoints {
    /// Parses --control-plane: one URL or several, comma-separated, all
    /// http:// or all https://. Agents start on different replicas (by
    /// instance id), so that a fleet spreads over them.
    pub fn parse(list: &str, instance_id: &str) -> Result<Endpoints, String> {
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if urls.is_empty() {
            return Err("--control-plane: give at least one duofleetd URL".into());
        }
        for url in &urls {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(format!(
                    "--control-plane: {url:?} is not an http:// or https:// URL"
                ));
            }
        }
        let https = urls[0].starts_with("https://");
        if urls.iter().any(|u| u.starts_with("https://") != https) {
            return Err(
                "--control-plane: mixes http:// and https:// URLs; every replica serves the same scheme"
                    .into(),
            );
        }
        let spread = instance_id
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        Ok(Endpoints {
            current: spread % urls.len(),
            urls,
        })
    }

    pub fn https(&self) -> bool {
        self.urls[0].starts_with("https://")
    }

    pub fn len(&self) -> usize {
        self.urls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.urls.is_empty()
    }

    pub fn current(&self) -> &str {
        &self.urls[self.current]
    }

    pub fn advance(&mut self) {
        self.current = (self.current + 1) % self.urls.len();
    }

    /// For logs: every URL, comma-separated.
    pub fn list(&self) -> String {
        self.urls.join(",")
    }
}

/// Why the agent stops for good.
#[derive(Debug, thiserror::Error)]
#[error(
    "the control plane refused this agent ({code:?}: {message}); check --enroll-token-file and the instance id"
)]
pub struct Refused {
    pub code: Code,
    pub message: String,
}

enum Ended {
    /// The stream ended or failed: reconnect.
    Retry(String),
    /// The control plane is shutting down and said when to come back.
    Restarting(String, Duration),
    /// The control plane refused a message of this agent as malformed, or
    /// another host holds this instance id: no quick retry will change
    /// that. Reconnect after the longest backoff.
    Invalid(String),
    Refused(Refused),
}

impl Session {
    pub async fn run(mut self) -> Result<(), Refused> {
        loop {
            match self.connect_once().await {
                Ended::Refused(refused) => return Err(refused),
                Ended::Retry(reason) => {
                    let delay = self.backoff.next_delay();
                    tracing::warn!(%reason, retry_in = ?delay, "control plane unavailable; keeping the last applied configuration");
                    tokio::time::sleep(delay).await;
                }
                Ended::Restarting(reason, after) => {
                    let delay = self.backoff.hinted(after);
                    tracing::info!(%reason, retry_in = ?delay, "the control plane is restarting");
                    tokio::time::sleep(delay).await;
                }
                Ended::Invalid(reason) => {
                    let delay = self.backoff.longest();
                    tracing::error!(%reason, retry_in = ?delay, "the control plane refused this agent until an operator acts; keeping the last applied configuration");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// A connection to the first replica that answers, starting with the
    /// current one; an error when none does.
    async fn channel(&mut self) -> Result<(tonic::transport::Channel, String), Ended> {
        let mut failures = Vec::new();
        for _ in 0..self.endpoints.len() {
            let url = self.endpoints.current().to_string();
            match self.connect_to(&url).await {
                Ok(channel) => return Ok((channel, url)),
                Err(Ended::Retry(reason)) => {
                    if self.endpoints.len() > 1 {
                        tracing::warn!(endpoint = %url, %reason, "control plane replica unavailable; trying the next");
                    }
                    failures.push(reason);
                    self.endpoints.advance();
                }
                Err(other) => return Err(other),
            }
        }
        Err(Ended::Retry(failures.join("; ")))
    }

    async fn connect_to(&mut self, url: &str) -> Result<tonic::transport::Channel, Ended> {
        let endpoint = match Endpoint::from_shared(url.to_string()) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(self.keepalive)
                .keep_alive_timeout(self.keepalive)
                .keep_alive_while_idle(true),
            Err(e) => {
                return Err(Ended::Refused(Refused {
                    code: Code::InvalidArgument,
                    message: format!("bad --control-plane {url}: {e}"),
                }));
            }
        };
        let endpoint = match &self.identity {
            None => endpoint,
            Some(identity) => match identity.client_tls(&endpoint).await {
                Ok(tls) => match endpoint.tls_config(tls) {
                    Ok(endpoint) => endpoint,
                    Err(e) => return Err(Ended::Retry(format!("TLS settings: {e}"))),
                },
                Err(IdentityError::Refused(status)) => return Err(classify(status)),
                Err(IdentityError::Retry(reason)) => return Err(Ended::Retry(reason)),
            },
        };
        endpoint
            .connect()
            .await
            .map_err(|e| Ended::Retry(format!("cannot connect to {url}: {e}")))
    }

    async fn connect_once(&mut self) -> Ended {
        let (channel, url) = match self.channel().await {
            Ok(connected) => connected,
            Err(ended) => return ended,
        };
        let ended = self.stream(channel, &url).await;
        // A replica that ended the stream (it is stopping, or died) is
        // tried last next time.
        if matches!(ended, Ended::Retry(_) | Ended::Restarting(..)) {
            self.endpoints.advance();
        }
        ended
    }

    async fn stream(&mut self, channel: tonic::transport::Channel, url: &str) -> Ended {
        let mut client = AgentServiceClient::new(channel.clone());
        let (outbound, rx) = mpsc::channel(16);
        let mut hello = self.hello.clone();
        hello.applied_revision = self.applier.state.applied_revision;
        hello.applied_digest = self.applier.state.applied_digest.clone();
        let _ = outbound
            .send(AgentMessage {
                message: Some(Message::Hello(hello)),
            })
            .await;
        let mut request = Request::new(ReceiverStream::new(rx));
        // On TLS the certificate is the identity; the token only enrolls.
        if let Some(token) = self.token.as_ref().filter(|_| self.identity.is_none()) {
            match format!("Bearer {token}").parse() {
                Ok(value) => {
                    request.metadata_mut().insert("authorization", value);
                }
                Err(_) => {
                    return Ended::Refused(Refused {
                        code: Code::Unauthenticated,
                        message: "the enroll token is not valid ASCII".into(),
                    });
                }
            }
        }
        let mut inbound = match client.connect(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return classify(status),
        };
        tracing::info!(endpoint = %url, applied_revision = self.applier.state.applied_revision, "connected to the control plane");
        self.backoff.reset();
        let mut ticker = tokio::time::interval(self.check_interval);
        ticker.tick().await;
        let (probe_tx, mut probe_rx) = mpsc::channel::<Vec<EndpointHealth>>(1);
        let (check_tx, mut check_rx) = mpsc::channel::<Vec<EndpointHealth>>(1);
        if let Some(check) = &mut self.connection_check {
            check.running = false;
        }
        let mut probing = false;
        let mut last_report: Option<(health::Signature, Instant)> = None;
        loop {
            tokio::select! {
                Some(results) = check_rx.recv() => {
                    if let Some(check) = &mut self.connection_check {
                        check.running = false;
                        check.results = results;
                    }
                }
                Some(mut results) = probe_rx.recv() => {
                    probing = false;
                    if let Some(check) = &self.connection_check {
                        results.extend(check.results.iter().cloned());
                    }
                    let signature = health::signature(&results);
                    let due = match &last_report {
                        Some((last, at)) => *last != signature || at.elapsed() >= self.heartbeat,
                        None => true,
                    };
                    if due {
                        last_report = Some((signature, Instant::now()));
                        if let Err(ended) = send(&outbound, Message::HealthReport(crate::limits::health(HealthReport { results }))).await {
                            return ended;
                        }
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(message)) => {
                        if let Some(control_message::Message::DesiredConfig(desired)) = message.message
                            && let Err(ended) = self.apply_latest(desired, &mut inbound, &outbound).await
                        {
                            return ended;
                        }
                    }
                    Ok(None) => return Ended::Retry("the control plane closed the stream".into()),
                    Err(status) => return classify(status),
                },
                _ = ticker.tick() => {
                    if let Err(ended) = self.check_drift(&outbound).await {
                        return ended;
                    }
                    if let Some(identity) = &self.identity
                        && identity.renewal_due()
                    {
                        match identity.renew(channel.clone()).await {
                            Ok(()) => {}
                            Err(IdentityError::Refused(status)) => return classify(status),
                            Err(IdentityError::Retry(reason)) => tracing::warn!(%reason, "certificate renewal failed; will try again"),
                        }
                    }
                    if let (Some(check), Some(desired)) = (&mut self.connection_check, &self.current)
                        && !check.running
                        && check.last.is_none_or(|at| at.elapsed() >= check.interval)
                    {
                        check.running = true;
                        check.last = Some(Instant::now());
                        let gitlab = check.gitlab.clone();
                        let desired = desired.clone();
                        let tx = check_tx.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(gitlab.connection_checks(&desired).await).await;
                        });
                    }
                    if !probing && let Some(desired) = self.current.clone() {
                        probing = true;
                        let prober = self.prober.clone();
                        let tx = probe_tx.clone();
                        let jitter = self.check_interval.mul_f64(jitter_fraction() * 0.1);
                        tokio::spawn(async move {
                            tokio::time::sleep(jitter).await;
                            let _ = tx.send(prober.probe_all(&desired).await).await;
                        });
                    }
                }
            }
        }
    }

    /// Applies `desired`, then whatever arrived meanwhile, newest only: a
    /// burst of updates during a reconfigure makes one follow-up run.
    async fn apply_latest(
        &mut self,
        mut desired: DesiredConfig,
        inbound: &mut Streaming<duofleet_proto::v1::ControlMessage>,
        outbound: &mpsc::Sender<AgentMessage>,
    ) -> Result<(), Ended> {
        loop {
            self.apply_and_ack(desired, outbound).await?;
            let mut newer = None;
            while let Ok(next) = tokio::time::timeout(Duration::ZERO, inbound.message()).await {
                match next {
                    Ok(Some(message)) => {
                        if let Some(control_message::Message::DesiredConfig(d)) = message.message {
                            newer = Some(d);
                        }
                    }
                    Ok(None) => {
                        return Err(Ended::Retry("the control plane closed the stream".into()));
                    }
                    Err(status) => return Err(classify(status)),
                }
            }
            match newer {
                Some(next) => desired = next,
                None => return Ok(()),
            }
        }
    }

    async fn apply_and_ack(
        &mut self,
        desired: DesiredConfig,
        outbound: &mpsc::Sender<AgentMessage>,
    ) -> Result<(), Ended> {
        tracing::info!(revision = desired.revision, profile = %desired.profile, "applying desired config");
        if let Err(error) = crate::state::save_desired(&self.state_dir, &desired) {
            tracing::warn!(%error, "cannot keep the desired config for health probes");
        }
        self.current = Some(desired.clone());
        let ack = self.applier.apply(&desired).await;
        tracing::info!(revision = ack.revision, result = ?ack.result(), "applied");
        let failed = ack.result() == AckResult::Failed;
        // Only the API layer is tried again: a failed host step waits for
        // an edit of gitlab.rb, so that reconfigure never runs in a loop.
        let host_ok = ack.host_sync.as_ref().is_some_and(|h| h.error.is_empty());
        self.api_retry = if failed && host_ok && self.applier.gitlab_unreachable {
            let delay = match &self.api_retry {
                Some((previous, _, delay)) if previous.revision == desired.revision => {
                    (*delay * 2).min(Duration::from_secs(600))
                }
                _ => self.check_interval.max(Duration::from_secs(1)),
            };
            tracing::info!(retry_in = ?delay, "GitLab's API could not be reached; will try again");
            Some((desired.clone(), Instant::now() + delay, delay))
        } else {
            None
        };
        self.window_opens = ack
            .host_sync
            .as_ref()
            .and_then(|h| h.waiting_until.as_ref())
            .map(duofleet_proto::window::timestamp);
        self.failed = failed.then(|| (desired, self.applier.watched_file()));
        send(outbound, Message::Ack(crate::limits::ack(ack))).await
    }

    /// Periodic: retry a failed config once its file was edited, then look
    /// for hand edits of what was applied.
    async fn check_drift(&mut self, outbound: &mpsc::Sender<AgentMessage>) -> Result<(), Ended> {
        if let (Some(opens), Some(desired)) = (self.window_opens, &self.current)
            && jiff::Timestamp::now() >= opens
        {
            let desired = desired.clone();
            tracing::info!(
                revision = desired.revision,
                "the reconfigure window is open"
            );
            return self.apply_and_ack(desired, outbound).await;
        }
        if let Some((desired, at, _)) = &self.api_retry
            && Instant::now() >= *at
        {
            let desired = desired.clone();
            tracing::info!(
                revision = desired.revision,
                "trying the GitLab API sync again"
            );
            return self.apply_and_ack(desired, outbound).await;
        }
        if let Some((desired, Some(seen))) = &self.failed
            && self.applier.watched_file().as_ref() != Some(seen)
        {
            tracing::info!(
                revision = desired.revision,
                "the file changed since the failure; trying again"
            );
            let desired = desired.clone();
            return self.apply_and_ack(desired, outbound).await;
        }
        let Drift::Found(detail) = self.applier.check_drift() else {
            return Ok(());
        };
        // A repair reconfigures too: only inside the window.
        let closed = self
            .current
            .as_ref()
            .and_then(|d| crate::apply::closed_until(d, jiff::Timestamp::now()));
        let repairing = self.repair_drift && closed.is_none();
        let detail = match &closed {
            Some((opens, window)) if self.repair_drift => {
                format!(
                    "{detail}; the repair waits for the reconfigure window ({window}), which opens at {opens}"
                )
            }
            _ => detail,
        };
        tracing::warn!(%detail, repairing, "drift");
        let report = DriftReport {
            revision: self.applier.state.applied_revision,
            detail,
            repairing,
        };
        send(outbound, Message::DriftReport(report)).await?;
        if repairing {
            let ack = self.applier.repair().await;
            if ack.result() == AckResult::Failed {
                tracing::warn!(error = %ack.error, "drift repair failed");
            }
            send(outbound, Message::Ack(crate::limits::ack(ack))).await?;
        }
        Ok(())
    }
}

async fn send(outbound: &mpsc::Sender<AgentMessage>, message: Message) -> Result<(), Ended> {
    outbound
        .send(AgentMessage {
            message: Some(message),
        })
        .await
        .map_err(|_| Ended::Retry("the stream to the control plane closed".into()))
}

fn classify(status: Status) -> Ended {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => Ended::Refused(Refused {
            code: status.code(),
            message: status.message().to_string(),
        }),
        // A malformed message, or an id another host holds: a quick retry
        // changes nothing.
        Code::InvalidArgument | Code::AlreadyExists => {
            Ended::Invalid(format!("{:?}: {}", status.code(), status.message()))
        }
        _ => {
            let reason = format!("{:?}: {}", status.code(), status.message());
            match reconnect_after(&status) {
                Some(after) => Ended::Restarting(reason, after),
                None => Ended::Retry(reason),
            }
        }
    }
}

/// When a control plane that is shutting down asks to be reconnected to
/// (at most 5 minutes, whatever it says).
pub fn reconnect_after(status: &Status) -> Option<Duration> {
    let ms: u64 = status
        .metadata()
        .get(duofleet_proto::RECONNECT_AFTER_MS)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms.min(300_000)))
}

/// A random number in [0, 1].
fn jitter_fraction() -> f64 {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    byte[0] as f64 / 255.0
}

/// gRPC's connection backoff: 1 s, x1.6, +-20 % jitter, capped.
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
    /// Quick retries left after a restart hint.
    quick: u32,
}

/// After the control plane's restart hint, while it is not back yet: a
/// retry this often (+-20 %), up to `RESTART_RETRIES` times (about 5 s),
/// then the usual schedule. A refused connection costs the daemon
/// nothing, and agents that wait longer only queue up for later.
const RESTART_RETRY: Duration = Duration::from_millis(200);
const RESTART_RETRIES: u32 = 25;

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            current: initial,
            quick: 0,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
        self.quick = 0;
    }

    /// The cap, for failures that a quick retry cannot mend.
    pub fn longest(&mut self) -> Duration {
        self.current = self.max;
        self.max
    }

    /// The control plane said when to come back: then, and if it is not
    /// back yet, every 200 ms for about 5 s, then as usual from the
    /// initial delay.
    pub fn hinted(&mut self, after: Duration) -> Duration {
        self.current = self.initial;
        self.quick = RESTART_RETRIES;
        after
    }

    pub fn next_delay(&mut self) -> Duration {
        let jitter = 0.8 + 0.4 * jitter_fraction();
        if self.quick > 0 {
            self.quick -= 1;
            return RESTART_RETRY.mul_f64(jitter);
        }
        let delay = self.current.mul_f64(jitter);
        self.current = self.current.mul_f64(1.6).min(self.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_lists_spread_agents_and_fail_over_in_turn() {
        let one = Endpoints::parse("http://cp:7700", "gitlab-1").unwrap();
        assert_eq!((one.len(), one.current()), (1, "http://cp:7700"));
        let list = "https://a:7700, https://b:7700,https://c:7700";
        let starts: std::collections::BTreeSet<String> = (0..30)
            .map(|i| {
                Endpoints::parse(list, &format!("gitlab-{i}"))
                    .unwrap()
                    .current()
                    .to_string()
            })
            .collect();
        assert_eq!(starts.len(), 3, "agents start on every replica");
        let mut endpoints = Endpoints::parse(list, "gitlab-1").unwrap();
        assert!(endpoints.https());
        let first = endpoints.current().to_string();
        let mut seen = vec![first.clone()];
        for _ in 0..3 {
            endpoints.advance();
            seen.push(endpoints.current().to_string());
        }
        assert_eq!(seen[3], first, "after every replica, the first again");
        assert_eq!(
            seen[..3]
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3
        );
        for (bad, says) in [
            ("", "at least one"),
            ("cp:7700", "not an http:// or https:// URL"),
            ("http://a:7700,https://b:7700", "mixes http:// and https://"),
        ] {
            let error = Endpoints::parse(bad, "x").unwrap_err();
            assert!(
                error.starts_with("--control-plane") && error.contains(says),
                "{error}"
            );
        }
    }

    #[test]
    fn a_restarting_control_plane_says_when_to_come_back() {
        let mut status = Status::unavailable("duofleetd is shutting down");
        assert!(matches!(classify(status.clone()), Ended::Retry(_)));
        status
            .metadata_mut()
            .insert(duofleet_proto::RECONNECT_AFTER_MS, "1250".parse().unwrap());
        let Ended::Restarting(_, after) = classify(status) else {
            panic!("the hint was not read");
        };
        assert_eq!(after, Duration::from_millis(1250));

        // The hint, then quick retries (200 ms +-20 %) for about 5 s while
        // the daemon restarts, then the usual schedule from 1 s.
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));
        for _ in 0..5 {
            backoff.next_delay();
        }
        assert_eq!(backoff.hinted(after), after);
        let quick: Vec<f64> = (0..RESTART_RETRIES)
            .map(|_| backoff.next_delay().as_secs_f64())
            .collect();
        assert!(quick.iter().all(|d| (0.16..=0.24).contains(d)), "{quick:?}");
        let total: f64 = quick.iter().sum();
        assert!((4.0..=6.0).contains(&total), "{total}");
        let next = backoff.next_delay().as_secs_f64();
        assert!((0.8..=1.2).contains(&next), "{next}");
        // Connected again: a later failure starts from 1 s, not quickly.
        backoff.hinted(after);
        backoff.reset();
        assert!(backoff.next_delay() >= Duration::from_millis(800));
    }

    #[test]
    fn backoff_follows_grpc_schedule_within_jitter() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(120));
        let mut expected = 1.0f64;
        for _ in 0..20 {
            let got = backoff.next_delay().as_secs_f64();
            assert!(
                got >= expected * 0.8 - 1e-9 && got <= expected * 1.2 + 1e-9,
                "{got} vs {expected}"
            );
            expected = (expected * 1.6).min(120.0);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(1200));
    }
}
