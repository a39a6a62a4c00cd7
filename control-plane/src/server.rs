//! Wiring: flags, the data dir, the gRPC and HTTP listeners, and graceful
//! shutdown on SIGTERM/SIGINT (streams closed, database flushed).

use crate::auth::Tokens;
use crate::ca::CertAuthority;
use crate::grpc::{
    self, AgentApi, BackupApi, ConfigApi, EnrollApi, FleetApi, GrpcServer, GrpcSettings,
    HistoryApi, ModelApi, ProfileApi, RolloutApi, TokenApi,
};
use crate::registry::Registry;
use crate::secrets::{self, Sealer};
use crate::store::Store;
use crate::telemetry::{self, LogFormat};
use crate::{catalog, fsutil};
use clap::Parser;
use duofleet_proto::v1::backup_service_server::BackupServiceServer;
use duofleet_proto::v1::config_service_server::ConfigServiceServer;
use duofleet_proto::v1::enrollment_service_server::EnrollmentServiceServer;
use duofleet_proto::v1::fleet_service_server::FleetServiceServer;
use duofleet_proto::v1::history_service_server::HistoryServiceServer;
use duofleet_proto::v1::model_service_server::ModelServiceServer;
use duofleet_proto::v1::profile_service_server::ProfileServiceServer;
use duofleet_proto::v1::rollout_service_server::RolloutServiceServer;
use duofleet_proto::v1::token_service_server::TokenServiceServer;
use std::error::Error;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic_health::ServingStatus;

/// The services whose health grpc.health.v1 reports; "" is the server.
const SERVICES: [&str; 11] = [
    "",
    <ModelServiceServer<ModelApi> as NamedService>::NAME,
    <ProfileServiceServer<ProfileApi> as NamedService>::NAME,
    <HistoryServiceServer<HistoryApi> as NamedService>::NAME,
    <FleetServiceServer<FleetApi> as NamedService>::NAME,
    duofleet_proto::v1::agent_service_server::SERVICE_NAME,
    <TokenServiceServer<TokenApi> as NamedService>::NAME,
    <EnrollmentServiceServer<EnrollApi> as NamedService>::NAME,
    <BackupServiceServer<BackupApi> as NamedService>::NAME,
    <ConfigServiceServer<ConfigApi> as NamedService>::NAME,
    <RolloutServiceServer<RolloutApi> as NamedService>::NAME,
];

/// How often rollout gates are checked.
const ROLLOUT_GATE_PERIOD: Duration = Duration::from_millis(500);

/// How long a graceful shutdown waits for clients to let go of their
/// connections before it drops them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The HTTP/2 flow-control window per stream (twice that per connection).
const FLOW_WINDOW_BYTES: u32 = 64 * 1024;

/// duofleetd: the duofleet control plane. Stores self-hosted model and Duo
/// feature configuration, versioned by revision, and serves it over gRPC.
#[derive(Debug, Parser)]
#[command(name = "duofleetd", version)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Directory for the sled database and admin.token.
    #[arg(
        long,
        env = "DUOFLEET_DATA_DIR",
        default_value = "./duofleet-data",
        global = true
    )]
    pub data_dir: PathBuf,

    /// gRPC address for operators and agents.
    #[arg(long, env = "DUOFLEET_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,

    /// HTTP address for /metrics and /healthz.
    #[arg(long, env = "DUOFLEET_HTTP_LISTEN", default_value = "127.0.0.1:7701")]
    pub http_listen: SocketAddr,

    /// Allow plaintext gRPC on a non-loopback address.
    #[arg(long, env = "DUOFLEET_INSECURE")]
    pub insecure: bool,

    /// The gRPC listener's TLS certificate chain (PEM). With --tls-key,
    /// gRPC is served over TLS, and agents must use their client
    /// certificates (mutual TLS).
    #[arg(long, env = "DUOFLEET_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "DUOFLEET_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Lifetime of the agent certificates this daemon issues, in seconds
    /// (agents renew after two thirds of it).
    #[arg(long, env = "DUOFLEET_AGENT_CERT_LIFETIME_SECS", default_value_t = 30 * 24 * 3600)]
    pub agent_cert_lifetime_secs: u64,

    /// The most agents connected at once; more get RESOURCE_EXHAUSTED and retry.
    #[arg(long, env = "DUOFLEET_MAX_AGENTS", default_value_t = 20_000)]
    pub max_agents: usize,

    /// The most concurrent gRPC streams on one connection.
    #[arg(
        long,
        env = "DUOFLEET_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 100
    )]
    pub max_streams_per_connection: u32,

    /// The most open gRPC connections; more wait in the listen backlog.
    #[arg(long, env = "DUOFLEET_MAX_CONNECTIONS", default_value_t = 25_000)]
    pub max_connections: usize,

    /// A connection that sends nothing this long after it opens is closed.
    #[arg(
        long,
        env = "DUOFLEET_FIRST_BYTE_TIMEOUT_MS",
        default_value_t = 10_000,
        hide = true
    )]
    pub first_byte_timeout_ms: u64,

    /// A connection whose first authenticated request has not arrived this
    /// long after it opened is closed (health and reflection calls need no
    /// token and do not count).
    #[arg(
        long,
        env = "DUOFLEET_AUTH_TIMEOUT_MS",
        default_value_t = 10_000,
        hide = true
    )]
    pub auth_timeout_ms: u64,

    /// How long an HTTP client may take to send a request's headers (and
    /// how long an idle keep-alive connection is kept): a client trickling
    /// a request holds its slot no longer.
    #[arg(
        long,
        env = "DUOFLEET_HTTP_HEADER_TIMEOUT_MS",
        default_value_t = 10_000,
        hide = true
    )]
    pub http_header_timeout_ms: u64,

    /// Log format on stderr.
    #[arg(long, env = "DUOFLEET_LOG_FORMAT", value_enum, default_value = "human")]
    pub log_format: LogFormat,

    /// The key that seals API keys at rest (64 hex characters). Default:
    /// DATA_DIR/secret.key, made on first start.
    #[arg(long, env = "DUOFLEET_SECRET_KEY_FILE", global = true)]
    pub secret_key_file: Option<PathBuf>,

    /// During a key rotation: the old key, to re-seal everything under the new one.
    #[arg(long, env = "DUOFLEET_PREVIOUS_SECRET_KEY_FILE")]
    pub previous_secret_key_file: Option<PathBuf>,

    /// HTTP/2 keepalive in milliseconds: a connection that has sent
    /// nothing for this long is pinged, and dropped when it sends nothing
    /// for as long again (an agent then shows OFFLINE). The default finds a
    /// dead agent within 40 s; a busy connection is not pinged.
    #[arg(
        long,
        env = "DUOFLEET_KEEPALIVE_MS",
        default_value_t = 20_000,
        hide = true
    )]
    pub keepalive_ms: u64,

    /// Where configuration and fleet state live: `sled`, embedded in
    /// DATA_DIR/db (one duofleetd), or `etcd`, shared by several replicas.
    #[arg(
        long,
        env = "DUOFLEET_STORE",
        value_enum,
        default_value = "sled",
        global = true
    )]
    pub store: StoreKind,

    /// With --store etcd: the cluster's client URLs, comma-separated
    /// (http://host:2379, or https:// with --etcd-ca).
    #[arg(
        long,
        env = "DUOFLEET_ETCD_ENDPOINTS",
        value_delimiter = ',',
        global = true
    )]
    pub etcd_endpoints: Vec<String>,

    /// With --store etcd: every key starts with this, so that several
    /// fleets can share one cluster.
    #[arg(
        long,
        env = "DUOFLEET_ETCD_PREFIX",
        default_value = "/duofleet/",
        global = true
    )]
    pub etcd_prefix: String,

    /// With --store etcd: how often (seconds) the leading replica compacts
    /// etcd's history, keeping one interval of it; 0: never (when etcd runs
    /// with its own --auto-compaction-retention, or is shared with
    /// something that needs longer history).
    #[arg(
        long,
        env = "DUOFLEET_ETCD_COMPACTION_INTERVAL_SECS",
        default_value_t = 300,
        global = true
    )]
    pub etcd_compaction_interval_secs: u64,

    /// With --store etcd: the CA certificate (PEM) of the etcd servers.
    #[arg(long, env = "DUOFLEET_ETCD_CA", global = true)]
    pub etcd_ca: Option<PathBuf>,

    /// With --store etcd: a client certificate (PEM) for etcd's mutual TLS.
    #[arg(long, env = "DUOFLEET_ETCD_CERT", requires = "etcd_key", global = true)]
    pub etcd_cert: Option<PathBuf>,

    /// With --store etcd: the client certificate's key (PEM).
    #[arg(long, env = "DUOFLEET_ETCD_KEY", requires = "etcd_cert", global = true)]
    pub etcd_key: Option<PathBuf>,

    /// With --store etcd: the etcd user, when etcd authentication is on.
    #[arg(
        long,
        env = "DUOFLEET_ETCD_USER",
        requires = "etcd_password_file",
        global = true
    )]
    pub etcd_user: Option<String>,

    /// With --store etcd: a file holding the etcd user's password.
    #[arg(
        long,
        env = "DUOFLEET_ETCD_PASSWORD_FILE",
        requires = "etcd_user",
        global = true
    )]
    pub etcd_password_file: Option<PathBuf>,
}

/// Which backend keeps the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    Sled,
    Etcd,
}

impl Args {
    /// Parses the command line and runs the daemon until a signal stops it.
    pub fn parse_and_run() -> Result<(), Box<dyn Error>> {
        let args = Args::parse();
        if let Some(Command::Check) = args.command {
            return check(&args);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let result = runtime.block_on(run(args));
        // Everything is saved by now. Dropping every connection's task one
        // by one would take a good part of a second at tens of thousands
        // of agents, and delay the restart they are waiting for: the
        // process exit ends them.
        runtime.shutdown_background();
        result
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Verify every record and revision of a stopped daemon's data dir, like
    /// fsck (or, with --store etcd, of the etcd store, which may be in
    /// use): exits 0 when all is sound, 1 with each problem listed.
    Check,
}

/// The HTTP listener's own cap, apart from gRPC's.
const HTTP_MAX_CONNECTIONS: usize = 128;

/// File descriptors kept back from --max-connections: the database, the
/// HTTP listener, backups, TLS files.
const FDS_KEPT: usize = 256;

/// `--max-connections`, clamped to what the open-file limit allows: past it
/// new connections, /healthz and backups would all fail with EMFILE.
fn max_connections(wanted: usize) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        });
    match limit {
        Some(limit) if wanted + FDS_KEPT > limit => {
            let allowed = limit.saturating_sub(FDS_KEPT).max(1);
            tracing::warn!(
                wanted,
                allowed,
                open_file_limit = limit,
                "--max-connections is above what the open-file limit allows; using {allowed} (raise the limit, e.g. LimitNOFILE= in the systemd unit, to allow more)"
            );
            allowed
        }
        _ => wanted,
    }
}

/// The newest acknowledged revision, outside sled's files.
pub const HIGH_WATER_FILE: &str = "revision.hwm";

/// `duofleetd check`: prints what it read and every problem; fails on any.
fn check(args: &Args) -> Result<(), Box<dyn Error>> {
    let db_path = args.data_dir.join("db");
    if args.store == StoreKind::Sled && !db_path.exists() {
        return Err(format!("{} does not exist: no database to check", db_path.display()).into());
    }
    let key_path = args
        .secret_key_file
        .clone()
        .unwrap_or_else(|| args.data_dir.join("secret.key"));
    let key = secrets::load_key(&key_path, false).map_err(|source| StartError::SecretKey {
        path: key_path.clone(),
        source,
    })?;
    let high_water = args.data_dir.join(HIGH_WATER_FILE);
    let sealer = Sealer::new(&key, None);
    let (store, what) = match args.store {
        StoreKind::Sled => (
            Store::open_for_check(&db_path, Some(&high_water), catalog::get(), sealer).map_err(
                |source| StartError::Database {
                    path: db_path.clone(),
                    source,
                },
            )?,
            args.data_dir.display().to_string(),
        ),
        // A running cluster is checked as it is: the check only reads.
        StoreKind::Etcd => {
            let (backend, what) = connect_etcd(args)?;
            let store =
                Store::open_backend_for_check(backend, Some(&high_water), catalog::get(), sealer);
            (store, what)
        }
    };
    let report = store.check();
    for damage in &report.damage {
        println!("DAMAGED {}: {}", damage.what, damage.detail);
    }
    println!(
        "checked {what}: current revision {}, {} revision records, {} records; {} problem(s)",
        report.revision,
        report.revisions,
        report.records,
        report.damage.len()
    );
    if report.damage.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} problem(s) in {what}; restore it from a backup (see the README, \"Failure modes\")",
            report.damage.len(),
        )
        .into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(
        "refusing to serve plaintext gRPC on {0}, which is not a loopback address: anyone on the network could read API keys. Pass --insecure to do it anyway"
    )]
    PlaintextOnNetwork(SocketAddr),
    #[error(
        "refusing to serve the dashboard and /metrics over plaintext HTTP on {0}, which is not a loopback address: anyone on the network could read session cookies. Give --tls-cert and --tls-key (HTTPS on this port too), or pass --insecure to do it anyway"
    )]
    PlaintextHttpOnNetwork(SocketAddr),
    #[error("cannot create data dir {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the database in {path} (is another duofleetd using this data dir?)")]
    Database {
        path: PathBuf,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("{flag}: {rule}")]
    Flag { flag: &'static str, rule: String },
    #[error("cannot open the store in {what}")]
    Etcd {
        what: String,
        #[source]
        source: crate::store::StoreError,
    },
    #[error("cannot read {path}")]
    EtcdFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path} for TLS")]
    Tls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot use the secret key file {path}")]
    SecretKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub async fn run(args: Args) -> Result<(), Box<dyn Error>> {
    let telemetry = telemetry::init("duofleetd", args.log_format)?;
    let result = serve(args).await;
    telemetry.shutdown();
    result
}

async fn serve(args: Args) -> Result<(), Box<dyn Error>> {
    let tls = args.tls_cert.is_some();
    if !tls && !args.listen.ip().is_loopback() && !args.insecure {
        return Err(StartError::PlaintextOnNetwork(args.listen).into());
    }
    if !tls && !args.http_listen.ip().is_loopback() && !args.insecure {
        return Err(StartError::PlaintextHttpOnNetwork(args.http_listen).into());
    }
    fsutil::create_private_dir(&args.data_dir).map_err(|source| StartError::DataDir {
        path: args.data_dir.clone(),
        source,
    })?;
    let tokens =
        Arc::new(
            Tokens::load_or_create(&args.data_dir).map_err(|source| StartError::DataDir {
                path: args.data_dir.clone(),
                source,
            })?,
        );
    let sealer = sealer(&args)?;
    let db_path = args.data_dir.join("db");
    let high_water = args.data_dir.join(HIGH_WATER_FILE);
    let store = Arc::new(open_store(&args, &db_path, &high_water, sealer)?);
    store.follow();

    let registry = Arc::new(
        Registry::load(store.clone(), args.max_agents).map_err(|source| StartError::Database {
            path: db_path.clone(),
            source,
        })?,
    );
    registry.follow();

    let rollouts =
        crate::rollout::Rollouts::open(store.clone(), registry.clone()).map_err(|source| {
            StartError::Database {
                path: db_path.clone(),
                source,
            }
        })?;
    store.set_guard(rollouts.guard());
    rollouts.follow();
    crate::rollout::spawn_gates(rollouts.clone(), ROLLOUT_GATE_PERIOD);

    let grpc_listener = listen(args.listen).map_err(|source| StartError::Listen {
        addr: args.listen,
        source,
    })?;
    let http_listener = TcpListener::bind(args.http_listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: args.http_listen,
            source,
        })?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(save_instances(registry.clone()));
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    for service in SERVICES {
        health_reporter
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    let token_api =
        TokenApi::new(store.clone(), tokens.clone()).map_err(|source| StartError::Database {
            path: db_path.clone(),
            source,
        })?;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(duofleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(duofleet_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let connections = Arc::new(crate::admission::Connections::default());
    let auth = grpc::authenticator(tokens.clone(), connections.clone(), false);
    let ca = CertAuthority::load_or_create(
        &args.data_dir,
        store.clone(),
        Duration::from_secs(args.agent_cert_lifetime_secs),
    )
    .map_err(|e| -> Box<dyn Error> { Box::new(e) })?;
    let agent_auth =
        grpc::agent_authenticator(tokens.clone(), connections.clone(), ca.clone(), tls);
    let enroll_auth = grpc::agent_or_admin_authenticator(
        tokens.clone(),
        connections.clone(),
        ca.clone(),
        false,
        true,
    );
    let mut grpc_tls = None;
    let mut http_tls = None;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| StartError::Tls {
                path: path.clone(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        http_tls = Some(tls_acceptor(&cert_pem, &key_pem, cert, None)?);
        grpc_tls = Some(tls_acceptor(&cert_pem, &key_pem, cert, Some(ca.ca_pem()))?);
    }
    let routes = tonic::service::Routes::new(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ModelServiceServer::with_interceptor(
            ModelApi::new(store.clone()),
            auth.clone(),
        ))
        .add_service(ProfileServiceServer::with_interceptor(
            ProfileApi::new(store.clone(), rollouts.clone()),
            auth.clone(),
        ))
        .add_service(HistoryServiceServer::with_interceptor(
            HistoryApi::new(store.clone()),
            auth.clone(),
        ))
        .add_service(RolloutServiceServer::with_interceptor(
            RolloutApi::new(rollouts.clone(), shutdown_rx.clone()),
            auth.clone(),
        ))
        .add_service(ConfigServiceServer::with_interceptor(
            ConfigApi::new(store.clone(), rollouts.clone()),
            auth.clone(),
        ))
        .add_service(FleetServiceServer::with_interceptor(
            FleetApi::new(
                store.clone(),
                registry.clone(),
                ca.clone(),
                shutdown_rx.clone(),
            ),
            auth.clone(),
        ))
        .add_service(BackupServiceServer::with_interceptor(
            BackupApi::new(
                store.clone(),
                args.data_dir.clone(),
                args.secret_key_file.clone(),
            ),
            auth.clone(),
        ))
        .add_service(TokenServiceServer::with_interceptor(
            token_api,
            auth.clone(),
        ))
        .add_service(EnrollmentServiceServer::with_interceptor(
            EnrollApi::new(ca.clone(), tls, tokens.clone(), store.clone()),
            enroll_auth,
        ));
    // AgentService.Connect is served inside each connection's task
    // (`grpc::GrpcServer`); its messages' size limits are in agent_input.
    let agents = Arc::new(AgentApi::new(
        store.clone(),
        registry.clone(),
        rollouts.clone(),
        ca.clone(),
        shutdown_rx.clone(),
        Arc::new(agent_auth),
    ));
    let grpc = Arc::new(GrpcServer::new(
        // Deadlines inside the metrics: a call cut off by its deadline is
        // counted under DEADLINE_EXCEEDED.
        tower::Layer::layer(
            &crate::metrics::RpcMetricsLayer(registry.clone()),
            tower::Layer::layer(&crate::grpc::DeadlineLayer, routes),
        ),
        agents,
        grpc_tls,
        GrpcSettings {
            max_streams_per_connection: args.max_streams_per_connection,
            // What a peer may send ahead of what we have read. hyper's
            // default is 1 MiB per stream: 10,000 agents bursting would
            // hold 10 GiB.
            flow_window: FLOW_WINDOW_BYTES,
            keepalive: Duration::from_millis(args.keepalive_ms),
        },
        shutdown_rx.clone(),
    ));
    let grpc_server = grpc.clone().serve(crate::admission::admit(
        grpc_listener,
        max_connections(args.max_connections),
        crate::admission::Deadlines {
            first_byte: Duration::from_millis(args.first_byte_timeout_ms),
            authenticated: Some(Duration::from_millis(args.auth_timeout_ms)),
        },
        connections,
    ));

    let http_server = crate::admission::HttpListener::new(
        http_listener,
        HTTP_MAX_CONNECTIONS,
        Duration::from_millis(args.first_byte_timeout_ms),
        Duration::from_millis(args.http_header_timeout_ms),
    )
    .serve(
        crate::http::router(
            store.clone(),
            registry.clone(),
            rollouts.clone(),
            tokens.clone(),
            http_tls.is_some(),
        ),
        http_tls,
        wait_for(shutdown_rx.clone()),
    );

    tracing::info!(
        %grpc_addr,
        %http_addr,
        data_dir = %args.data_dir.display(),
        store = %store.describe(),
        revision = store.current().revision,
        admin_token = %tokens.admin_token_path().display(),
        "duofleetd ready"
    );

    let shutdown_registry = registry.clone();
    tokio::spawn(async move {
        let signal = shutdown_signal().await;
        tracing::info!(
            signal,
            agents = shutdown_registry.connected(),
            "shutting down: telling agents when to reconnect, closing streams and flushing the database"
        );
        for service in SERVICES {
            health_reporter
                .set_service_status(service, ServingStatus::NotServing)
                .await;
        }
        let _ = shutdown_tx.send(true);
        // What the fleet reported and is not saved yet, saved while the
        // sessions end rather than after: the restart that agents wait for
        // comes that much sooner. What changes meanwhile is saved last.
        let saved = tokio::task::spawn_blocking(move || shutdown_registry.save_changed(true)).await;
        match saved {
            Ok(Ok(saved)) => tracing::info!(saved, "instance state saved"),
            Ok(Err(error)) => tracing::warn!(%error, "could not save the fleet's instance state"),
            Err(_) => {}
        }
    });

    // Graceful HTTP/2 closes need a round trip with every client; once
    // every agent has been told when to come back and no call is left,
    // they are not waited for (`settled`).
    let grpc_server = async {
        tokio::select! {
            () = grpc_server => {},
            () = settled(shutdown_rx.clone(), &grpc) => {},
        }
    };
    let servers = async { tokio::join!(grpc_server, http_server) };
    let grace_expired = async {
        wait_for(shutdown_rx.clone()).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        _ = servers => {}
        () = grace_expired => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "clients did not close their connections in time; dropping them");
        }
    }
    tracing::info!("every stream is closed; saving the fleet's instance state");
    match registry.save_changed(true) {
        Ok(saved) => tracing::info!(saved, "the last of the instance state saved"),
        Err(error) => tracing::warn!(%error, "could not save the fleet's instance state"),
    }
    // With replicas: the others show this one's agents offline at once,
    // not once its lease runs out.
    store.leave();
    let flushed = store.flush();
    flushed?;
    // Everything is saved. Freeing the fleet's records one by one would
    // take seconds at tens of thousands of instances and delay the
    // restart that agents are waiting for: they go with the process.
    std::mem::forget(Arc::clone(&registry));
    tracing::info!("duofleetd stopped");
    Ok(())
}

/// A listener's TLS, with `--tls-cert`. The gRPC listener passes this
/// duofleetd's CA: an agent may show a certificate it issued (optional,
/// since operators and enrolling agents have none), and speaks HTTP/2.
fn tls_acceptor(
    cert_pem: &[u8],
    key_pem: &[u8],
    path: &Path,
    client_ca_pem: Option<&str>,
) -> Result<tokio_rustls::TlsAcceptor, StartError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: String| StartError::Tls {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, what),
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("the certificate PEM: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad(format!("the key PEM: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca_pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                let ca = ca.map_err(|e| bad(format!("the agent CA: {e}")))?;
                roots
                    .add(ca)
                    .map_err(|e| bad(format!("the agent CA: {e}")))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| bad(format!("the agent CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
    config.alpn_protocols = match client_ca_pem {
        None => vec![b"http/1.1".to_vec()],
        Some(_) => vec![b"h2".to_vec()],
    };
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The key that seals API keys at rest: `--secret-key-file`, or
/// `DATA_DIR/secret.key` made on first start.
/// Opens the store on the backend the flags choose.
fn open_store(
    args: &Args,
    db_path: &Path,
    high_water: &Path,
    sealer: Sealer,
) -> Result<Store, StartError> {
    match args.store {
        StoreKind::Sled => {
            let etcd_flag = [
                (!args.etcd_endpoints.is_empty(), "--etcd-endpoints"),
                (args.etcd_ca.is_some(), "--etcd-ca"),
                (args.etcd_cert.is_some(), "--etcd-cert"),
                (args.etcd_user.is_some(), "--etcd-user"),
            ]
            .into_iter()
            .find_map(|(given, flag)| given.then_some(flag));
            if let Some(flag) = etcd_flag {
                return Err(StartError::Flag {
                    flag,
                    rule: "applies only with --store etcd".into(),
                });
            }
            Store::open_guarded(db_path, Some(high_water), catalog::get(), sealer).map_err(
                |source| StartError::Database {
                    path: db_path.to_path_buf(),
                    source,
                },
            )
        }
        StoreKind::Etcd => {
            let (backend, what) = connect_etcd(args)?;
            Store::open_backend(backend, Some(high_water), catalog::get(), sealer)
                .map_err(|source| StartError::Etcd { what, source })
        }
    }
}

/// Connects to the etcd the flags name; with what it is, for messages.
fn connect_etcd(args: &Args) -> Result<(Arc<crate::store::etcd::EtcdBackend>, String), StartError> {
    let options = etcd_options(args)?;
    let what = options.describe();
    let backend =
        crate::store::etcd::EtcdBackend::connect(options).map_err(|source| StartError::Etcd {
            what: what.clone(),
            source,
        })?;
    Ok((Arc::new(backend), what))
}

/// The etcd flags, checked: each refusal names the flag and the rule.
fn etcd_options(args: &Args) -> Result<crate::store::etcd::EtcdOptions, StartError> {
    let flag = |flag, rule: &str| StartError::Flag {
        flag,
        rule: rule.to_string(),
    };
    if args.etcd_endpoints.is_empty() {
        return Err(flag(
            "--etcd-endpoints",
            "required with --store etcd: the cluster's client URLs, comma-separated",
        ));
    }
    let mut secure = None;
    for endpoint in &args.etcd_endpoints {
        let https = match url::Url::parse(endpoint) {
            Ok(url) if url.scheme() == "https" && url.host().is_some() => true,
            Ok(url) if url.scheme() == "http" && url.host().is_some() => false,
            _ => {
                return Err(flag(
                    "--etcd-endpoints",
                    &format!(
                        "{} is not an http:// or https:// URL with a host",
                        crate::error::quoted(endpoint)
                    ),
                ));
            }
        };
        if secure.replace(https).is_some_and(|before| before != https) {
            return Err(flag(
                "--etcd-endpoints",
                "mixes http:// and https:// endpoints: use one scheme for the whole cluster",
            ));
        }
    }
    let https = secure == Some(true);
    if https && args.etcd_ca.is_none() {
        return Err(flag(
            "--etcd-ca",
            "required with https:// endpoints: the CA certificate (PEM) of the etcd servers",
        ));
    }
    if !https && (args.etcd_ca.is_some() || args.etcd_cert.is_some()) {
        return Err(flag(
            "--etcd-endpoints",
            "TLS flags are given, but the endpoints are http://: use https:// URLs",
        ));
    }
    if !args.etcd_prefix.starts_with('/') || !args.etcd_prefix.ends_with('/') {
        return Err(flag(
            "--etcd-prefix",
            "must start and end with '/', e.g. /duofleet/",
        ));
    }
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|source| StartError::EtcdFile {
            path: path.clone(),
            source,
        })
    };
    let user = match (&args.etcd_user, &args.etcd_password_file) {
        (Some(user), Some(file)) => {
            let password = String::from_utf8_lossy(&read(file)?).trim_end().to_string();
            Some((user.clone(), password))
        }
        _ => None,
    };
    Ok(crate::store::etcd::EtcdOptions {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.clone(),
        user,
        ca_pem: args.etcd_ca.as_ref().map(read).transpose()?,
        identity_pem: match (&args.etcd_cert, &args.etcd_key) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            _ => None,
        },
        compaction: (args.etcd_compaction_interval_secs > 0)
            .then(|| Duration::from_secs(args.etcd_compaction_interval_secs)),
    })
}

fn sealer(args: &Args) -> Result<Sealer, StartError> {
    let key_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StartError::SecretKey { path, source }
    };
    let default_path = args.data_dir.join("secret.key");
    let (path, create) = match &args.secret_key_file {
        Some(path) => (path.as_path(), false),
        None => (default_path.as_path(), true),
    };
    let current = secrets::load_key(path, create).map_err(key_error(path))?;
    let previous = match &args.previous_secret_key_file {
        Some(path) => Some(secrets::load_key(path, false).map_err(key_error(path))?),
        None => None,
    };
    Ok(Sealer::new(&current, previous.as_ref()))
}

/// Saves the instances that changed, every 500 ms (sled's own flush
/// interval), off the agents' streams.
async fn save_instances(registry: Arc<Registry>) {
    let mut every = tokio::time::interval(Duration::from_millis(500));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let registry = registry.clone();
        let saved = tokio::task::spawn_blocking(move || registry.save_changed(false)).await;
        if let Ok(Err(error)) = saved {
            tracing::warn!(%error, "could not save the fleet's instance state");
        }
    }
}

/// How many connections may wait to be accepted. A restarted daemon is
/// met by its whole fleet within seconds: with the usual 1,024 the kernel
/// drops the rest's SYNs, and each dropped agent loses a second or more to
/// the retransmit. The kernel caps it at net.core.somaxconn.
const LISTEN_BACKLOG: u32 = 65_535;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // A restart binds the port again at once, past the old one's TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long the gRPC listener must have had no stream open (no agent
/// session, no call) before shutting down stops waiting for connections
/// to close: time for the last frames, queued as each stream ended, to be
/// written out.
const SHUTDOWN_SETTLE: Duration = Duration::from_millis(50);

/// Resolves once shutting down, every agent session has ended (each was
/// told when to come back) and no stream has been open for
/// `SHUTDOWN_SETTLE`.
async fn settled(shutdown: watch::Receiver<bool>, grpc: &GrpcServer) {
    const CHECK: Duration = Duration::from_millis(10);
    wait_for(shutdown).await;
    let mut quiet = Duration::ZERO;
    while quiet < SHUTDOWN_SETTLE {
        tokio::time::sleep(CHECK).await;
        if grpc.open_streams() == 0 {
            quiet += CHECK;
        } else {
            quiet = Duration::ZERO;
        }
    }
}

/// Resolves once `shutdown` is true.
pub(crate) async fn wait_for(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
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
