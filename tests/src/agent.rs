//! Real `duofleet-agent` processes, and the one stand-in this needs: a
//! `gitlab-ctl` (or helm) script that records each call and can be told to
//! fail or to take its time.

use crate::{Daemon, bin};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A fake `gitlab-ctl`/`helm` in its own directory:
/// - every call appends its arguments to `calls.log`;
/// - a `fail` file makes it print GitLab's failure line and exit 1 (as
///   many times as the file says, or always when it is empty);
/// - a `sleep` file (seconds) makes it take that long first;
/// - every call that runs to its end appends to `finished.log`.
pub struct FakeCommand {
    pub dir: PathBuf,
}

impl FakeCommand {
    pub fn new(dir: &Path) -> FakeCommand {
        std::fs::create_dir_all(dir).unwrap();
        let script = dir.join("gitlab-ctl");
        std::fs::write(
            &script,
            r#"#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/calls.log"
if [ -f "$dir/sleep" ]; then sleep "$(cat "$dir/sleep")"; fi
if [ -f "$dir/fail" ]; then
  left=$(cat "$dir/fail")
  if [ "$left" = "1" ]; then rm -f "$dir/fail"; elif [ -n "$left" ]; then echo $((left - 1)) > "$dir/fail"; fi
  echo "Running handlers complete"
  echo "There was an error running gitlab-ctl reconfigure"
  echo "$*" >> "$dir/finished.log"
  exit 1
fi
echo "gitlab Reconfigured!"
echo "$*" >> "$dir/finished.log"
"#,
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeCommand {
            dir: dir.to_path_buf(),
        }
    }

    /// The command line to hand the agent, e.g. "/tmp/x/gitlab-ctl reconfigure".
    pub fn command(&self, args: &str) -> String {
        format!("{} {args}", self.dir.join("gitlab-ctl").display())
    }

    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// How many calls ran to their end (not killed half-way).
    pub fn finished(&self) -> usize {
        std::fs::read_to_string(self.dir.join("finished.log"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Fail the next `times` calls (`None`: every call).
    pub fn fail_next(&self, times: Option<u32>) {
        std::fs::write(
            self.dir.join("fail"),
            times.map(|t| t.to_string()).unwrap_or_default(),
        )
        .unwrap();
    }

    pub fn set_sleep(&self, seconds: Option<u32>) {
        let path = self.dir.join("sleep");
        match seconds {
            Some(s) => std::fs::write(path, s.to_string()).unwrap(),
            None => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A running `duofleet-agent`; SIGKILLed on drop.
pub struct Agent {
    child: Option<Child>,
    pub instance_id: String,
    pub state_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent for `daemon` with fast intervals for tests, plus `args`.
    pub fn start(daemon: &Daemon, instance_id: &str, root: &Path, args: &[String]) -> Agent {
        Agent::start_with_env(daemon, instance_id, root, args, &[])
    }

    /// Like [`Agent::start`], with extra environment (e.g. proxies).
    pub fn start_with_env(
        daemon: &Daemon,
        instance_id: &str,
        root: &Path,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Agent {
        let state_dir = root.join(format!("{instance_id}-state"));
        let mut all: Vec<String> = vec![
            "--instance-id".into(),
            instance_id.into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--health-interval".into(),
            "300ms".into(),
            "--backoff-initial".into(),
            "100ms".into(),
            "--backoff-max".into(),
            "500ms".into(),
        ];
        if !args.iter().any(|a| a == "--control-plane") {
            all.push("--control-plane".into());
            all.push(format!("http://{}", daemon.grpc_addr));
        }
        if !args.iter().any(|a| a == "--enroll-token-file") {
            all.push("--enroll-token-file".into());
            all.push(daemon.data_dir().join("enroll.token").display().to_string());
        }
        all.extend(args.iter().cloned());
        let mut agent = Agent {
            child: None,
            instance_id: instance_id.to_string(),
            log_path: root.join(format!("{instance_id}.agent.log")),
            state_dir,
            args: all,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let child = Command::new(bin("duofleet-agent"))
            .args(&self.args)
            .env("DUOFLEET_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn duofleet-agent");
        self.child = Some(child);
    }

    /// Starts it again with the same flags and state dir.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Sends a signal (e.g. "STOP", "CONT") to the agent.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let sent = Command::new("kill")
            .args(["-s", signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("--- log of agent {}:\n{}", self.instance_id, self.log());
        }
    }
}
