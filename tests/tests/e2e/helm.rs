//! deploy/helm/duofleet with the real helm 3.11: lint, and the rendered
//! manifests have what an operator relies on.

use serde_norway::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn helm() -> PathBuf {
    let local = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/bin/helm"));
    local
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("helm"))
}

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/duofleet")
}

fn render(set: &[&str]) -> Vec<Value> {
    let out = template(set);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn template(set: &[&str]) -> std::process::Output {
    let mut command = Command::new(helm());
    command
        .args(["template", "fleet"])
        .arg(chart())
        .args(["--namespace", "duofleet"]);
    for s in set {
        command.args(["--set", s]);
    }
    command
        .output()
        .expect("helm is required (.ci/install-helm)")
}

use serde::Deserialize;

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn container(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]["containers"][0]
}

fn assert_hardened(c: &Value) {
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true), "{c:?}");
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
}

#[test]
fn the_chart_lints_and_renders_a_hardened_control_plane() {
    let lint = Command::new(helm())
        .arg("lint")
        .arg(chart())
        .output()
        .expect("helm");
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );

    let docs = render(&[]);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["Service", "StatefulSet"],
        "the agent is off by default"
    );
    let sts = kind(&docs, "StatefulSet")[0];
    let c = container(sts);
    // Ready while storage writes; alive while the process answers.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
        // The chart serves TLS, and the HTTP port with it.
        assert_eq!(
            c[probe]["httpGet"]["scheme"].as_str(),
            Some("HTTPS"),
            "{probe}"
        );
    }
    assert_hardened(c);
    let claim = &sts["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"].as_str(), Some("data"));
    assert_eq!(
        claim["spec"]["resources"]["requests"]["storage"].as_str(),
        Some("5Gi")
    );
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert_eq!(mounts, ["/var/lib/duofleet", "/etc/duofleet/tls"]);
    let env: Vec<&str> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(env.contains(&"DUOFLEET_TLS_CERT") && env.contains(&"DUOFLEET_TLS_KEY"));
    assert!(c["resources"]["limits"]["memory"].as_str().is_some());
    let service = kind(&docs, "Service")[0];
    let ports: Vec<i64> = service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, [7700, 7701]);
}

#[test]
fn the_agent_gets_rbac_only_in_the_gitlab_namespace() {
    let docs = render(&["agent.enabled=true", "agent.gitlabNamespace=gitlab-prod"]);
    for k in ["ServiceAccount", "Role", "RoleBinding", "Deployment"] {
        assert_eq!(kind(&docs, k).len(), 1, "{k}");
    }
    assert!(kind(&docs, "ClusterRole").is_empty() && kind(&docs, "ClusterRoleBinding").is_empty());
    assert_eq!(
        kind(&docs, "Role")[0]["metadata"]["namespace"].as_str(),
        Some("gitlab-prod")
    );
    let binding = kind(&docs, "RoleBinding")[0];
    assert_eq!(
        binding["metadata"]["namespace"].as_str(),
        Some("gitlab-prod")
    );
    assert_eq!(
        binding["subjects"][0]["namespace"].as_str(),
        Some("duofleet")
    );
    let agent = container(kind(&docs, "Deployment")[0]);
    assert_hardened(agent);
    let env = |name: &str| {
        agent["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .and_then(|e| e["value"].as_str())
            .map(str::to_string)
    };
    assert_eq!(env("DUOFLEET_DEPLOYMENT").as_deref(), Some("helm"));
    assert_eq!(
        env("DUOFLEET_CONTROL_PLANE").as_deref(),
        Some("https://fleet-duofleet:7700")
    );
    assert!(env("DUOFLEET_HELM_COMMAND").unwrap().contains("{values}"));
}

/// Three replicas against an etcd: the store flags, the shared key files
/// copied into each data dir, replicas spread over nodes and disrupted one
/// at a time; and the settings that cannot work are refused by name.
#[test]
fn three_replicas_run_against_an_etcd() {
    let etcd = [
        "controlPlane.replicas=3",
        "controlPlane.store.kind=etcd",
        "controlPlane.store.etcd.endpoints=https://etcd-0.etcd:2379\\,https://etcd-1.etcd:2379",
        "controlPlane.store.etcd.tlsSecretName=etcd-client",
        "controlPlane.store.etcd.mutualTls=true",
        "controlPlane.store.etcd.authSecretName=etcd-auth",
        "controlPlane.sharedKeysSecretName=duofleet-keys",
    ];
    let docs = render(&etcd);
    let sts = kind(&docs, "StatefulSet")[0];
    assert_eq!(sts["spec"]["replicas"].as_i64(), Some(3));
    let c = container(sts);
    let env = |name: &str| {
        c["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some(name))
            .map(|e| e["value"].as_str().map(str::to_string))
    };
    assert_eq!(env("DUOFLEET_STORE"), Some(Some("etcd".into())));
    assert_eq!(
        env("DUOFLEET_ETCD_ENDPOINTS"),
        Some(Some(
            "https://etcd-0.etcd:2379,https://etcd-1.etcd:2379".into()
        ))
    );
    for (name, path) in [
        ("DUOFLEET_ETCD_CA", "/etc/duofleet/etcd/ca.crt"),
        ("DUOFLEET_ETCD_CERT", "/etc/duofleet/etcd/tls.crt"),
        (
            "DUOFLEET_ETCD_PASSWORD_FILE",
            "/etc/duofleet/etcd-auth/password",
        ),
    ] {
        assert_eq!(env(name), Some(Some(path.into())), "{name}");
    }
    // The user comes from the Secret, not from the values.
    assert_eq!(env("DUOFLEET_ETCD_USER"), Some(None));
    let init = &sts["spec"]["template"]["spec"]["initContainers"][0];
    assert_hardened(init);
    assert!(
        init["command"][2]
            .as_str()
            .unwrap()
            .contains("/var/lib/duofleet/")
    );
    let volumes: Vec<&str> = sts["spec"]["template"]["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["secret"]["secretName"].as_str())
        .collect();
    assert_eq!(
        volumes,
        ["duofleet-tls", "duofleet-keys", "etcd-client", "etcd-auth"]
    );
    assert!(
        sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"].is_mapping(),
        "replicas spread over nodes"
    );
    assert_eq!(
        kind(&docs, "Service")[0]["spec"]["sessionAffinity"].as_str(),
        Some("ClientIP"),
        "a browser keeps to the replica that holds its dashboard session"
    );
    let pdb = kind(&docs, "PodDisruptionBudget");
    assert_eq!(pdb.len(), 1);
    assert_eq!(pdb[0]["spec"]["maxUnavailable"].as_i64(), Some(1));
    // The default is one replica on sled, without any of it.
    let single = render(&[]);
    assert!(kind(&single, "PodDisruptionBudget").is_empty());
    assert_eq!(
        container(kind(&single, "StatefulSet")[0])["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"].as_str() == Some("DUOFLEET_STORE"))
            .and_then(|e| e["value"].as_str()),
        Some("sled")
    );

    for (set, says) in [
        (
            vec!["controlPlane.replicas=3"],
            "controlPlane.replicas: more than one replica needs",
        ),
        (
            vec![
                "controlPlane.store.kind=etcd",
                "controlPlane.sharedKeysSecretName=k",
            ],
            "controlPlane.store.etcd.endpoints: required",
        ),
        (
            vec![
                "controlPlane.store.kind=etcd",
                "controlPlane.store.etcd.endpoints=http://etcd:2379",
            ],
            "controlPlane.sharedKeysSecretName: required",
        ),
        (
            vec![
                "controlPlane.store.kind=etcd",
                "controlPlane.store.etcd.endpoints=https://etcd:2379",
                "controlPlane.sharedKeysSecretName=k",
            ],
            "controlPlane.store.etcd.tlsSecretName: required",
        ),
        (
            vec!["controlPlane.store.kind=consul"],
            "controlPlane.store.kind: must be sled or etcd",
        ),
    ] {
        let out = template(&set);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{set:?}: {stderr}"
        );
    }
}
