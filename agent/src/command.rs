//! Running `gitlab-ctl reconfigure` or the helm command: through `sh -c`, in
//! its own process group (so a timeout kills the whole Chef run), keeping
//! the last lines of its output for the ack.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;

const TAIL_LINES: usize = 15;
/// What an old gitlab-ctl prints on a failed run that may still exit 0.
const RECONFIGURE_FAILURE: &str = "There was an error running gitlab-ctl reconfigure";

#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub timed_out: bool,
    pub tail: String,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out && !self.tail.contains(RECONFIGURE_FAILURE)
    }

    /// "exit code 1" / "timed out after 30m" / "killed by a signal".
    pub fn describe(&self, timeout: Duration) -> String {
        match (self.timed_out, self.code) {
            (true, _) => format!("timed out after {timeout:?}"),
            (false, Some(0)) => "exit code 0, but it printed that it failed".to_string(),
            (false, Some(code)) => format!("exit code {code}"),
            (false, None) => "killed by a signal".to_string(),
        }
    }
}

/// Runs `command`; with `pid_file`, its process group is recorded there
/// while it runs, so that a later agent can stop it if this one dies first.
pub async fn run(
    command: &str,
    timeout: Duration,
    pid_file: Option<&Path>,
) -> std::io::Result<Outcome> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    if let (Some(path), Some(pid)) = (pid_file, child.id())
        && let Err(e) = crate::state::write_atomic(
            path,
            format!("{pid} {}\n", start_time(pid).unwrap_or_default()).as_bytes(),
            None,
        )
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot record the running command");
    }
    let tail = Arc::new(Mutex::new(VecDeque::with_capacity(TAIL_LINES)));
    let readers = [
        tokio::spawn(collect(child.stdout.take().expect("piped"), tail.clone())),
        tokio::spawn(collect(child.stderr.take().expect("piped"), tail.clone())),
    ];
    let (code, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status?.code(), false),
        Err(_) => {
            if let Some(pid) = child.id() {
                // The whole group: sh, gitlab-ctl and whatever Chef started.
                let _ = Command::new("kill")
                    .args(["-s", "KILL", "--", &format!("-{pid}")])
                    .status()
                    .await;
            }
            let _ = child.kill().await;
            (None, true)
        }
    };
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    }
    if let Some(path) = pid_file {
        let _ = std::fs::remove_file(path);
    }
    let tail = tail
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Outcome {
        code,
        timed_out,
        tail,
    })
}

async fn collect(stream: impl AsyncRead + Unpin, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// When a process started, in clock ticks since boot (/proc/PID/stat, field
/// 22): with the pid it names one process, even after the pid is reused.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Stops a command a previous agent left running (it was killed while the
/// command ran): its whole process group, TERM and then KILL. Returns the
/// group it stopped. A pid that now names another process is left alone.
pub async fn reap_orphan(pid_file: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(pid_file).ok()?;
    let _ = std::fs::remove_file(pid_file);
    let mut parts = text.split_whitespace();
    let pid: u32 = parts.next()?.parse().ok()?;
    let started: u64 = parts.next()?.parse().ok()?;
    if start_time(pid) != Some(started) {
        return None;
    }
    let signal = |name: &'static str| async move {
        Command::new("kill")
            .args(["-s", name, "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if !signal("TERM").await {
        return None;
    }
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !signal("0").await {
            return Some(pid);
        }
    }
    signal("KILL").await;
    Some(pid)
}

/// Quotes a path for `sh`.
pub fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_tail_and_the_exit_code() {
        let out = run(
            "for i in $(seq 1 40); do echo line$i; done; echo oops >&2; exit 3",
            Duration::from_secs(10),
            None,
        )
        .await
        .unwrap();
        assert_eq!(out.code, Some(3));
        assert!(!out.success());
        assert!(out.tail.contains("line40") && out.tail.contains("oops"));
        assert!(!out.tail.contains("line20\n"));
    }

    #[tokio::test]
    async fn a_timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        let cmd = format!(
            "(sleep 2; touch {}) & sleep 30",
            shell_quote(&marker.display().to_string())
        );
        let out = run(&cmd, Duration::from_millis(300), None).await.unwrap();
        assert!(out.timed_out && !out.success());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            !marker.exists(),
            "a child of the timed-out command kept running"
        );
    }

    #[tokio::test]
    async fn an_orphaned_command_group_is_stopped() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("reconfigure.pid");
        let marker = dir.path().join("finished");
        // What a killed agent leaves: a reconfigure in its own group,
        // running on, and its record.
        let orphan = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "(sleep 2; touch {}) & wait",
                shell_quote(&marker.display().to_string())
            ))
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = orphan.id();
        // Reaped when it ends, as init would reap a real orphan.
        let mut orphan = orphan;
        std::thread::spawn(move || orphan.wait());
        std::fs::write(&pid_file, format!("{pid} {}\n", start_time(pid).unwrap())).unwrap();
        assert_eq!(reap_orphan(&pid_file).await, Some(pid));
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!marker.exists(), "the orphan finished its run");
        assert!(!pid_file.exists());
        // A record whose pid names another process now is left alone.
        std::fs::write(&pid_file, format!("{} 1\n", std::process::id())).unwrap();
        assert_eq!(reap_orphan(&pid_file).await, None);
    }

    #[tokio::test]
    async fn old_gitlab_ctl_that_exits_zero_on_failure_is_a_failure() {
        let out = run(
            "echo 'There was an error running gitlab-ctl reconfigure'; exit 0",
            Duration::from_secs(5),
            None,
        )
        .await
        .unwrap();
        assert!(!out.success());
        assert_eq!(
            out.describe(Duration::from_secs(1)),
            "exit code 0, but it printed that it failed"
        );
    }
}
