//! Every OK is on disk: `kill -9` right after the last OK loses nothing,
//! and revision numbers continue after a restart, never reused.

use crate::{create_model, list_models, revision_numbers, watch_fleet};
use duofleet_proto::v1::SetFeatureSettingRequest;
use duofleet_tests::{Daemon, mk};
use std::time::Duration;

const WRITES: u64 = 25;

#[tokio::test]
async fn kill_9_after_the_last_ok_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    for i in 0..WRITES - 1 {
        create_model(&mut c, mk::model(&format!("model-{i:02}"))).await;
    }
    let last = c
        .profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "model-07")),
            ..Default::default()
        })
        .await
        .expect("last write")
        .into_inner();
    assert_eq!(last.revision, WRITES);
    daemon.kill9();

    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    let models = list_models(&mut c).await;
    assert_eq!(models.len() as u64, WRITES - 1);
    assert!(models.iter().all(|m| m.has_api_key));
    let default = c
        .profiles
        .get_profile(duofleet_proto::v1::GetProfileRequest {
            name: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        default.features,
        vec![mk::self_hosted("duo_chat", "model-07")]
    );
    assert_eq!(default.revision, WRITES);

    // Numbers continue: the next write is WRITES + 1, and none repeats.
    let next = create_model(&mut c, mk::model("after-restart")).await;
    assert_eq!(next.revision, WRITES + 1);
    let numbers = revision_numbers(&mut c).await;
    let expected: Vec<u64> = (1..=WRITES + 1).rev().collect();
    assert_eq!(numbers, expected);
}

// Multi-threaded: the client must keep answering HTTP/2 (GOAWAY, PING)
// while this thread waits for the daemon to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    create_model(&mut c, mk::model("kept")).await;
    let mut events = watch_fleet(&mut c).await;
    let first = events
        .message()
        .await
        .unwrap()
        .expect("current revision event");
    assert!(first.event.is_some());

    let status = daemon.stop("TERM");
    assert!(status.success(), "{status}");
    // The stream ends cleanly instead of hanging.
    let end = tokio::time::timeout(Duration::from_secs(10), events.message()).await;
    assert!(matches!(end, Ok(Ok(None)) | Ok(Err(_))), "{end:?}");

    let daemon = Daemon::start(&data);
    assert!(daemon.log().contains("shutting down"), "{}", daemon.log());
    assert!(daemon.log().contains("duofleetd stopped"));
    let mut c = daemon.clients().await;
    let models = list_models(&mut c).await;
    assert_eq!(models.len(), 1);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _first = Daemon::start(&data);
    let stderr = duofleet_tests::start_refused(&data);
    assert!(
        stderr.contains("is another duofleetd using this data dir?"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_running_restores_that_revision() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&dir.path().join("data"));
    let mut c = daemon.clients().await;
    create_model(&mut c, mk::model("kept")).await;
    c.profiles
        .set_feature_setting(SetFeatureSettingRequest {
            profile: String::new(),
            setting: Some(mk::self_hosted("duo_chat", "kept")),
            ..Default::default()
        })
        .await
        .unwrap();
    let backup_dir = dir.path().join("backup-1");
    let auth = format!("authorization: Bearer {}", daemon.token());
    let body = format!(r#"{{"directory": "{}"}}"#, backup_dir.display());
    let out = duofleet_tests::grpcurl(
        &daemon.grpc_addr,
        &["-H", &auth, "-d", &body],
        &["duofleet.v1.BackupService/CreateBackup"],
    );
    assert_eq!(out.exit_code, 0, "{out:?}");
    let backup = out.json();
    assert_eq!(backup["revision"], "2");
    assert!(
        backup["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "secret.key")
    );
    // Refusals: the same directory again, and a relative path.
    let again = duofleet_tests::grpcurl(
        &daemon.grpc_addr,
        &["-H", &auth, "-d", &body],
        &["duofleet.v1.BackupService/CreateBackup"],
    );
    assert!(
        again.stderr.contains("Code: FailedPrecondition")
            && again.stderr.contains("already exists"),
        "{again:?}"
    );
    let relative = duofleet_tests::grpcurl(
        &daemon.grpc_addr,
        &["-H", &auth, "-d", r#"{"directory": "rel"}"#],
        &["duofleet.v1.BackupService/CreateBackup"],
    );
    assert!(
        relative
            .stderr
            .contains("directory: must be an absolute path on the duofleetd host"),
        "{relative:?}"
    );

    create_model(&mut c, mk::model("after-backup")).await;
    assert!(daemon.stop("TERM").success());

    let restored = Daemon::start(&backup_dir);
    let mut c = restored.clients().await;
    let models = list_models(&mut c).await;
    assert_eq!(
        models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["kept"]
    );
    assert!(
        models[0].has_api_key,
        "the sealed key opens with the backed-up secret key"
    );
    assert_eq!(revision_numbers(&mut c).await, [2, 1]);
}

/// `duofleetd check` on a data dir; (exit code, stdout, stderr).
fn check(data: &std::path::Path) -> (i32, String, String) {
    let output = std::process::Command::new(duofleet_tests::bin("duofleetd"))
        .arg("check")
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Lost database files once made duofleetd start empty at revision 0 and
/// reuse revision 1. Against the acknowledged revision it now refuses, and
/// says how to restore; `check` finds the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_database_files_are_refused_never_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    for i in 0..5 {
        create_model(&mut c, mk::model(&format!("model-{i}"))).await;
    }
    assert!(daemon.stop("TERM").success());
    let (code, out, err) = check(&data);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("current revision 5, 5 revision records"),
        "{out}"
    );
    assert!(out.contains("0 problem(s)"), "{out}");

    // The database goes missing (a bad restore, a wiped volume).
    std::fs::remove_dir_all(data.join("db")).unwrap();
    let stderr = duofleet_tests::start_refused(&data);
    assert!(
        stderr.contains("the database holds revision 0, but revision 5 was acknowledged")
            && stderr.contains("Restore the data dir from a backup"),
        "{stderr}"
    );
    // Nothing was written in its place.
    let (code, out, _) = check(&data);
    assert_eq!(code, 1);
    assert!(
        out.contains(
            "DAMAGED revision.hwm: revision 5 was acknowledged, but the database holds only 0"
        ),
        "{out}"
    );
    assert!(out.contains("DAMAGED meta: no schema version"), "{out}");
}

/// Damage in the middle of the data file: the daemon or `check` says so;
/// neither reports a sound database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_bytes_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    for i in 0..20 {
        create_model(&mut c, mk::model(&format!("model-{i}"))).await;
    }
    assert!(daemon.stop("TERM").success());
    let file = data.join("db").join("db");
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 256] {
        *b ^= 0xa5;
    }
    std::fs::write(&file, &bytes).unwrap();
    let (code, out, err) = check(&data);
    assert_ne!(code, 0, "damage went unnoticed:\n{out}{err}");
    assert!(
        out.contains("DAMAGED") || err.contains("cannot open the database"),
        "{out}{err}"
    );
}

/// An OK leaves the daemon only after the write is `fdatasync`ed: sled's
/// own flush ends in `sync_file_range`, which leaves the file's size and
/// the disk's write cache to a later `fsync`. Watched with strace on the
/// running daemon: between the request and the first byte of the answer,
/// the log file of the database (`DATA_DIR/db/db`) is synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_fdatasynced_before_its_ok_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let daemon = Daemon::start(&data);
    let mut c = daemon.clients().await;
    create_model(&mut c, mk::model("warm-up")).await;

    let trace = dir.path().join("strace.log");
    let mut strace = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-yy",
            "-e",
            "trace=fdatasync,fsync,rename,renameat,renameat2,sendto,sendmsg,write,writev",
        ])
        .arg("-o")
        .arg(&trace)
        .args(["-p", &daemon.pid().to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("strace (Debian package strace) is installed by .ci/install-test-tools");
    // strace writes its log as it goes; a first traced call (sled's flusher
    // thread's periodic fsync, twice a second) says it is attached.
    duofleet_tests::wait_for(Duration::from_secs(10), || {
        let log = std::fs::read_to_string(&trace).unwrap_or_default();
        log.contains("fsync(").then_some(())
    })
    .await;

    create_model(&mut c, mk::model("watched")).await;
    let _ = strace.kill();
    let _ = strace.wait();

    let log = std::fs::read_to_string(&trace).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    let log_file = format!("{}>", data.join("db").join("db").display());
    let synced = lines
        .iter()
        .position(|l| l.contains("fdatasync(") && l.contains(&log_file))
        .unwrap_or_else(|| panic!("no fdatasync of {log_file} while a model was created:\n{log}"));
    let high_water = lines
        .iter()
        .position(|l| l.contains("rename") && l.contains("revision.hwm"))
        .unwrap_or_else(|| panic!("no write of revision.hwm while a model was created:\n{log}"));
    let answered = lines
        .iter()
        .position(|l| {
            ["sendto(", "sendmsg(", "write(", "writev("]
                .iter()
                .any(|call| l.contains(call))
                && l.contains("TCP")
        })
        .unwrap_or_else(|| panic!("the answer was never seen leaving:\n{log}"));
    assert!(
        synced < high_water && high_water < answered,
        "the log is synced (line {synced}), then the high-water mark written (line {high_water}), then the OK sent (line {answered}):\n{log}"
    );
}
