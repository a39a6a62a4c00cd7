//! Real etcd for tests and the benchmark: Debian's etcd-server ($ETCD, or
//! `etcd` on PATH), one or several members on loopback ports, each on its
//! own temp data dir. Members are killed on drop.

use etcd_client::{Client, ConnectOptions};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd process.
pub struct Member {
    child: Option<Child>,
    /// Its client URL.
    pub url: String,
    args: Vec<String>,
    log: PathBuf,
}

/// A running etcd cluster.
pub struct Etcd {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
    /// How a client reaches it (TLS, credentials).
    connect: Option<ConnectOptions>,
}

/// TLS for a single-member etcd: its server certificate, and the CA its
/// clients' certificates must come from (mutual TLS).
pub struct Tls<'a> {
    pub ca: &'a crate::endpoints::TestCa,
    /// The certificate the tests' own client presents.
    pub client: (String, String),
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// What etcd logs when its port is taken.
const PORT_TAKEN: &str = "bind: address already in use";

/// Spawns `size` members on free ports, their data and logs in `dir`
/// (with the attempt in their names after the first).
fn spawn_members(
    dir: &tempfile::TempDir,
    attempt: usize,
    size: usize,
    scheme: &str,
    extra: &[String],
) -> Result<Vec<Member>, String> {
    let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
    let initial = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let suffix = if attempt > 1 {
        format!(".{attempt}")
    } else {
        String::new()
    };
    let mut members = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let url = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut args = vec![
            format!("--name=m{i}"),
            format!(
                "--data-dir={}",
                dir.path().join(format!("m{i}{suffix}")).display()
            ),
            format!("--listen-client-urls={url}"),
            format!("--advertise-client-urls={url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-state=new".into(),
            "--initial-cluster-token=duofleet-test".into(),
        ];
        args.extend(extra.iter().cloned());
        let mut member = Member {
            child: None,
            url,
            args,
            log: dir.path().join(format!("m{i}{suffix}.log")),
        };
        member.spawn()?;
        members.push(member);
    }
    Ok(members)
}

fn binary() -> PathBuf {
    std::env::var_os("ETCD")
        .map(PathBuf::from)
        .unwrap_or_else(|| "etcd".into())
}

impl Member {
    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let child = Command::new(binary())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run {} ({e}); install Debian's etcd-server or set ETCD",
                    binary().display()
                )
            })?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: the member is gone at once.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the member again on its data dir and ports.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Etcd {
    /// One member; waits until it answers.
    pub async fn start() -> Result<Etcd, String> {
        Etcd::cluster(1).await
    }

    /// One member serving clients over mutual TLS only.
    pub async fn start_tls(tls: Tls<'_>) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let file = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text)
                .map(|()| path.display().to_string())
                .map_err(|e| e.to_string())
        };
        let server = [
            format!(
                "--cert-file={}",
                file("server.pem", &tls.ca.server_cert_pem)?
            ),
            format!("--key-file={}", file("server.key", &tls.ca.server_key_pem)?),
            format!("--trusted-ca-file={}", file("ca.pem", &tls.ca.ca_pem)?),
            "--client-cert-auth".into(),
        ];
        let client = ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca.ca_pem))
                .identity(etcd_client::Identity::from_pem(
                    &tls.client.0,
                    &tls.client.1,
                )),
        );
        Etcd::launch(dir, 1, "https", &server, Some(client)).await
    }

    /// Turns on etcd's authentication with a root user; the tests' own
    /// client uses it from then on.
    pub async fn enable_auth(&mut self, password: &str) {
        let mut client = self.client().await;
        client
            .user_add("root", password, None)
            .await
            .expect("user add");
        client
            .user_grant_role("root", "root")
            .await
            .expect("grant root");
        client.auth_enable().await.expect("auth enable");
        self.connect = Some(
            self.connect
                .take()
                .unwrap_or_default()
                .with_user("root", password),
        );
    }

    /// `size` members forming one cluster; waits until it answers.
    pub async fn cluster(size: usize) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        Etcd::launch(dir, size, "http", &[], None).await
    }

    /// Starts `size` members in `dir`, serving clients on `scheme` with
    /// `extra` flags each; waits until a client (`connect`) gets answers.
    /// The ports are picked free and let go before etcd binds them, so
    /// another test may take one meanwhile: then the cluster is started
    /// again on new ports.
    async fn launch(
        mut dir: tempfile::TempDir,
        size: usize,
        scheme: &str,
        extra: &[String],
        connect: Option<ConnectOptions>,
    ) -> Result<Etcd, String> {
        const ATTEMPTS: usize = 3;
        for attempt in 1.. {
            let members = spawn_members(&dir, attempt, size, scheme, extra)?;
            let etcd = Etcd {
                members,
                dir,
                connect: connect.clone(),
            };
            match etcd.wait_ready(Duration::from_secs(30)).await {
                Ok(()) => return Ok(etcd),
                Err(_) if attempt < ATTEMPTS && etcd.lost_a_port() => {
                    let Etcd {
                        members, dir: kept, ..
                    } = etcd;
                    drop(members);
                    dir = kept;
                }
                Err(error) => return Err(error),
            }
        }
        unreachable!("the loop returns")
    }

    /// A member could not bind its port: another process took it.
    fn lost_a_port(&self) -> bool {
        self.members
            .iter()
            .any(|m| std::fs::read_to_string(&m.log).is_ok_and(|log| log.contains(PORT_TAKEN)))
    }

    /// Waits until a write through every live member succeeds.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        for member in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                let ready = async {
                    let mut c = Client::connect([&member.url], self.connect.clone())
                        .await
                        .ok()?;
                    c.put("/ready-probe", "1", None).await.ok()
                };
                if tokio::time::timeout(Duration::from_secs(2), ready)
                    .await
                    .ok()
                    .flatten()
                    .is_some()
                {
                    break;
                }
                if Instant::now() > deadline || self.lost_a_port() {
                    return Err(format!(
                        "etcd did not answer within {timeout:?}:\n{}",
                        self.logs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// The first member's client URL.
    pub fn url(&self) -> &str {
        &self.members[0].url
    }

    /// Every member's client URL, comma-separated (for --etcd-endpoints).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| m.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first member's process id.
    pub fn pid(&self) -> u32 {
        self.members[0].pid()
    }

    /// A client of the whole cluster.
    pub async fn client(&self) -> Client {
        let urls: Vec<&str> = self.members.iter().map(|m| m.url.as_str()).collect();
        Client::connect(urls, self.connect.clone())
            .await
            .expect("etcd client")
    }

    /// Every member's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for (i, member) in self.members.iter().enumerate() {
            let log = std::fs::read_to_string(&member.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            all.push_str(&format!("--- etcd m{i} ---\n"));
            for line in tail.into_iter().rev() {
                all.push_str(line);
                all.push('\n');
            }
        }
        let _ = &self.dir;
        all
    }
}
