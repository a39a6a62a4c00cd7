//! Operator tokens: roles, expiry, revocation; the secret shown once and
//! never stored.

use crate::{create_model, fresh_daemon, revision_numbers};
use duofleet_proto::v1::{
    CreateModelRequest, CreateTokenRequest, ListModelsRequest, ListTokensRequest,
    RevokeTokenRequest, Role,
};
use duofleet_tests::{Clients, Daemon, grpcurl, mk};
use std::time::Duration;
use tonic::Code;

async fn as_token(daemon: &Daemon, secret: &str) -> Clients {
    Clients::new(daemon.channel().await, Some(secret.to_string()))
}

fn create(name: &str, role: Role, ttl: Option<prost_types::Duration>) -> CreateTokenRequest {
    CreateTokenRequest {
        name: name.into(),
        role: role as i32,
        ttl,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_read_admins_write_and_revoked_tokens_stop_working() {
    let (dir, daemon) = fresh_daemon();
    let mut admin = daemon.clients().await;

    // Created with grpcurl, as an operator would; the secret is shown once.
    let auth = format!("authorization: Bearer {}", daemon.token());
    let out = grpcurl(
        &daemon.grpc_addr,
        &[
            "-H",
            &auth,
            "-d",
            r#"{"name": "dashboards", "role": "ROLE_VIEWER"}"#,
        ],
        &["duofleet.v1.TokenService/CreateToken"],
    );
    assert_eq!(out.exit_code, 0, "{out:?}");
    let created = out.json();
    let viewer_secret = created["secret"].as_str().unwrap().to_string();
    assert!(viewer_secret.starts_with("duofleet_"));
    assert_eq!(created["token"]["createdBy"], "admin");
    let listed = grpcurl(
        &daemon.grpc_addr,
        &["-H", &auth],
        &["duofleet.v1.TokenService/ListTokens"],
    );
    assert!(
        listed.stdout.contains("dashboards") && !listed.stdout.contains(&viewer_secret),
        "{listed:?}"
    );

    let mut viewer = as_token(&daemon, &viewer_secret).await;
    viewer
        .models
        .list_models(ListModelsRequest {})
        .await
        .expect("a viewer reads");
    let denied = viewer
        .models
        .create_model(CreateModelRequest {
            model: Some(mk::model("m")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "token \"dashboards\" is read-only and cannot create models"
    );
    let denied = viewer
        .tokens
        .create_token(create("sneaky", Role::Admin, None))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(
        revision_numbers(&mut admin).await.is_empty(),
        "a refused write makes no revision"
    );

    // An admin token writes, and its name is the revision's actor.
    let ci = admin
        .tokens
        .create_token(create("ci-pipeline", Role::Admin, None))
        .await
        .unwrap()
        .into_inner();
    let mut ci_clients = as_token(&daemon, &ci.secret).await;
    create_model(&mut ci_clients, mk::model("from-ci")).await;
    let revisions = admin
        .history
        .list_revisions(duofleet_proto::v1::ListRevisionsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .revisions;
    assert_eq!(revisions[0].actor, "ci-pipeline");

    // Tokens survive a restart; revoked ones stop at once.
    let data = daemon.data_dir().to_path_buf();
    assert!(daemon.stop("TERM").success());
    let daemon = Daemon::start(&data);
    let mut admin = daemon.clients().await;
    let mut viewer = as_token(&daemon, &viewer_secret).await;
    viewer
        .models
        .list_models(ListModelsRequest {})
        .await
        .expect("still valid after a restart");
    admin
        .tokens
        .revoke_token(RevokeTokenRequest {
            name: "dashboards".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let gone = viewer
        .models
        .list_models(ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::Unauthenticated);
    let names: Vec<String> = admin
        .tokens
        .list_tokens(ListTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["ci-pipeline"]);

    // The secrets are not in the database files.
    assert!(daemon.stop("TERM").success());
    for (path, bytes) in crate::raw_files(&data.join("db")) {
        for secret in [&viewer_secret, &ci.secret] {
            assert!(
                !crate::contains(&bytes, secret),
                "{path} holds a token secret"
            );
        }
    }
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rules_and_expiry() {
    let (_dir, daemon) = fresh_daemon();
    let mut admin = daemon.clients().await;
    let cases = [
        (
            create("Ops", Role::Viewer, None),
            Code::InvalidArgument,
            "name: must contain only a-z, 0-9 and '-' (got \"Ops\")",
        ),
        (
            create("admin", Role::Viewer, None),
            Code::InvalidArgument,
            "name: \"admin\" is reserved for a token file in the data dir",
        ),
        (
            create("ops", Role::Unspecified, None),
            Code::InvalidArgument,
            "role: must be ROLE_ADMIN, ROLE_VIEWER or ROLE_JOIN",
        ),
        (
            create(
                "ops",
                Role::Viewer,
                Some(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                }),
            ),
            Code::InvalidArgument,
            "ttl: must be positive",
        ),
    ];
    for (request, code, message) in cases {
        let status = admin.tokens.create_token(request).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (code, message));
    }
    admin
        .tokens
        .create_token(create("ops", Role::Viewer, None))
        .await
        .unwrap();
    let taken = admin
        .tokens
        .create_token(create("ops", Role::Viewer, None))
        .await
        .unwrap_err();
    assert_eq!(
        (taken.code(), taken.message()),
        (Code::AlreadyExists, "token \"ops\" already exists")
    );
    let missing = admin
        .tokens
        .revoke_token(RevokeTokenRequest {
            name: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        (missing.code(), missing.message()),
        (Code::NotFound, "token \"nope\" not found")
    );
    let builtin = admin
        .tokens
        .revoke_token(RevokeTokenRequest {
            name: "admin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(builtin.code(), Code::FailedPrecondition);

    let short = admin
        .tokens
        .create_token(create(
            "short-lived",
            Role::Viewer,
            Some(prost_types::Duration {
                seconds: 1,
                nanos: 0,
            }),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(short.token.unwrap().expire_time.is_some());
    let mut clients = as_token(&daemon, &short.secret).await;
    clients
        .models
        .list_models(ListModelsRequest {})
        .await
        .expect("valid before it expires");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let expired = clients
        .models
        .list_models(ListModelsRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        (expired.code(), expired.message()),
        (Code::Unauthenticated, "token \"short-lived\" has expired")
    );
}
