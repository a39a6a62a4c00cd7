//! duofleetctl: the operator's command line for a duofleet control plane.
//!
//! Exit codes: 0 done; 1 a negative answer (`diff` found differences,
//! `status --check` found instances in trouble, `watch --until-synced` saw
//! one FAILED); 2 `watch --until-synced` timed out, or the command line was
//! wrong; 3 an error (refused, unreachable, a bad file).

mod change;
mod file;
mod read;
mod rollout;
mod table;
mod view;
mod watch;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use duofleet_control_plane::client::{self, Clients, TlsFiles};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "duofleetctl",
    version,
    about = "Operate a duofleet control plane: models, profiles, instances and their health",
    after_help = "The token is read from --token-file, DUOFLEET_TOKEN_FILE, DUOFLEET_TOKEN, or ./duofleet-data/admin.token, never from the command line.\nExit codes: 0 done; 1 differences (diff), instances in trouble (status --check) or one FAILED (watch --until-synced); 2 timeout (watch) or a bad command line; 3 an error."
)]
struct Cli {
    #[command(flatten)]
    connection: Connection,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Connection {
    /// duofleetd's gRPC address (host:port, or an https:// URL).
    #[arg(
        long,
        env = "DUOFLEET_SERVER",
        default_value = "127.0.0.1:7700",
        global = true
    )]
    server: String,
    /// A file holding the operator token (default: DUOFLEET_TOKEN_FILE,
    /// then DUOFLEET_TOKEN, then ./duofleet-data/admin.token).
    #[arg(long, global = true, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// The CA certificate that signed duofleetd's TLS certificate.
    #[arg(long, global = true, value_name = "PATH")]
    cacert: Option<PathBuf>,
    /// A client certificate, for mutual TLS.
    #[arg(long, global = true, value_name = "PATH", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's key.
    #[arg(long, global = true, value_name = "PATH", requires = "cert")]
    key: Option<PathBuf>,
    /// Plaintext even to an address that is not loopback (loopback is
    /// plaintext unless TLS files are given).
    #[arg(long, global = true)]
    plaintext: bool,
    /// How long a call may go unanswered before duofleetctl gives up
    /// (exit 3): a duofleetd that accepts connections but does not answer
    /// never hangs a script. A watch's events may take longer.
    #[arg(
        long,
        env = "DUOFLEET_REQUEST_TIMEOUT",
        default_value = "2m",
        value_parser = parse_duration,
        global = true
    )]
    request_timeout: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Wide,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// List models, profiles, instances, revisions or tokens.
    Get {
        #[arg(value_enum)]
        kind: Kind,
        /// Only instances with these labels (instances only; repeatable).
        #[arg(short = 'l', long = "selector", value_name = "KEY=VALUE")]
        selector: Vec<String>,
    },
    /// Everything about one model, profile or instance.
    Describe {
        #[arg(value_enum)]
        kind: One,
        name: String,
    },
    /// One line per instance, then a summary.
    Status {
        /// Exit 1 when any instance is FAILED, DRIFTED or OFFLINE.
        #[arg(long)]
        check: bool,
        #[arg(short = 'l', long = "selector", value_name = "KEY=VALUE")]
        selector: Vec<String>,
    },
    /// Make the configuration equal to a file (or a directory of them), as
    /// one revision.
    Apply {
        #[arg(short = 'f', long = "filename", value_name = "FILE|DIR")]
        file: PathBuf,
        /// Validate on the server and show what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Delete models and profiles that are not in the file.
        #[arg(long)]
        prune: bool,
        /// Apply even if the configuration changed since the file's
        /// `revision` (it was exported).
        #[arg(long)]
        force: bool,
        /// Stage the change: waves and a gate from this file (see
        /// `duofleetctl rollout --help`).
        #[arg(long, value_name = "FILE")]
        rollout: Option<PathBuf>,
    },
    /// A unified diff of the configuration against a file: exit 0 same,
    /// 1 different, 3 an error.
    Diff {
        #[arg(short = 'f', long = "filename", value_name = "FILE|DIR")]
        file: PathBuf,
        /// Show the deletions `apply --prune` would make.
        #[arg(long)]
        prune: bool,
    },
    /// Write the whole configuration as YAML (API keys never included).
    Export,
    /// Change one setting.
    #[command(subcommand)]
    Set(change::Set),
    /// Create a model or a profile.
    #[command(subcommand)]
    Create(change::Create),
    /// Delete a model, profile or instance.
    Delete {
        #[arg(value_enum)]
        kind: One,
        name: String,
        /// Check only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Change an instance's labels: KEY=VALUE sets, KEY- removes.
    Label {
        #[arg(value_enum)]
        kind: LabelKind,
        id: String,
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
    },
    /// Give a model a new API key, read from the environment or a file.
    RotateKey {
        model: String,
        #[arg(
            long,
            value_name = "VAR",
            conflicts_with = "from_file",
            required_unless_present = "from_file"
        )]
        from_env: Option<String>,
        #[arg(long, value_name = "PATH")]
        from_file: Option<PathBuf>,
    },
    /// Revisions, newest first; `history show REV` for what one changed.
    History {
        #[command(subcommand)]
        show: Option<read::HistoryShow>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Make a new revision equal to an earlier one (keys stay as they are).
    Rollback {
        revision: u64,
        /// Show what it would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Operator and join tokens.
    #[command(subcommand)]
    Token(change::TokenCommand),
    /// Staged changes: list, follow, pause, resume, abort.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Copy the database and key files into a new directory on the
    /// duofleetd host.
    Backup { directory: String },
    /// Follow the fleet: one line per event.
    Watch {
        /// Show progress until every instance runs the current revision:
        /// exit 0 all SYNCED, 1 one FAILED, 2 timeout.
        #[arg(long)]
        until_synced: bool,
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Shell completion: `duofleetctl completion bash > /etc/bash_completion.d/duofleetctl`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The man page (roff): `duofleetctl man | man -l -`.
    Man,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Models,
    Profiles,
    Instances,
    Revisions,
    Tokens,
}

#[derive(Clone, Copy, ValueEnum)]
enum One {
    Model,
    Profile,
    Instance,
}

#[derive(Clone, Copy, ValueEnum)]
enum LabelKind {
    Instance,
}

/// What a command ends with.
pub enum Outcome {
    Done,
    /// Exit 1: differences, trouble, a failure seen.
    Negative,
    /// Exit 2: out of time.
    TimedOut,
}

/// A failed command: printed as `error: ...`, exit 3.
#[derive(Debug)]
pub struct Failure(pub String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure(error.to_string())
    }
}

/// A refused call, as an operator reads it: the message, then the code.
pub fn refused(status: tonic::Status) -> Failure {
    // How tonic's client says its own timeout ran out.
    if status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired" {
        return Failure(
            "duofleetd did not answer within --request-timeout: is it overloaded, or stopped? A change it was asked for may still land: look before trying again (DeadlineExceeded)"
                .into(),
        );
    }
    let message = status.message();
    Failure(format!("{message} ({:?})", status.code()))
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?}: add a unit (s, m, h or d), e.g. 10m"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?}: not a duration such as 90s, 10m, 2h or 7d"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(seconds))
}

impl Connection {
    async fn clients(&self) -> Result<Clients, Failure> {
        let token = client::load_token(self.token_file.as_deref())?;
        let tls = TlsFiles {
            cacert: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            plaintext: self.plaintext,
        };
        let channel = client::connect(&self.server, &tls, self.request_timeout).await?;
        Ok(Clients::new(channel, Some(token)))
    }
}

async fn run(cli: Cli) -> Result<Outcome, Failure> {
    let output = cli.output;
    let c = || cli.connection.clients();
    match cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "duofleetctl",
                &mut std::io::stdout(),
            );
            Ok(Outcome::Done)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(Outcome::Done)
        }
        Command::Get { kind, selector } => {
            read::get(&mut c().await?, kind, &selector, output).await
        }
        Command::Describe { kind, name } => {
            read::describe(&mut c().await?, kind, &name, output).await
        }
        Command::Status { check, selector } => {
            read::status(&mut c().await?, check, &selector, output).await
        }
        Command::History { show, limit } => {
            read::history(&mut c().await?, show, limit, output).await
        }
        Command::Apply {
            file,
            dry_run,
            prune,
            force,
            rollout,
        } => {
            change::apply(
                &mut c().await?,
                &file,
                dry_run,
                prune,
                force,
                rollout.as_deref(),
            )
            .await
        }
        Command::Rollout(command) => rollout::run(&mut c().await?, command, output).await,
        Command::Diff { file, prune } => change::diff(&mut c().await?, &file, prune).await,
        Command::Export => change::export(&mut c().await?).await,
        Command::Set(set) => change::set(&mut c().await?, set).await,
        Command::Create(create) => change::create(&mut c().await?, create).await,
        Command::Delete {
            kind,
            name,
            dry_run,
        } => change::delete(&mut c().await?, kind, &name, dry_run).await,
        Command::Label {
            kind: LabelKind::Instance,
            id,
            changes,
        } => change::label(&mut c().await?, &id, &changes).await,
        Command::RotateKey {
            model,
            from_env,
            from_file,
        } => change::rotate_key(&mut c().await?, &model, from_env, from_file).await,
        Command::Rollback { revision, dry_run } => {
            change::rollback(&mut c().await?, revision, dry_run).await
        }
        Command::Token(command) => change::token(&mut c().await?, command, output).await,
        Command::Backup { directory } => change::backup(&mut c().await?, &directory).await,
        Command::Watch {
            until_synced,
            timeout,
        } => watch::watch(&mut c().await?, until_synced, timeout).await,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::from(3);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(Outcome::Done) => ExitCode::SUCCESS,
        Ok(Outcome::Negative) => ExitCode::from(1),
        Ok(Outcome::TimedOut) => ExitCode::from(2),
        Err(Failure(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(3)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("5y").is_err());
    }
}
