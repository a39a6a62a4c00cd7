//! Flags (the README's duofleet-agent table), each with its DUOFLEET_* variable.

use clap::{ArgAction, Parser, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeploymentKind {
    LinuxPackage,
    Helm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// duofleet-agent: applies duofleet's desired configuration to this GitLab
/// node (AI_GATEWAY_URL and reconfigure) and reports back.
#[derive(Debug, Parser)]
#[command(name = "duofleet-agent", version)]
pub struct Args {
    /// The duofleetd gRPC address; with several replicas, their addresses
    /// comma-separated (the agent fails over from one to the next), or one
    /// DNS name with several addresses.
    #[arg(
        long,
        env = "DUOFLEET_CONTROL_PLANE",
        default_value = "http://127.0.0.1:7700"
    )]
    pub control_plane: String,

    /// This instance's id in the fleet (default: the host name).
    #[arg(long, env = "DUOFLEET_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// Where the agent keeps what it applied.
    #[arg(
        long,
        env = "DUOFLEET_STATE_DIR",
        default_value = "/var/lib/duofleet-agent"
    )]
    pub state_dir: PathBuf,

    /// How GitLab is installed.
    #[arg(
        long,
        env = "DUOFLEET_DEPLOYMENT",
        value_enum,
        default_value = "linux-package"
    )]
    pub deployment: DeploymentKind,

    /// gitlab.rb to edit (Linux package).
    #[arg(
        long,
        env = "DUOFLEET_GITLAB_RB",
        default_value = "/etc/gitlab/gitlab.rb"
    )]
    pub gitlab_rb: PathBuf,

    /// Run after AI_GATEWAY_URL changes (Linux package), through sh -c.
    #[arg(
        long,
        env = "DUOFLEET_RECONFIGURE_COMMAND",
        default_value = "gitlab-ctl reconfigure"
    )]
    pub reconfigure_command: String,

    /// The agent-owned Helm values file (default: <state-dir>/duofleet-values.yaml).
    #[arg(long, env = "DUOFLEET_HELM_VALUES")]
    pub helm_values: Option<PathBuf>,

    /// Run after the values change (Helm); {values} becomes the values file's path.
    #[arg(long, env = "DUOFLEET_HELM_COMMAND")]
    pub helm_command: Option<String>,

    /// A label this instance reports, KEY=VALUE; repeatable. The control
    /// plane takes them at the instance's first registration, as far as its
    /// join token allows; afterwards operators set labels, and these are
    /// only shown as reported.
    #[arg(long = "label", env = "DUOFLEET_LABELS", value_delimiter = ',', value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// The control plane's enrollment token (DATA_DIR/enroll.token on duofleetd).
    #[arg(long, env = "DUOFLEET_ENROLL_TOKEN_FILE")]
    pub enroll_token_file: Option<PathBuf>,

    /// The CA (PEM) that signed duofleetd's TLS certificate, for an https
    /// --control-plane. The agent then enrolls with --enroll-token-file and
    /// connects with its own client certificate.
    #[arg(long, env = "DUOFLEET_CONTROL_PLANE_CA")]
    pub control_plane_ca: Option<PathBuf>,

    /// How often to check for hand edits (drift).
    #[arg(long, env = "DUOFLEET_HEALTH_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub health_interval: Duration,

    /// How long a reconfigure (or helm) run may take.
    #[arg(long, env = "DUOFLEET_RECONFIGURE_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub reconfigure_timeout: Duration,

    /// Put the desired configuration back when it was changed by hand.
    #[arg(long, env = "DUOFLEET_REPAIR_DRIFT", default_value_t = true, action = ArgAction::Set)]
    pub repair_drift: bool,

    /// First reconnect delay (then x1.6 with +-20 % jitter).
    #[arg(long, env = "DUOFLEET_BACKOFF_INITIAL", default_value = "1s", value_parser = parse_duration, hide = true)]
    pub backoff_initial: Duration,

    /// HTTP/2 keepalive ping interval to the control plane; a connection
    /// whose ping is not answered within the same time again is dropped and
    /// reconnected (a silent network partition is found within twice this).
    #[arg(long, env = "DUOFLEET_KEEPALIVE", default_value = "20s", value_parser = parse_duration, hide = true)]
    pub keepalive: Duration,

    /// Longest reconnect delay.
    #[arg(long, env = "DUOFLEET_BACKOFF_MAX", default_value = "120s", value_parser = parse_duration, hide = true)]
    pub backoff_max: Duration,

    /// GitLab's URL, for its GraphQL API (self-hosted models and feature settings).
    #[arg(long, env = "DUOFLEET_GITLAB_URL", default_value = "http://localhost")]
    pub gitlab_url: String,

    /// An administrator's personal access token (api scope). Without it,
    /// models and feature settings are not synced to GitLab.
    #[arg(long, env = "DUOFLEET_GITLAB_TOKEN_FILE")]
    pub gitlab_token_file: Option<PathBuf>,

    /// Also ask GitLab itself to check each model (GitLab 17.7+:
    /// GitLab -> AI gateway -> model), at most this often. Off by default:
    /// every check calls the model. Needs --gitlab-token-file.
    #[arg(long, env = "DUOFLEET_CONNECTION_CHECK_INTERVAL", value_parser = parse_duration)]
    pub connection_check_interval: Option<Duration>,

    /// How long one health probe may take.
    #[arg(long, env = "DUOFLEET_PROBE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub probe_timeout: Duration,

    /// Send unchanged health results this often (changes go at once).
    #[arg(long, env = "DUOFLEET_HEALTH_HEARTBEAT", default_value = "5m", value_parser = parse_duration)]
    pub health_heartbeat: Duration,

    /// Extra CA certificates (PEM) for endpoints behind a private CA.
    #[arg(long, env = "DUOFLEET_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,

    /// Log format on stderr.
    #[arg(long, env = "DUOFLEET_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,
}

fn parse_label(value: &str) -> Result<(String, String), String> {
    let (key, val) = value
        .split_once('=')
        .ok_or_else(|| format!("label {value:?} must be KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("label {value:?} has an empty key"));
    }
    Ok((key.to_string(), val.to_string()))
}

/// "500ms", "30s", "5m", "2h".
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 500ms, 30s, 5m or 2h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "{value:?} is not a duration like 500ms, 30s, 5m or 2h"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn labels_from_flags_and_env_form() {
        let args = Args::try_parse_from([
            "duofleet-agent",
            "--label",
            "ring=canary",
            "--label",
            "region=eu,tier=gold",
        ])
        .unwrap();
        assert_eq!(
            args.labels,
            [
                ("ring".into(), "canary".into()),
                ("region".into(), "eu".into()),
                ("tier".into(), "gold".into())
            ]
        );
        assert!(Args::try_parse_from(["duofleet-agent", "--label", "novalue"]).is_err());
    }
}
