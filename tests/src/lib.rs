//! The end-to-end harness: starts the real `duofleetd` binary on loopback
//! with a temp data dir, waits until it is ready, and hands out real gRPC
//! clients and a real grpcurl. Nothing of ours is faked here.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the
//! README's test command does that.

pub mod agent;
pub mod browser;
pub mod endpoints;
pub mod etcd;
pub mod gitlab_sim;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

/// How long a daemon may take to become ready or to exit.
const STARTUP: Duration = Duration::from_secs(30);

/// The directory holding the workspace's built binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DUOFLEET_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<test binary> or target/<profile>/<bin> -> target/<profile>
    let exe = std::env::current_exe().expect("current binary");
    let dir = exe.parent().expect("binary in a directory");
    if dir.ends_with("deps") {
        dir.parent().expect("target/<profile>").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A running `duofleetd`. Killed (SIGKILL) on drop.
pub struct Daemon {
    child: Option<Child>,
    data_dir: PathBuf,
    log_path: PathBuf,
    pub grpc_addr: String,
    pub http_addr: String,
}

/// Extra settings for a daemon start.
#[derive(Default, Clone)]
pub struct DaemonOptions {
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
    /// A fixed gRPC address, e.g. to restart on the port agents know.
    pub listen: Option<String>,
}

impl Daemon {
    /// Starts `duofleetd` on free loopback ports with `data_dir`.
    pub fn start(data_dir: &Path) -> Daemon {
        Daemon::start_with(data_dir, DaemonOptions::default())
    }

    pub fn start_with(data_dir: &Path, options: DaemonOptions) -> Daemon {
        let log_path = data_dir.with_extension("stderr.log");
        let log_offset = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("daemon log file");
        let child = Command::new(bin("duofleetd"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(options.listen.as_deref().unwrap_or("127.0.0.1:0"))
            .args(["--http-listen", "127.0.0.1:0"])
            .args(&options.args)
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn duofleetd");
        let mut daemon = Daemon {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            log_path,
            grpc_addr: String::new(),
            http_addr: String::new(),
        };
        let deadline = Instant::now() + STARTUP;
        loop {
            let log = daemon.log_since(log_offset);
            if let Some(line) = log.lines().find(|l| l.contains("duofleetd ready")) {
                daemon.grpc_addr = field(line, "grpc_addr");
                daemon.http_addr = field(line, "http_addr");
                return daemon;
            }
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("duofleetd exited with {status} before it was ready:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "duofleetd not ready in time:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The operator token from `DATA_DIR/admin.token`.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("admin.token")
            .trim()
            .to_string()
    }

    /// Everything the daemon has written to stderr, across restarts.
    pub fn log(&self) -> String {
        self.log_since(0)
    }

    fn log_since(&self, offset: u64) -> String {
        let bytes = std::fs::read(&self.log_path).unwrap_or_default();
        String::from_utf8_lossy(&bytes[(offset as usize).min(bytes.len())..]).into_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Sends `signal` (e.g. "TERM") and waits for the exit.
    pub fn stop(mut self, signal: &str) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .expect("kill");
        assert!(sent.success());
        let deadline = Instant::now() + STARTUP;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "duofleetd ignored SIG{signal}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.grpc_addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to duofleetd")
    }

    /// Clients that present the admin token.
    pub async fn clients(&self) -> Clients {
        Clients::new(self.channel().await, Some(self.token()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- log of duofleetd:\n{}", self.log());
        }
    }
}

/// A field of the ready line, in the human (`name=value`) or JSON
/// (`"name":"value"`) log format.
fn field(line: &str, name: &str) -> String {
    let human = format!("{name}=");
    let json = format!("\"{name}\":\"");
    let (start, end_chars): (usize, &[char]) = if let Some(at) = line.find(&json) {
        (at + json.len(), &['"'])
    } else if let Some(at) = line.find(&human) {
        (at + human.len(), &[' ', '\t'])
    } else {
        panic!("no {name} in {line}")
    };
    let rest = &line[start..];
    rest[..rest.find(end_chars).unwrap_or(rest.len())].to_string()
}

/// The operator clients: the same library `duofleetctl` uses.
pub use duofleet_control_plane::client::Clients;

/// Starts `duofleetd` on `data_dir` expecting it to refuse: asserts that
/// it exits unsuccessfully and returns what it printed on stderr.
pub fn start_refused(data_dir: &Path) -> String {
    start_refused_with(data_dir, &[])
}

/// Like [`start_refused`], with more flags.
pub fn start_refused_with(data_dir: &Path, args: &[String]) -> String {
    let output = Command::new(bin("duofleetd"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .expect("run duofleetd");
    assert!(
        !output.status.success(),
        "duofleetd started on {} with {args:?}",
        data_dir.display()
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A process's resident memory, in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// What a grpcurl run printed.
#[derive(Debug)]
pub struct GrpcurlOutput {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl GrpcurlOutput {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("grpcurl printed no JSON ({e}):\n{self:?}"))
    }
}

/// The grpcurl binary: `$GRPCURL`, else the one on PATH, else the one
/// `.ci/install-grpcurl` puts in `~/.local/bin`.
pub fn grpcurl_path() -> PathBuf {
    if let Some(path) = std::env::var_os("GRPCURL") {
        return PathBuf::from(path);
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    let local_bin = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/bin"));
    path_dirs
        .into_iter()
        .chain(local_bin)
        .map(|dir| dir.join("grpcurl"))
        .find(|candidate| candidate.is_file())
        .expect("grpcurl is not installed: run .ci/install-grpcurl")
}

/// Runs the real grpcurl in plaintext against `addr`. `args` come before
/// the address; `rest` after it (e.g. a method name).
pub fn grpcurl(addr: &str, args: &[&str], rest: &[&str]) -> GrpcurlOutput {
    let output = Command::new(grpcurl_path())
        .arg("-plaintext")
        .args(args)
        .arg(addr)
        .args(rest)
        .output()
        .expect("run grpcurl");
    GrpcurlOutput {
        exit_code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A plain HTTP/1.1 GET on the daemon's side listener: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to HTTP listener");
    stream.set_read_timeout(Some(STARTUP)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("HTTP response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("HTTP status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// One sample of a Prometheus text page, by its exact series: a name, or a
/// name with its labels as the daemon writes them (`name{label="v"}`).
pub fn metric(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub async fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "condition not met within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Builders for requests, so tests read as the operator's intent.
pub mod mk {
    use duofleet_proto::v1::{FeatureSetting, Model, Profile, Provider};

    /// A valid vLLM model of family `mixtral` with an API key.
    pub fn model(name: &str) -> Model {
        Model {
            name: name.to_string(),
            family: "mixtral".to_string(),
            endpoint: "https://vllm.example.internal:8000/v1".to_string(),
            api_key: format!("sk-test-key-of-{name}"),
            identifier: "custom_openai/Mixtral-8x7B-Instruct-v0.1".to_string(),
            ..Default::default()
        }
    }

    pub fn profile(name: &str) -> Profile {
        Profile {
            name: name.to_string(),
            ai_gateway_url: "https://aigw.example.internal:5052".to_string(),
            ..Default::default()
        }
    }

    pub fn self_hosted(feature: &str, model: &str) -> FeatureSetting {
        FeatureSetting {
            feature: feature.to_string(),
            provider: Provider::SelfHosted as i32,
            model: model.to_string(),
        }
    }

    pub fn vendor(feature: &str) -> FeatureSetting {
        FeatureSetting {
            feature: feature.to_string(),
            provider: Provider::Vendor as i32,
            model: String::new(),
        }
    }
}
