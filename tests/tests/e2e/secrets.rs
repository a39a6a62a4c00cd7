//! API keys are input only: no operator response and no log line carries one.

use crate::{create_model, watch_fleet};
use duofleet_proto::v1::{
    GetModelRequest, GetRevisionRequest, ListModelsRequest, ListRevisionsRequest, Model,
    UpdateModelRequest,
};
use duofleet_tests::{Daemon, DaemonOptions, grpcurl, mk};

#[tokio::test]
async fn api_keys_never_leave_the_daemon() {
    let first_key = "sk-canary-first-7f3a9c";
    let second_key = "sk-canary-rotated-b81d2e";
    let dir = tempfile::tempdir().unwrap();
    // The most verbose logging we offer, so that a leak anywhere shows.
    let options = DaemonOptions {
        env: vec![("DUOFLEET_LOG".into(), "trace".into())],
        ..Default::default()
    };
    let daemon = Daemon::start_with(&dir.path().join("data"), options);
    let mut c = daemon.clients().await;
    let mut responses = Vec::new();

    let created = create_model(
        &mut c,
        Model {
            api_key: first_key.into(),
            ..mk::model("m")
        },
    )
    .await;
    assert!(created.has_api_key);
    responses.push(format!("{created:?}"));
    let updated = c
        .models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: "m".into(),
                api_key: second_key.into(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["api_key".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.has_api_key);
    assert_eq!(updated.revision, 2);
    responses.push(format!("{updated:?}"));
    // A refused request that carries a key.
    let refused = c
        .models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: "m".into(),
                api_key: format!("{first_key}\n"),
                ..Default::default()
            }),
            update_mask: None,
            ..Default::default()
        })
        .await
        .unwrap_err();
    responses.push(refused.message().to_string());
    responses.push(format!(
        "{:?}",
        c.models
            .get_model(GetModelRequest { name: "m".into() })
            .await
            .unwrap()
    ));
    responses.push(format!(
        "{:?}",
        c.models.list_models(ListModelsRequest {}).await.unwrap()
    ));
    responses.push(format!(
        "{:?}",
        c.history
            .list_revisions(ListRevisionsRequest {
                page_size: 10,
                page_token: String::new()
            })
            .await
            .unwrap()
    ));
    for revision in [1, 2] {
        let at = c
            .history
            .get_revision(GetRevisionRequest { revision })
            .await
            .unwrap()
            .into_inner();
        assert!(at.models[0].has_api_key);
        assert!(at.models[0].api_key.is_empty());
        responses.push(format!("{at:?}"));
    }
    let mut events = watch_fleet(&mut c).await;
    responses.push(format!("{:?}", events.message().await.unwrap()));
    let auth = format!("authorization: Bearer {}", daemon.token());
    for (method, body) in [
        ("duofleet.v1.ModelService/ListModels", "{}"),
        (
            "duofleet.v1.HistoryService/GetRevision",
            r#"{"revision": 1}"#,
        ),
    ] {
        let out = grpcurl(&daemon.grpc_addr, &["-H", &auth, "-d", body], &[method]);
        assert_eq!(out.exit_code, 0, "{out:?}");
        responses.push(out.stdout);
    }

    let log = daemon.log();
    assert!(
        log.contains("revision committed"),
        "the log is empty, so the check below proves nothing"
    );
    for key in [first_key, second_key] {
        for response in &responses {
            assert!(!response.contains(key), "API key in a response: {response}");
        }
        assert!(!log.contains(key), "API key in the daemon log");
    }
}
