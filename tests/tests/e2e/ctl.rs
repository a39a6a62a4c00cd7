//! duofleetctl, the real binary, against a real duofleetd: declarative
//! apply (one revision, dry run, prune, a stale file), diff's exit codes,
//! the export round trip, tables and YAML against golden text, status
//! --check, watch --until-synced with real agents, and bad files.

use crate::agents::{ENV_HASH_RB, linux_agent};
use duofleet_tests::{Daemon, bin};
use std::path::Path;
use std::process::Command;

struct Ctl {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs duofleetctl in `dir` against `daemon`, with the admin token from
/// DUOFLEET_TOKEN_FILE (never on the command line).
fn ctl(daemon: &Daemon, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Ctl {
    let token = daemon.data_dir().join("admin.token");
    let out = Command::new(bin("duofleetctl"))
        .args(args)
        .current_dir(dir)
        .env("DUOFLEET_SERVER", &daemon.grpc_addr)
        .env("DUOFLEET_TOKEN_FILE", token)
        .env_remove("DUOFLEET_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("run duofleetctl");
    Ctl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Like [`ctl`], and it must succeed.
pub(crate) fn ok(daemon: &Daemon, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let run = ctl(daemon, dir, args, env);
    assert_eq!(
        run.code, 0,
        "duofleetctl {args:?}:\n{}\n{}",
        run.stdout, run.stderr
    );
    run.stdout
}

const FLEET: &str = r#"apiVersion: duofleet/v1
models:
  - name: mixtral-prod
    family: mixtral
    endpoint: https://vllm.example.com:8000/v1
    identifier: custom_openai/Mixtral-8x7B-Instruct-v0.1
    apiKey: {fromEnv: MIXTRAL_KEY}
profiles:
  - name: default
    aiGatewayUrl: https://aigw.example.com:5052
    features:
      - {feature: duo_chat, provider: self_hosted, model: mixtral-prod}
      - {feature: code_completions, provider: vendor}
  - name: canary
    selector: {ring: canary}
    priority: 10
    aiGatewayUrl: https://aigw-canary.example.com:5052
"#;

const KEY: (&str, &str) = ("MIXTRAL_KEY", "sk-ctl-secret-0042");

fn revisions(daemon: &Daemon, dir: &Path) -> usize {
    ok(daemon, dir, &["get", "revisions", "-o", "json"], &[])
        .matches("\"revision\":")
        .count()
}

#[test]
fn apply_is_one_revision_with_a_dry_run_a_diff_and_an_export_round_trip() {
    let (dir, daemon) = crate::fresh_daemon();
    let root = dir.path();
    std::fs::write(root.join("fleet.yaml"), FLEET).unwrap();

    // diff: 1 with differences, a unified diff; the key is write-only.
    let diff = ctl(&daemon, root, &["diff", "-f", "fleet.yaml"], &[KEY]);
    assert_eq!(diff.code, 1, "{}{}", diff.stdout, diff.stderr);
    assert!(
        diff.stdout.starts_with("--- current\n+++ fleet.yaml\n"),
        "{}",
        diff.stdout
    );
    assert!(
        diff.stdout
            .contains("+  apiKey: (write-only, will be set)\n"),
        "{}",
        diff.stdout
    );
    assert!(!diff.stdout.contains(KEY.1));

    // The dry run says what would change, and writes nothing.
    let dry = ok(
        &daemon,
        root,
        &["apply", "-f", "fleet.yaml", "--dry-run"],
        &[KEY],
    );
    assert_eq!(
        dry,
        "dry run: would make revision 1: apply: create model mixtral-prod; create profile canary; update profile default
+ model mixtral-prod created
    family: mixtral
    endpoint: https://vllm.example.com:8000/v1
    identifier: custom_openai/Mixtral-8x7B-Instruct-v0.1
    api_key: (set)
+ profile canary created
    ai_gateway_url: https://aigw-canary.example.com:5052
    selector: ring=canary
    priority: 10
~ profile default ai_gateway_url: (none) → https://aigw.example.com:5052
~ profile default features.code_completions: (none) → vendor
~ profile default features.duo_chat: (none) → self_hosted mixtral-prod
"
    );
    assert_eq!(revisions(&daemon, root), 0);

    // The whole file is one revision.
    let applied = ok(&daemon, root, &["apply", "-f", "fleet.yaml"], &[KEY]);
    assert!(
        applied.starts_with("revision 1: apply: create model mixtral-prod;"),
        "{applied}"
    );
    assert_eq!(revisions(&daemon, root), 1);
    assert_eq!(
        ctl(&daemon, root, &["diff", "-f", "fleet.yaml"], &[KEY]).code,
        1,
        "a key in the file is always set again, so it shows"
    );

    // Export, then apply the export: nothing to do, no revision.
    let export = ok(&daemon, root, &["export"], &[]);
    assert!(
        export.ends_with(
            "apiVersion: duofleet/v1
revision: 1
models:
- name: mixtral-prod
  family: mixtral
  endpoint: https://vllm.example.com:8000/v1
  identifier: custom_openai/Mixtral-8x7B-Instruct-v0.1
profiles:
- name: canary
  selector:
    ring: canary
  priority: 10
  aiGatewayUrl: https://aigw-canary.example.com:5052
- name: default
  aiGatewayUrl: https://aigw.example.com:5052
  features:
  - feature: code_completions
    provider: vendor
  - feature: duo_chat
    provider: self_hosted
    model: mixtral-prod
"
        ),
        "{export}"
    );
    assert!(!export.contains(KEY.1));
    std::fs::write(root.join("export.yaml"), &export).unwrap();
    let diff = ctl(&daemon, root, &["diff", "-f", "export.yaml"], &[]);
    assert_eq!(
        (diff.code, diff.stdout.as_str()),
        (0, ""),
        "{}",
        diff.stderr
    );
    assert_eq!(
        ok(&daemon, root, &["apply", "-f", "export.yaml"], &[]),
        "no change: the configuration already matches (revision 1)\n"
    );
    assert_eq!(revisions(&daemon, root), 1);

    // Tables, against golden text.
    assert_eq!(
        ok(&daemon, root, &["get", "models"], &[]),
        "NAME           FAMILY    ENDPOINT                           API KEY   REVISION
mixtral-prod   mixtral   https://vllm.example.com:8000/v1   set       1
"
    );
    assert_eq!(
        ok(&daemon, root, &["get", "profiles"], &[]),
        "NAME      PRIORITY   SELECTOR      GATEWAY                                FEATURES   REVISION
canary    10         ring=canary   https://aigw-canary.example.com:5052   0          1
default   0          -             https://aigw.example.com:5052          2          1
"
    );

    // A change made meanwhile: the old export is refused, naming both
    // revisions; --force applies it anyway, as one more revision.
    ok(
        &daemon,
        root,
        &[
            "set",
            "gateway",
            "canary",
            "https://aigw-canary2.example.com:5052",
        ],
        &[],
    );
    let stale = ctl(&daemon, root, &["apply", "-f", "export.yaml"], &[]);
    assert_eq!(stale.code, 3);
    assert!(
        stale
            .stderr
            .contains("the configuration is at revision 2, not 1")
            && stale.stderr.contains("(Aborted)"),
        "{}",
        stale.stderr
    );
    assert_eq!(revisions(&daemon, root), 2);
    let forced = ok(
        &daemon,
        root,
        &["apply", "-f", "export.yaml", "--force"],
        &[],
    );
    assert!(
        forced.starts_with("revision 3: apply: update profile canary"),
        "{forced}"
    );

    // history show: field by field, old → new.
    assert_eq!(
        ok(&daemon, root, &["history", "show", "2"], &[])
            .lines()
            .skip(1)
            .collect::<Vec<_>>(),
        [
            "~ profile canary ai_gateway_url: https://aigw-canary.example.com:5052 → https://aigw-canary2.example.com:5052"
        ]
    );

    // --prune deletes what the file does not list (never default).
    std::fs::write(
        root.join("only-default.yaml"),
        "apiVersion: duofleet/v1\nprofiles:\n  - name: default\n    aiGatewayUrl: https://aigw.example.com:5052\n",
    )
    .unwrap();
    let pruned = ok(
        &daemon,
        root,
        &["apply", "-f", "only-default.yaml", "--prune"],
        &[],
    );
    assert!(
        pruned.starts_with("revision 4: apply: update profile default; delete profile canary; delete model mixtral-prod"),
        "{pruned}"
    );
    assert_eq!(
        ok(&daemon, root, &["get", "models"], &[]),
        "NAME   FAMILY   ENDPOINT   API KEY   REVISION\n"
    );
}

#[test]
fn bad_files_and_refusals_are_errors_that_say_where() {
    let (dir, daemon) = crate::fresh_daemon();
    let root = dir.path();
    for (text, expected) in [
        (
            "apiVersion: duofleet/v1\nmodels:\n  - name: x\n    famly: mixtral\n",
            "unknown field `famly`, expected one of `name`, `family`, `endpoint`, `identifier`, `provider`, `apiKey` at line 4 column 5",
        ),
        (
            "apiVersion: v2\n",
            "apiVersion must be \"duofleet/v1\" (got \"v2\")",
        ),
        (
            "apiVersion: duofleet/v1\nmodels:\n  - name: x\n    family: mixtral\n    endpoint: https://h/v1\n    apiKey: {fromEnv: NOT_SET_ANYWHERE}\n",
            "model \"x\": apiKey: the environment variable NOT_SET_ANYWHERE is not set",
        ),
        (
            "apiVersion: duofleet/v1\nmodels:\n  - name: x\n    family: mixtral\n    endpoint: ftp://h\n",
            "models[0].endpoint:",
        ),
        (
            "apiVersion: duofleet/v1\nprofiles:\n  - name: default\n    features:\n      - {feature: duo_chat, provider: self_hosted, model: nope}\n",
            "profiles[0].features[0].model: model \"nope\" does not exist",
        ),
    ] {
        std::fs::write(root.join("bad.yaml"), text).unwrap();
        for command in ["apply", "diff"] {
            let run = ctl(&daemon, root, &[command, "-f", "bad.yaml"], &[]);
            assert_eq!(
                run.code, 3,
                "{command} {text}: {}{}",
                run.stdout, run.stderr
            );
            assert!(run.stderr.contains(expected), "{command}: {}", run.stderr);
        }
    }
    assert_eq!(revisions(&daemon, root), 0);
    // The token is never an argument.
    let run = ctl(&daemon, root, &["--token", "x", "get", "models"], &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    // No token anywhere: a clear error.
    let run = Command::new(bin("duofleetctl"))
        .args(["get", "models"])
        .current_dir(root)
        .env("DUOFLEET_SERVER", &daemon.grpc_addr)
        .env_remove("DUOFLEET_TOKEN_FILE")
        .env_remove("DUOFLEET_TOKEN")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&run.stderr).contains("no token: pass --token-file"));
    // The token itself from DUOFLEET_TOKEN works.
    let run = Command::new(bin("duofleetctl"))
        .args(["get", "models"])
        .current_dir(root)
        .env("DUOFLEET_SERVER", &daemon.grpc_addr)
        .env_remove("DUOFLEET_TOKEN_FILE")
        .env("DUOFLEET_TOKEN", daemon.token())
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_check_and_watch_until_synced_follow_real_agents() {
    let (dir, daemon) = crate::fresh_daemon();
    let root = dir.path();
    let (_a, ctl_a, _) = linux_agent(&daemon, root, "gitlab-a", ENV_HASH_RB, &[]);
    let (_b, ctl_b, _) = linux_agent(&daemon, root, "gitlab-b", ENV_HASH_RB, &[]);
    let mut c = daemon.clients().await;
    crate::wait_synced(&mut c, "gitlab-a", 0).await;
    crate::wait_synced(&mut c, "gitlab-b", 0).await;
    std::fs::write(root.join("fleet.yaml"), FLEET).unwrap();
    ok(&daemon, root, &["apply", "-f", "fleet.yaml"], &[KEY]);
    // Converges: exit 0.
    let watched = ctl(
        &daemon,
        root,
        &["watch", "--until-synced", "--timeout", "60s"],
        &[],
    );
    assert_eq!(watched.code, 0, "{}{}", watched.stdout, watched.stderr);
    assert!(
        watched
            .stderr
            .contains("all 2 instances SYNCED at revision 1"),
        "{}",
        watched.stderr
    );
    let status = ctl(&daemon, root, &["status", "--check"], &[]);
    assert_eq!(status.code, 0, "{}", status.stdout);
    assert_eq!(
        status.stdout,
        "INSTANCE   STATE    PROFILE   DESIRED   APPLIED   FAILING TARGETS
gitlab-a   SYNCED   default   1         1         -
gitlab-b   SYNCED   default   1         1         -

2 instances: 2 SYNCED; 0 with failing targets
"
    );
    // One agent takes its time: a short watch times out (exit 2), naming
    // it; a longer one sees it through.
    ctl_a.set_sleep(Some(3));
    ok(
        &daemon,
        root,
        &[
            "set",
            "gateway",
            "default",
            "https://aigw2.example.com:5052",
        ],
        &[],
    );
    let watched = ctl(
        &daemon,
        root,
        &["watch", "--until-synced", "--timeout", "1s"],
        &[],
    );
    assert_eq!(watched.code, 2, "{}{}", watched.stdout, watched.stderr);
    assert!(
        watched.stderr.contains("not yet SYNCED: gitlab-a PENDING"),
        "{}",
        watched.stderr
    );
    ctl_a.set_sleep(None);
    let watched = ctl(
        &daemon,
        root,
        &["watch", "--until-synced", "--timeout", "60s"],
        &[],
    );
    assert_eq!(watched.code, 0, "{}{}", watched.stdout, watched.stderr);
    // One agent's reconfigure fails: watch exits 1, naming it; so does
    // status --check.
    ctl_b.fail_next(Some(1));
    ok(
        &daemon,
        root,
        &[
            "set",
            "gateway",
            "default",
            "https://aigw3.example.com:5052",
        ],
        &[],
    );
    let watched = ctl(
        &daemon,
        root,
        &["watch", "--until-synced", "--timeout", "60s"],
        &[],
    );
    assert_eq!(watched.code, 1, "{}{}", watched.stdout, watched.stderr);
    assert!(
        watched.stderr.contains("gitlab-b FAILED"),
        "{}",
        watched.stderr
    );
    let status = ctl(&daemon, root, &["status", "--check"], &[]);
    assert_eq!(status.code, 1, "{}", status.stdout);
    assert!(
        status.stdout.contains("gitlab-b   FAILED"),
        "{}",
        status.stdout
    );
    // describe instance: what it receives, without the key.
    let described = ok(&daemon, root, &["describe", "instance", "gitlab-a"], &[]);
    assert!(
        described.contains("Receives (revision 3, profile default):"),
        "{described}"
    );
    assert!(
        described.contains(
            "  model             mixtral-prod (mixtral, https://vllm.example.com:8000/v1, key set)"
        ),
        "{described}"
    );
    assert!(!described.contains(KEY.1));
}

#[test]
fn completion_and_man_page() {
    let (dir, daemon) = crate::fresh_daemon();
    let bash = ok(&daemon, dir.path(), &["completion", "bash"], &[]);
    assert!(bash.contains("_duofleetctl()"), "{bash}");
    assert!(bash.contains("apply"));
    let man = ok(&daemon, dir.path(), &["man"], &[]);
    assert!(man.starts_with(".ie"), "{}", &man[..man.len().min(200)]);
    assert!(man.contains("duofleetctl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_resource_commands_labels_tokens_and_output_formats() {
    let (dir, daemon) = crate::fresh_daemon();
    let root = dir.path();
    let env = [("K1", "sk-first-key-77"), ("K2", "sk-second-key-88")];
    ok(
        &daemon,
        root,
        &[
            "create",
            "model",
            "m1",
            "--family",
            "mixtral",
            "--endpoint",
            "https://vllm.example.com:8000/v1",
            "--api-key-from-env",
            "K1",
        ],
        &env,
    );
    ok(
        &daemon,
        root,
        &[
            "create",
            "profile",
            "canary",
            "--selector",
            "ring=canary",
            "--priority",
            "10",
        ],
        &[],
    );
    assert_eq!(
        ok(
            &daemon,
            root,
            &[
                "set",
                "feature",
                "canary",
                "duo_chat",
                "--self-hosted",
                "m1"
            ],
            &[]
        ),
        "profile canary: duo_chat is self_hosted m1 (revision 3)\n"
    );
    assert_eq!(
        ok(
            &daemon,
            root,
            &["set", "feature", "canary", "duo_chat", "--unset"],
            &[]
        ),
        "profile canary: duo_chat is GitLab's default (revision 4)\n"
    );
    // One of the four ways, no more.
    let two = ctl(
        &daemon,
        root,
        &[
            "set",
            "feature",
            "canary",
            "duo_chat",
            "--vendor",
            "--disabled",
        ],
        &[],
    );
    assert_eq!(two.code, 2, "{}", two.stderr);
    // A refusal names the field: exit 3.
    let refused = ctl(
        &daemon,
        root,
        &["set", "feature", "canary", "no_such_feature", "--vendor"],
        &[],
    );
    assert_eq!(refused.code, 3);
    assert!(
        refused.stderr.contains("setting.feature") && refused.stderr.contains("(InvalidArgument)"),
        "{}",
        refused.stderr
    );

    // rotate-key: a new key, never printed.
    let rotated = ok(
        &daemon,
        root,
        &["rotate-key", "m1", "--from-env", "K2"],
        &env,
    );
    assert_eq!(rotated, "model m1: new API key set (revision 5)\n");
    let show = ok(&daemon, root, &["history", "show", "5"], &[]);
    assert!(show.ends_with("~ model m1 api_key: (changed)\n"), "{show}");
    for secret in ["sk-first-key-77", "sk-second-key-88"] {
        assert!(!show.contains(secret));
        assert!(!daemon.log().contains(secret), "a key in the daemon log");
    }

    // delete --dry-run checks, and deletes nothing.
    assert_eq!(
        ok(
            &daemon,
            root,
            &["delete", "profile", "canary", "--dry-run"],
            &[]
        ),
        "dry run: profile canary can be deleted\n"
    );
    let default_delete = ctl(
        &daemon,
        root,
        &["delete", "profile", "default", "--dry-run"],
        &[],
    );
    assert_eq!(default_delete.code, 3);
    assert!(default_delete.stderr.contains("(FailedPrecondition)"));

    // Output formats.
    let json = ok(&daemon, root, &["get", "models", "-o", "json"], &[]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed["models"][0]["name"], "m1");
    assert_eq!(parsed["models"][0]["hasApiKey"], true);
    assert_eq!(parsed["models"][0]["revision"], 5);
    let yaml = ok(&daemon, root, &["get", "profiles", "-o", "yaml"], &[]);
    let parsed: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(parsed["profiles"][0]["selector"]["ring"], "canary");
    let wide = ok(&daemon, root, &["get", "models", "-o", "wide"], &[]);
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .ends_with("IDENTIFIER   PROVIDER   UPDATED"),
        "{wide}"
    );

    // Labels on a real instance: its profile follows.
    let (_agent, _ctl, _) = linux_agent(&daemon, root, "gitlab-a", ENV_HASH_RB, &[]);
    let mut c = daemon.clients().await;
    crate::wait_synced(&mut c, "gitlab-a", 5).await;
    assert_eq!(
        ok(
            &daemon,
            root,
            &["label", "instance", "gitlab-a", "ring=canary", "tier=gold"],
            &[]
        ),
        "instance gitlab-a: labels ring=canary,tier=gold (profile canary)\n"
    );
    assert_eq!(
        ok(
            &daemon,
            root,
            &["label", "instance", "gitlab-a", "ring-"],
            &[]
        ),
        "instance gitlab-a: labels tier=gold (profile default)\n"
    );
    let selected = ok(
        &daemon,
        root,
        &["get", "instances", "-l", "tier=gold", "-o", "json"],
        &[],
    );
    assert!(
        selected.contains("\"instanceId\": \"gitlab-a\""),
        "{selected}"
    );
    let none = ok(
        &daemon,
        root,
        &["get", "instances", "-l", "tier=silver"],
        &[],
    );
    assert_eq!(none.lines().count(), 1, "{none}");

    // Tokens: the secret once, on stdout; then it works, and is revoked.
    let created = ctl(
        &daemon,
        root,
        &["token", "create", "ci", "--role", "viewer", "--ttl", "30d"],
        &[],
    );
    assert_eq!(created.code, 0, "{}", created.stderr);
    let secret = created.stdout.trim().to_string();
    assert!(secret.len() >= 32, "{secret}");
    let listed = ok(&daemon, root, &["token", "list"], &[]);
    assert!(listed.contains("ci     viewer"), "{listed}");
    assert!(!listed.contains(&secret));
    let as_viewer = Command::new(bin("duofleetctl"))
        .args(["get", "models"])
        .env("DUOFLEET_SERVER", &daemon.grpc_addr)
        .env_remove("DUOFLEET_TOKEN_FILE")
        .env("DUOFLEET_TOKEN", &secret)
        .output()
        .unwrap();
    assert!(as_viewer.status.success());
    let write = Command::new(bin("duofleetctl"))
        .args(["delete", "model", "m1"])
        .env("DUOFLEET_SERVER", &daemon.grpc_addr)
        .env_remove("DUOFLEET_TOKEN_FILE")
        .env("DUOFLEET_TOKEN", &secret)
        .output()
        .unwrap();
    assert_eq!(write.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&write.stderr).contains("(PermissionDenied)"));
    ok(&daemon, root, &["token", "revoke", "ci"], &[]);

    // A backup on the daemon's host.
    let target = root.join("backup-1");
    let backup = ok(
        &daemon,
        root,
        &["backup", &target.display().to_string()],
        &[],
    );
    assert!(backup.starts_with("backup of revision 5 in "), "{backup}");
    assert!(target.join("db").exists() || std::fs::read_dir(&target).unwrap().count() > 0);
}

/// `watch`: one readable line per event, as they happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_one_line_per_event() {
    use std::io::{BufRead, BufReader};
    let (dir, daemon) = crate::fresh_daemon();
    let root = dir.path().to_path_buf();
    let mut child = Command::new(bin("duofleetctl"))
        .arg("watch")
        .env("DUOFLEET_SERVER", &daemon.grpc_addr)
        .env("DUOFLEET_TOKEN_FILE", daemon.data_dir().join("admin.token"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watch is subscribed once a change made after it shows up.
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + crate::WAIT;
    let mut n = 0;
    while !lines.iter().any(|l: &String| l.contains("revision ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no revision line: {lines:?}"
        );
        n += 1;
        ok(
            &daemon,
            &root,
            &[
                "set",
                "gateway",
                "default",
                &format!("https://aigw{n}.example.com"),
            ],
            &[],
        );
        lines.extend(rx.recv_timeout(std::time::Duration::from_millis(500)).ok());
    }
    let (_agent, _ctl, _) = linux_agent(&daemon, &root, "gitlab-a", ENV_HASH_RB, &[]);
    while !lines
        .iter()
        .any(|l| l.contains("gitlab-a applied revision"))
    {
        let line = rx.recv_timeout(crate::WAIT).expect("an applied line");
        lines.push(line);
    }
    child.kill().unwrap();
    let _ = child.wait();
    let revision_line = lines.iter().find(|l| l.contains("revision ")).unwrap();
    // "23:01:02  revision 1 by admin: update profile default (ai_gateway_url)"
    assert_eq!(revision_line.as_bytes()[2], b':', "{revision_line}");
    assert!(
        revision_line.ends_with("by admin: update profile default (ai_gateway_url)"),
        "{revision_line}"
    );
    assert!(
        lines.iter().any(|l| l.contains("gitlab-a connected")),
        "{lines:?}"
    );
}

/// A staged apply from the CLI, followed, paused, resumed and watched to
/// its end; WatchFleet tells of each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_with_a_rollout_and_the_rollout_commands() {
    use duofleet_proto::v1::fleet_event::Event;
    use duofleet_proto::v1::{RolloutState, WatchFleetRequest};
    let (dir, daemon) = crate::fresh_daemon();
    let root = dir.path();
    let mut c = daemon.clients().await;
    let mut agents = Vec::new();
    for id in ["gitlab-a", "gitlab-b", "gitlab-c"] {
        agents.push(linux_agent(&daemon, root, id, ENV_HASH_RB, &[]));
    }
    let first = crate::agents::set_gateway(&mut c, "default", "https://aigw-a.example.com").await;
    for id in ["gitlab-a", "gitlab-b", "gitlab-c"] {
        crate::wait_synced(&mut c, id, first).await;
    }
    let mut events = c
        .fleet
        .watch_fleet(WatchFleetRequest {})
        .await
        .unwrap()
        .into_inner();
    std::fs::write(
        root.join("waves.yaml"),
        "waves:\n  - count: 1\n  - percent: 100\ngate:\n  bake: 1s\n  maxFailed: 0\n",
    )
    .unwrap();
    std::fs::write(
        root.join("gateway.yaml"),
        "apiVersion: duofleet/v1\nprofiles:\n  - name: default\n    aiGatewayUrl: https://aigw-b.example.com\n",
    )
    .unwrap();
    let dry = ok(
        &daemon,
        root,
        &[
            "apply",
            "-f",
            "gateway.yaml",
            "--rollout",
            "waves.yaml",
            "--dry-run",
        ],
        &[],
    );
    assert!(
        dry.starts_with("would start rollout r-2: 3 instances in 2 waves"),
        "{dry}"
    );
    let started = ok(
        &daemon,
        root,
        &["apply", "-f", "gateway.yaml", "--rollout", "waves.yaml"],
        &[],
    );
    assert!(
        started.starts_with("started rollout r-2: 3 instances in 2 waves (follow it: duofleetctl rollout status r-2 --watch)\nrevision 2: apply: update profile default"),
        "{started}"
    );
    let list = ok(&daemon, root, &["rollout", "list"], &[]);
    assert!(
        list.lines()
            .nth(1)
            .unwrap()
            .starts_with("r-2   PROGRESSING   2"),
        "{list}"
    );
    assert_eq!(
        ok(
            &daemon,
            root,
            &["rollout", "pause", "r-2", "--reason", "checking dashboards"],
            &[]
        ),
        "rollout r-2 PAUSED: paused by admin: checking dashboards\n"
    );
    let status = ok(&daemon, root, &["rollout", "status", "r-2"], &[]);
    assert!(status.starts_with("rollout r-2: PAUSED (revision 2, from 1; by admin)\nchange:   apply: update profile default\nprofiles: default\nreason:   paused by admin: checking dashboards\nWAVE   STATE"), "{status}");
    // A bad waves file says where.
    std::fs::write(root.join("bad-waves.yaml"), "waves:\n  - precent: 10\n").unwrap();
    let bad = ctl(
        &daemon,
        root,
        &["apply", "-f", "gateway.yaml", "--rollout", "bad-waves.yaml"],
        &[],
    );
    assert_eq!(bad.code, 3);
    assert!(
        bad.stderr.contains("unknown field `precent`"),
        "{}",
        bad.stderr
    );
    assert!(
        ok(&daemon, root, &["rollout", "resume", "r-2"], &[])
            .starts_with("rollout r-2 PROGRESSING")
    );
    let watched = ctl(&daemon, root, &["rollout", "status", "r-2", "--watch"], &[]);
    assert_eq!(watched.code, 0, "{}{}", watched.stdout, watched.stderr);
    assert!(
        watched.stdout.starts_with("rollout r-2: SUCCEEDED"),
        "{}",
        watched.stdout
    );
    // WatchFleet saw it start, pause, resume and succeed.
    let mut states = Vec::new();
    while !states.contains(&RolloutState::Succeeded) {
        let event = tokio::time::timeout(crate::WAIT, events.message())
            .await
            .expect("a fleet event")
            .unwrap()
            .unwrap();
        if let Some(Event::RolloutChanged(r)) = event.event {
            assert_eq!(r.id, "r-2");
            if states.last() != Some(&r.state()) {
                states.push(r.state());
            }
        }
    }
    assert_eq!(
        states,
        [
            RolloutState::Progressing,
            RolloutState::Paused,
            RolloutState::Progressing,
            RolloutState::Succeeded
        ]
    );
}

/// A duofleetd that accepts connections but does not answer (here: stopped
/// with SIGSTOP; the kernel still accepts) does not hang duofleetctl: the
/// call gives up after --request-timeout, exit 3, naming the flag.
#[test]
fn a_daemon_that_does_not_answer_is_given_up_on_after_the_request_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"));
    ok(&daemon, dir.path(), &["get", "models"], &[]);
    let signal = |name: &str| {
        let sent = Command::new("kill")
            .args([name, &daemon.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    let run = ctl(
        &daemon,
        dir.path(),
        &["get", "models", "--request-timeout", "2s"],
        &[],
    );
    let waited = started.elapsed();
    signal("-CONT");
    assert_eq!(run.code, 3, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("did not answer within --request-timeout"),
        "{}",
        run.stderr
    );
    assert!(
        waited >= std::time::Duration::from_secs(2) && waited < std::time::Duration::from_secs(30),
        "gave up after {waited:?}"
    );
    // Answering again, it is answered again.
    ok(&daemon, dir.path(), &["get", "models"], &[]);
    let bad = ctl(
        &daemon,
        dir.path(),
        &["get", "models", "--request-timeout", "soon"],
        &[],
    );
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("--request-timeout"), "{}", bad.stderr);
}
