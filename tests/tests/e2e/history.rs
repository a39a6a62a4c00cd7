//! Revisions: listing with pages, the configuration at a revision, and
//! rollback as a new revision.

use crate::{create_model, fresh_daemon, list_models, revision_numbers, watch_fleet};
use duofleet_proto::v1::fleet_event::Event;
use duofleet_proto::v1::{
    ChangeAction, DeleteModelRequest, FeatureSetting, GetProfileRequest, GetRevisionRequest,
    ListRevisionsRequest, Model, ResourceKind, RollbackRequest, SetFeatureSettingRequest,
    UpdateModelRequest,
};
use duofleet_tests::mk;

fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

#[tokio::test]
async fn rollback_restores_models_and_profiles_as_a_new_revision() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let set = |setting: FeatureSetting| SetFeatureSettingRequest {
        profile: String::new(),
        setting: Some(setting),
        ..Default::default()
    };

    create_model(&mut c, mk::model("a")).await; // 1
    c.profiles
        .set_feature_setting(set(mk::self_hosted("duo_chat", "a")))
        .await
        .unwrap(); // 2
    c.models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                name: "a".into(),
                endpoint: "https://vllm-2:8000/v1".into(),
                ..Default::default()
            }),
            update_mask: mask(&["endpoint"]),
            ..Default::default()
        })
        .await
        .unwrap(); // 3
    let at_three = c
        .history
        .get_revision(GetRevisionRequest { revision: 3 })
        .await
        .unwrap()
        .into_inner();

    create_model(&mut c, mk::model("b")).await; // 4
    c.profiles
        .set_feature_setting(set(FeatureSetting {
            feature: "duo_chat".into(),
            ..Default::default()
        }))
        .await
        .unwrap(); // 5: unset
    c.models
        .delete_model(DeleteModelRequest {
            name: "a".into(),
            ..Default::default()
        })
        .await
        .unwrap(); // 6
    // 7: clear b's key with a full replace.
    c.models
        .update_model(UpdateModelRequest {
            model: Some(Model {
                api_key: String::new(),
                ..mk::model("b")
            }),
            update_mask: mask(&["*"]),
            ..Default::default()
        })
        .await
        .unwrap();

    let rollback = c
        .history
        .rollback(RollbackRequest {
            revision: 3,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rollback.revision, 8);
    assert_eq!(rollback.actor, "admin");
    // Configuration comes back; credentials do not: "a" was deleted and
    // returns without a key.
    assert_eq!(
        rollback.summary,
        "rollback to revision 3; a restored without an API key (set it with UpdateModel)"
    );
    let mut changes: Vec<_> = rollback
        .changes
        .iter()
        .map(|ch| (ch.kind(), ch.name.as_str(), ch.action()))
        .collect();
    changes.sort();
    assert_eq!(
        changes,
        [
            (ResourceKind::Model, "a", ChangeAction::Created),
            (ResourceKind::Model, "b", ChangeAction::Deleted),
            (ResourceKind::Profile, "default", ChangeAction::Updated),
        ]
    );

    let models = list_models(&mut c).await;
    assert_eq!(models.len(), 1);
    assert_eq!(models[0].name, "a");
    assert_eq!(models[0].endpoint, "https://vllm-2:8000/v1");
    assert!(!models[0].has_api_key, "a rollback never restores a key");
    assert_eq!(models[0].revision, 8);
    let default = c
        .profiles
        .get_profile(GetProfileRequest {
            name: "default".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(default.features, vec![mk::self_hosted("duo_chat", "a")]);

    // The configuration at 8 equals the one at 3, stamps aside.
    let at_eight = c
        .history
        .get_revision(GetRevisionRequest { revision: 8 })
        .await
        .unwrap()
        .into_inner();
    let content = |r: &duofleet_proto::v1::Revision| {
        let models: Vec<_> = r
            .models
            .iter()
            .map(|m| {
                (
                    m.name.clone(),
                    m.family.clone(),
                    m.endpoint.clone(),
                    m.has_api_key,
                )
            })
            .collect();
        let profiles: Vec<_> = r
            .profiles
            .iter()
            .map(|p| (p.name.clone(), p.ai_gateway_url.clone(), p.features.clone()))
            .collect();
        (models, profiles)
    };
    let (mut models_at_eight, profiles_at_eight) = content(&at_eight);
    let (mut models_at_three, profiles_at_three) = content(&at_three);
    assert_eq!(profiles_at_eight, profiles_at_three);
    assert!(models_at_three[0].3 && !models_at_eight[0].3);
    models_at_eight[0].3 = true;
    models_at_three[0].3 = true;
    assert_eq!(models_at_eight, models_at_three);
    assert_eq!(
        revision_numbers(&mut c).await,
        (1..=8).rev().collect::<Vec<u64>>()
    );
}

#[tokio::test]
async fn list_revisions_pages_newest_first() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    for i in 0..5 {
        create_model(&mut c, mk::model(&format!("m{i}"))).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .history
            .list_revisions(ListRevisionsRequest {
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.revisions.len() <= 2);
        seen.extend(
            page.revisions
                .iter()
                .map(|r| (r.revision, r.summary.clone(), r.actor.clone())),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let expected: Vec<_> = (1..=5u64)
        .rev()
        .map(|r| (r, format!("create model m{}", r - 1), "admin".to_string()))
        .collect();
    assert_eq!(seen, expected);
    let bad = c
        .history
        .list_revisions(ListRevisionsRequest {
            page_size: 2,
            page_token: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        bad.message(),
        "page_token: not a token from ListRevisions; pass next_page_token unchanged"
    );
}

#[tokio::test]
async fn watch_fleet_streams_revisions() {
    let (_dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    create_model(&mut c, mk::model("first")).await;
    let mut events = watch_fleet(&mut c).await;
    create_model(&mut c, mk::model("second")).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let event = events.message().await.unwrap().expect("event");
        match event.event {
            Some(Event::RevisionCreated(r)) => got.push((r.revision, r.summary)),
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(
        got,
        [
            (1, "create model first".to_string()),
            (2, "create model second".to_string())
        ]
    );
}
