//! TLS and agent identity: enrollment, mutual TLS, claims checked against
//! the certificate, revocation, renewal; grpcurl over TLS.

use crate::{WAIT, wait_synced};
use duofleet_proto::v1::{GetInstanceRequest, Profile, UpdateProfileRequest};
use duofleet_tests::agent::Agent;
use duofleet_tests::endpoints::TestCa;
use duofleet_tests::{Clients, Daemon, DaemonOptions, grpcurl_path};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

struct Tls {
    _dir: tempfile::TempDir,
    root: PathBuf,
    daemon: Daemon,
    ca_file: String,
    ca: TestCa,
}

/// A daemon serving TLS with a server certificate from a test CA.
fn tls_daemon(extra: &[&str]) -> Tls {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let ca = TestCa::new();
    let (cert, key, ca_file) = (
        root.join("server.pem"),
        root.join("server.key"),
        root.join("ca.pem"),
    );
    std::fs::write(&cert, &ca.server_cert_pem).unwrap();
    std::fs::write(&key, &ca.server_key_pem).unwrap();
    ca.write_ca(&ca_file);
    let mut args: Vec<String> = vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = Daemon::start_with(
        &root.join("data"),
        DaemonOptions {
            args,
            ..Default::default()
        },
    );
    Tls {
        _dir: dir,
        root,
        daemon,
        ca_file: ca_file.display().to_string(),
        ca,
    }
}

impl Tls {
    async fn channel(&self) -> tonic::transport::Channel {
        Endpoint::from_shared(format!("https://{}", self.daemon.grpc_addr))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca.ca_pem)),
            )
            .unwrap()
            .connect()
            .await
            .expect("TLS connect")
    }

    async fn clients(&self) -> Clients {
        Clients::new(self.channel().await, Some(self.daemon.token()))
    }

    /// Enroll for `instance_id` with `token`, with a fresh key's CSR.
    async fn enroll(&self, instance_id: &str, token: &str) -> Result<String, tonic::Status> {
        use duofleet_proto::v1::EnrollRequest;
        use duofleet_proto::v1::enrollment_service_client::EnrollmentServiceClient;
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let mut request = tonic::Request::new(EnrollRequest {
            instance_id: instance_id.into(),
            csr_pem: csr,
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", token.trim()).parse().unwrap(),
        );
        EnrollmentServiceClient::new(self.channel().await)
            .enroll(request)
            .await
            .map(|r| r.into_inner().certificate_pem)
    }

    fn agent(&self, id: &str, extra: &[&str]) -> Agent {
        let rb = self.root.join(format!("{id}.rb"));
        if !rb.exists() {
            std::fs::write(&rb, "").unwrap();
        }
        let mut args: Vec<String> = [
            "--control-plane",
            &format!("https://{}", self.daemon.grpc_addr),
            "--control-plane-ca",
            &self.ca_file,
            "--gitlab-rb",
            &rb.display().to_string(),
            "--reconfigure-command",
            "true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        Agent::start(&self.daemon, id, &self.root, &args)
    }

    fn grpcurl(&self, extra: &[&str], method: &str) -> std::process::Output {
        Command::new(grpcurl_path())
            .args(["-cacert", &self.ca_file])
            .args(extra)
            .arg(&self.daemon.grpc_addr)
            .arg(method)
            .output()
            .unwrap()
    }
}

async fn set_gateway(c: &mut Clients, url: &str) -> u64 {
    c.profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: url.into(),
                ..Default::default()
            }),
            update_mask: None,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .revision
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_enroll_then_connect_with_their_certificate() {
    let tls = tls_daemon(&[]);
    let mut c = tls.clients().await;
    let token = tls.root.join("join.token");
    std::fs::copy(tls.daemon.data_dir().join("enroll.token"), &token).unwrap();
    let mut agent = tls.agent(
        "gitlab-a",
        &["--enroll-token-file", &token.display().to_string()],
    );
    let revision = set_gateway(&mut c, "https://aigw.example.com").await;
    wait_synced(&mut c, "gitlab-a", revision).await;
    let state_dir = agent.state_dir.clone();
    let state = &state_dir;
    assert_eq!(mode(&state.join("agent-key.pem")), 0o600);
    assert!(
        std::fs::read_to_string(state.join("agent-cert.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    // Enrolled once: it comes back with its certificate, no token needed.
    agent.kill9();
    std::fs::remove_file(&token).unwrap();
    let mut agent = tls.agent("gitlab-a", &[]);
    assert_eq!(agent.state_dir, state_dir);
    let second = set_gateway(&mut c, "https://aigw-2.example.com").await;
    wait_synced(&mut c, "gitlab-a", second).await;

    // Another instance's name with this certificate: refused, final, and
    // nothing about that instance appears.
    let impostor_state = tls.root.join("gitlab-b-state");
    std::fs::create_dir_all(&impostor_state).unwrap();
    for file in ["agent-cert.pem", "agent-key.pem", "agent-cert.json"] {
        std::fs::copy(state_dir.join(file), impostor_state.join(file)).unwrap();
    }
    let mut impostor = tls.agent("gitlab-b", &[]);
    assert!(!impostor.wait_exit(WAIT).success());
    assert!(
        impostor.log().contains("PermissionDenied: this certificate belongs to instance \"gitlab-a\"; it cannot speak for \"gitlab-b\""),
        "{}",
        impostor.log()
    );
    let missing = c
        .fleet
        .get_instance(GetInstanceRequest {
            instance_id: "gitlab-b".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Deleting the instance revokes its certificate.
    agent.kill9();
    crate::delete_instance(&mut c, "gitlab-a").await.unwrap();
    agent.restart();
    assert!(!agent.wait_exit(WAIT).success());
    assert!(
        agent.log().contains("this client certificate was revoked"),
        "{}",
        agent.log()
    );
    assert!(
        c.fleet
            .get_instance(GetInstanceRequest {
                instance_id: "gitlab-a".into()
            })
            .await
            .is_err()
    );
}

/// One identity per instance: a join token cannot enroll an instance that
/// holds a valid certificate; an operator can, explicitly, and the old
/// certificate stops working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_enrollment_of_an_instance_is_refused_until_an_operator_acts() {
    let tls = tls_daemon(&[]);
    let mut c = tls.clients().await;
    let mut agent = tls.agent("gitlab-a", &[]);
    let revision = set_gateway(&mut c, "https://aigw.example.com").await;
    wait_synced(&mut c, "gitlab-a", revision).await;

    let enroll_token = std::fs::read_to_string(tls.daemon.data_dir().join("enroll.token")).unwrap();
    let taken = tls.enroll("gitlab-a", &enroll_token).await.unwrap_err();
    assert_eq!(taken.code(), tonic::Code::AlreadyExists, "{taken:?}");
    assert_eq!(
        taken.message(),
        "instance \"gitlab-a\" is already enrolled and holds a valid certificate; an operator must delete it (FleetService/DeleteInstance) or re-enroll it with an admin token"
    );
    // The enrolled agent was not disturbed.
    let still = c
        .fleet
        .get_instance(GetInstanceRequest {
            instance_id: "gitlab-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(still.connected);

    // The operator re-enrolls it: the old certificate is revoked.
    let certificate = tls.enroll("gitlab-a", &tls.daemon.token()).await.unwrap();
    assert!(certificate.contains("BEGIN CERTIFICATE"));
    agent.kill9();
    agent.restart();
    assert!(!agent.wait_exit(WAIT).success());
    assert!(
        agent.log().contains("this client certificate was revoked"),
        "{}",
        agent.log()
    );
    assert!(
        tls.daemon
            .log()
            .contains("instance re-enrolled by an operator"),
        "{}",
        tls.daemon.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_over_tls_and_certificates_that_are_refused() {
    let tls = tls_daemon(&["--agent-cert-lifetime-secs", "2"]);
    let auth = format!("authorization: Bearer {}", tls.daemon.token());
    let ok = tls.grpcurl(&["-H", &auth], "duofleet.v1.ModelService/ListModels");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Plaintext against a TLS listener fails.
    let plain = Command::new(grpcurl_path())
        .args([
            "-plaintext",
            "-H",
            &auth,
            &tls.daemon.grpc_addr,
            "duofleet.v1.ModelService/ListModels",
        ])
        .output()
        .unwrap();
    assert!(!plain.status.success());

    // An agent certificate, used with grpcurl -cert -key on an operator RPC.
    let mut c = tls.clients().await;
    let agent = tls.agent("gitlab-a", &[]);
    let revision = set_gateway(&mut c, "https://aigw.example.com").await;
    wait_synced(&mut c, "gitlab-a", revision).await;
    let (cert, key) = (
        agent.state_dir.join("agent-cert.pem"),
        agent.state_dir.join("agent-key.pem"),
    );
    let with_cert = tls.grpcurl(
        &[
            "-cert",
            &cert.display().to_string(),
            "-key",
            &key.display().to_string(),
            "-H",
            &auth,
        ],
        "duofleet.v1.ModelService/ListModels",
    );
    assert!(
        with_cert.status.success(),
        "{}",
        String::from_utf8_lossy(&with_cert.stderr)
    );

    // A certificate from another CA is refused in the TLS handshake. (grpcurl
    // would not even send it: Go offers only certificates of the CAs the
    // server asks for, so this uses a Rust client, which always sends it.)
    let forged = TestCa::new();
    let forged_identity =
        tonic::transport::Identity::from_pem(&forged.server_cert_pem, &forged.server_key_pem);
    let forged_result = async {
        let channel = Endpoint::from_shared(format!("https://{}", tls.daemon.grpc_addr))
            .unwrap()
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca.ca_pem))
                    .identity(forged_identity),
            )
            .unwrap()
            .connect()
            .await?;
        let mut client =
            duofleet_proto::v1::enrollment_service_client::EnrollmentServiceClient::new(channel);
        client
            .renew(duofleet_proto::v1::RenewRequest {
                csr_pem: String::new(),
            })
            .await
            .map_err(|status| Box::new(status) as Box<dyn std::error::Error + Send + Sync>)?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    assert!(
        forged_result.is_err(),
        "a certificate from another CA was accepted"
    );

    // The 2-second certificate is renewed by the agent before it expires;
    // a copy of the first one, once expired, is refused.
    let first = std::fs::read_to_string(&cert).unwrap();
    let expired_copy = tls.root.join("first.pem");
    std::fs::write(&expired_copy, &first).unwrap();
    let deadline = Instant::now() + WAIT;
    while std::fs::read_to_string(&cert).unwrap() == first {
        assert!(
            Instant::now() < deadline,
            "the agent never renewed its certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let old = tls.grpcurl(
        &[
            "-cert",
            &expired_copy.display().to_string(),
            "-key",
            &key.display().to_string(),
            "-H",
            &auth,
        ],
        "duofleet.v1.ModelService/ListModels",
    );
    assert!(!old.status.success(), "an expired certificate was accepted");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_enrolls_as_many_agents_as_it_allows() {
    let tls = tls_daemon(&[]);
    let mut c = tls.clients().await;
    let join = c
        .tokens
        .create_token(duofleet_proto::v1::CreateTokenRequest {
            name: "rack-7".into(),
            role: duofleet_proto::v1::Role::Join as i32,
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            max_uses: 1,
            // What it grants its agents: ring is fixed, region may be set.
            labels: [("ring".to_string(), "stable".to_string())].into(),
            allowed_label_keys: vec!["region".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(join.token.as_ref().unwrap().uses_left, 1);
    let token_file = tls.root.join("rack-7.token");
    std::fs::write(&token_file, &join.secret).unwrap();
    let token_arg = token_file.display().to_string();
    let _first = tls.agent(
        "gitlab-a",
        &[
            "--enroll-token-file",
            &token_arg,
            "--label",
            "ring=canary",
            "--label",
            "region=eu",
            "--label",
            "team=web",
        ],
    );
    let revision = set_gateway(&mut c, "https://aigw.example.com").await;
    let registered = wait_synced(&mut c, "gitlab-a", revision).await;
    let pairs = |list: &[(&str, &str)]| {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(
        registered.labels,
        pairs(&[("region", "eu"), ("ring", "stable")])
    );
    assert_eq!(
        registered.reported_labels,
        pairs(&[("region", "eu"), ("ring", "canary"), ("team", "web")])
    );

    let mut second = tls.agent("gitlab-b", &["--enroll-token-file", &token_arg]);
    assert!(!second.wait_exit(WAIT).success());
    assert!(
        second
            .log()
            .contains("the control plane refused this agent"),
        "{}",
        second.log()
    );
    let left: Vec<String> = c
        .tokens
        .list_tokens(duofleet_proto::v1::ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(left.is_empty(), "a used-up join token is gone: {left:?}");
}

/// duofleetctl speaks TLS like grpcurl: --cacert for the server's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duofleetctl_over_tls() {
    let tls = tls_daemon(&[]);
    let run = |args: &[&str]| {
        Command::new(duofleet_tests::bin("duofleetctl"))
            .args(args)
            .env("DUOFLEET_SERVER", &tls.daemon.grpc_addr)
            .env("DUOFLEET_TOKEN", tls.daemon.token())
            .env_remove("DUOFLEET_TOKEN_FILE")
            .output()
            .unwrap()
    };
    let ok = run(&["--cacert", &tls.ca_file, "get", "models"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("NAME "));
    // Plaintext (the loopback default) against a TLS listener: a clear error.
    let plain = run(&["get", "models"]);
    assert_eq!(plain.status.code(), Some(3));
    // TLS with the wrong CA: refused.
    let other = TestCa::new();
    let other_file = tls.root.join("other-ca.pem");
    other.write_ca(&other_file);
    let wrong = run(&[
        "--cacert",
        &other_file.display().to_string(),
        "get",
        "models",
    ]);
    assert_eq!(wrong.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&wrong.stderr).starts_with("error: "));
}

/// With TLS the HTTP port (probes, /metrics, the dashboard) is HTTPS too,
/// and its cookies are Secure; off loopback without TLS, duofleetd refuses
/// to start unless told --insecure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_port_is_https_with_tls_and_never_plaintext_off_loopback() {
    let tls = tls_daemon(&[]);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(tls.ca.ca_pem.as_bytes()).unwrap())
        .no_proxy()
        .build()
        .unwrap();
    let base = format!("https://{}", tls.daemon.http_addr);
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok\n");
    let login = client.get(format!("{base}/login")).send().await.unwrap();
    let cookie = login
        .headers()
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(cookie.ends_with("; Secure"), "{cookie}");
    // Plain HTTP on that port gets no page.
    let plain = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&tls.daemon.http_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        answer
    };
    assert!(!plain.starts_with(b"HTTP/1.1 200"));

    let dir = tempfile::tempdir().unwrap();
    let refused = Command::new(duofleet_tests::bin("duofleetd"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(
            "refusing to serve the dashboard and /metrics over plaintext HTTP on 0.0.0.0:0"
        ),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
