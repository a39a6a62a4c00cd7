//! Start-up: flags, logging, state, then the session until a signal or a
//! final refusal.

use crate::apply::{Applier, Target};
use crate::args::{Args, DeploymentKind, LogFormat};
use crate::gitlab::GitLab;
use crate::health::Prober;
use crate::identity::AgentIdentity;
use crate::session::{Backoff, ConnectionCheck, Endpoints, Session};
use crate::state::{self, StateFile};
use clap::Parser;
use duofleet_proto::v1::{Deployment, GitLabSync, Hello};
use std::io::IsTerminal;
use std::process::ExitCode;

pub fn main() -> ExitCode {
    let args = Args::parse();
    // reqwest is built without a default crypto provider: install ring's.
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(message),
    }
}

fn fail(message: String) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("duofleet-agent: {message}");
    ExitCode::FAILURE
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DUOFLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Human => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: Args) -> Result<(), String> {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let instance_id = args.instance_id.clone().unwrap_or_else(|| hostname.clone());
    if instance_id.is_empty() {
        return Err("no instance id: pass --instance-id".into());
    }
    std::fs::create_dir_all(&args.state_dir).map_err(|e| {
        format!(
            "cannot create the state dir {}: {e}",
            args.state_dir.display()
        )
    })?;
    let token = match &args.enroll_token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the enroll token {}: {e}", path.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let target = match args.deployment {
        DeploymentKind::LinuxPackage => Target::LinuxPackage {
            gitlab_rb: args.gitlab_rb.clone(),
            reconfigure_command: args.reconfigure_command.clone(),
        },
        DeploymentKind::Helm => Target::Helm {
            values: args.helm_values.clone().unwrap_or_else(|| args.state_dir.join("duofleet-values.yaml")),
            helm_command: args
                .helm_command
                .clone()
                .ok_or("--helm-command is required with --deployment helm, e.g. 'helm upgrade gitlab gitlab/gitlab --reuse-values -f {values}'")?,
        },
    };
    let (gitlab, gitlab_sync, gitlab_version) = gitlab_sync(&args).await?;
    let endpoints = Endpoints::parse(&args.control_plane, &instance_id)?;
    let identity = if endpoints.https() {
        let path = args
            .control_plane_ca
            .as_ref()
            .ok_or("an https --control-plane needs --control-plane-ca (the CA that signed duofleetd's certificate)")?;
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read --control-plane-ca {}: {e}", path.display()))?;
        Some(AgentIdentity::new(
            args.state_dir.clone(),
            instance_id.clone(),
            pem,
            token.clone(),
        ))
    } else {
        None
    };
    // One agent per state dir: two would run overlapping reconfigures.
    let lock_path = args.state_dir.join("agent.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    lock.try_lock().map_err(|_| {
        format!(
            "another duofleet-agent is running with the state dir {}",
            args.state_dir.display()
        )
    })?;
    let run_record = args.state_dir.join("reconfigure.pid");
    if let Some(group) = crate::command::reap_orphan(&run_record).await {
        tracing::warn!(
            process_group = group,
            "stopped a reconfigure that a previous agent left running"
        );
    }
    let state_file = StateFile::new(&args.state_dir);
    let state = state_file.load().map_err(|e| e.to_string())?;
    let hello = Hello {
        instance_id: instance_id.clone(),
        hostname,
        deployment: match args.deployment {
            DeploymentKind::LinuxPackage => Deployment::LinuxPackage,
            DeploymentKind::Helm => Deployment::Helm,
        } as i32,
        labels: args.labels.iter().cloned().collect(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        gitlab_version,
        applied_revision: state.applied_revision,
        applied_digest: state.applied_digest.clone(),
        gitlab_sync: Some(gitlab_sync),
    };
    tracing::info!(instance = %instance_id, control_plane = %endpoints.list(), applied_revision = state.applied_revision, "duofleet-agent starting");
    let connection_check = match (args.connection_check_interval, &gitlab) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(
                "--connection-check-interval needs --gitlab-token-file: GitLab runs the check"
                    .into(),
            );
        }
        (Some(interval), Some(gitlab)) => Some(ConnectionCheck {
            gitlab: gitlab.clone(),
            interval,
            last: None,
            running: false,
            results: Vec::new(),
        }),
    };
    let gitlab_version_seen = duofleet_proto::GitLabVersion::parse(&hello.gitlab_version);
    let session = Session {
        endpoints,
        token,
        hello,
        applier: Applier {
            target,
            timeout: args.reconfigure_timeout,
            state_file,
            state,
            gitlab,
            gitlab_version: gitlab_version_seen,
            gitlab_unreachable: false,
            run_record,
        },
        check_interval: args.health_interval,
        repair_drift: args.repair_drift,
        backoff: Backoff::new(args.backoff_initial, args.backoff_max),
        keepalive: args.keepalive,
        failed: None,
        prober: Prober::new(args.probe_timeout, args.ca_bundle.as_deref())?,
        heartbeat: args.health_heartbeat,
        current: state::load_desired(&args.state_dir),
        state_dir: args.state_dir.clone(),
        identity,
        connection_check,
        api_retry: None,
        window_opens: None,
    };
    // A run a crash interrupted is finished now, from the last desired
    // configuration on disk, without waiting for the control plane.
    let mut session = session;
    if let (Some(pending), Some(desired)) = (
        session.applier.state.pending.clone(),
        session.current.clone(),
    ) {
        tracing::warn!(url = %pending.url, revision = desired.revision, "a previous run was interrupted; finishing it from the last desired configuration");
        let ack = session.applier.apply(&desired).await;
        tracing::info!(revision = ack.revision, result = ?ack.result(), error = %ack.error, "interrupted run finished");
    }
    let _lock = lock;
    tokio::select! {
        result = session.run() => result.map_err(|refused| refused.to_string()),
        signal = shutdown_signal() => {
            tracing::info!(signal, "stopping");
            Ok(())
        }
    }
}

/// The GitLab API client when --gitlab-token-file is given, the status to
/// report, and GitLab's version when it answers now.
async fn gitlab_sync(args: &Args) -> Result<(Option<GitLab>, GitLabSync, String), String> {
    let Some(path) = &args.gitlab_token_file else {
        tracing::warn!(
            "GitLab API sync is off (no --gitlab-token-file): self-hosted models and feature settings are not applied"
        );
        let status = GitLabSync {
            enabled: false,
            detail: "off: no --gitlab-token-file".into(),
            ..Default::default()
        };
        return Ok((None, status, String::new()));
    };
    let token = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the GitLab token {}: {e}", path.display()))?
        .trim()
        .to_string();
    let key = state::digest_key(&args.state_dir)
        .map_err(|e| format!("cannot make the digest key: {e}"))?;
    let gitlab = GitLab::new(&args.gitlab_url, token, key, GitLab::client()?);
    let version = match tokio::time::timeout(std::time::Duration::from_secs(10), gitlab.version())
        .await
    {
        Ok(Ok(version)) => version,
        Ok(Err(error)) => {
            tracing::warn!(%error, "GitLab did not tell its version; will try again on each sync");
            String::new()
        }
        Err(_) => String::new(),
    };
    tracing::info!(gitlab_url = %args.gitlab_url, %version, "GitLab API sync is on");
    let status = GitLabSync {
        enabled: true,
        detail: format!("on: {}", args.gitlab_url),
        ..Default::default()
    };
    Ok((Some(gitlab), status, version))
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
