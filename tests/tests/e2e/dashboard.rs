//! The dashboard in a real headless browser (chromium through
//! chromedriver), against the real daemon and agents probing the fake
//! endpoints: login, the health matrix, filtering, an instance's
//! transitions, a refused token, and no token in any URL. Screenshots of
//! the overview, the matrix and an instance page go to
//! `DUOFLEET_SCREENSHOTS` (default `target/screenshots`).

use crate::{fresh_daemon, wait_instance};
use duofleet_proto::v1::{
    CreateModelRequest, CreateProfileRequest, CreateTokenRequest, HealthState, Model, Profile,
    Role, UpdateProfileRequest,
};
use duofleet_tests::agent::Agent;
use duofleet_tests::browser::Browser;
use duofleet_tests::endpoints::Endpoint;
use duofleet_tests::{Daemon, mk};
use std::path::{Path, PathBuf};

fn agent(daemon: &Daemon, root: &Path, id: &str, ring: &str) -> Agent {
    crate::health::start_agent(daemon, root, id, &["--label", &format!("ring={ring}")])
}

fn model(name: &str, endpoint: &Endpoint) -> Model {
    Model {
        name: name.into(),
        endpoint: format!("{}/v1", endpoint.base),
        ..mk::model(name)
    }
}

fn screenshots() -> PathBuf {
    std::env::var_os("DUOFLEET_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| duofleet_tests::bin_dir().join("../screenshots"))
}

/// A raw HTTP/1.1 request: (status, headers and body).
fn raw(addr: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, response)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let (dir, daemon) = fresh_daemon();
    let mut c = daemon.clients().await;
    let gateway = Endpoint::start(&[]).await;
    let up = Endpoint::start(&["Mixtral-8x7B-Instruct-v0.1"]).await;
    let failing = Endpoint::start(&["Mixtral-8x7B-Instruct-v0.1"]).await;
    for m in [model("m-canary", &up), model("m-main", &failing)] {
        c.models
            .create_model(CreateModelRequest {
                model: Some(m),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    c.profiles
        .update_profile(UpdateProfileRequest {
            profile: Some(Profile {
                name: "default".into(),
                ai_gateway_url: gateway.base.clone(),
                features: vec![mk::self_hosted("duo_chat", "m-main")],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    c.profiles
        .create_profile(CreateProfileRequest {
            profile: Some(Profile {
                name: "canary".into(),
                parent: "default".into(),
                selector: [("ring".to_string(), "canary".to_string())].into(),
                priority: 10,
                features: vec![mk::self_hosted("duo_chat", "m-canary")],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let _a = agent(&daemon, dir.path(), "gitlab-a", "canary");
    let _b = agent(&daemon, dir.path(), "gitlab-b", "main");
    let healthy = |model: &'static str| {
        move |i: &duofleet_proto::v1::Instance| {
            i.health
                .iter()
                .any(|h| h.target == model && h.state() == HealthState::Healthy)
        }
    };
    wait_instance(&mut c, "gitlab-a", "m-canary healthy", healthy("m-canary")).await;
    wait_instance(&mut c, "gitlab-b", "m-main healthy", healthy("m-main")).await;
    // gitlab-b's model goes down.
    failing.stop();
    wait_instance(&mut c, "gitlab-b", "m-main unhealthy", |i| {
        i.health
            .iter()
            .any(|h| h.target == "m-main" && h.state() == HealthState::Unhealthy)
    })
    .await;
    let viewer_token = c
        .tokens
        .create_token(CreateTokenRequest {
            name: "wallboard".into(),
            role: Role::Viewer as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;

    let base = format!("http://{}", daemon.http_addr);
    let browser = Browser::start().await.expect("a headless chromium");
    let mut visited = Vec::new();

    // No session: every page leads to the login page.
    browser.goto(&format!("{base}/health")).await.unwrap();
    let url = browser.current_url().await.unwrap();
    assert!(url.ends_with("/login"), "{url}");
    visited.push(url);

    // A wrong token is refused, and not echoed back.
    browser.fill("#token", "not-a-real-token").await.unwrap();
    browser.click("#signin").await.unwrap();
    assert_eq!(
        browser.text("#problem").await.unwrap(),
        "That token was refused: use a viewer or admin token."
    );
    assert!(!browser.source().await.unwrap().contains("not-a-real-token"));
    visited.push(browser.current_url().await.unwrap());

    // The viewer token signs in.
    browser.goto(&format!("{base}/login")).await.unwrap();
    browser.fill("#token", &viewer_token).await.unwrap();
    browser.click("#signin").await.unwrap();
    let url = browser
        .wait_url(&format!("{base}/"), crate::WAIT)
        .await
        .unwrap();
    assert_eq!(url, format!("{base}/"));
    visited.push(url);
    let counts = browser.text("#counts").await.unwrap();
    assert!(counts.contains("2\ninstances"), "{counts}");
    assert_eq!(
        browser.text("#unreachable").await.unwrap(),
        "1\nwith a target down"
    );
    std::fs::create_dir_all(screenshots()).unwrap();
    std::fs::write(
        screenshots().join("overview.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    // The matrix: the unhealthy model on the right instance, in words.
    browser.goto(&format!("{base}/health")).await.unwrap();
    visited.push(browser.current_url().await.unwrap());
    let down = browser
        .text("tr[data-instance=\"gitlab-b\"] td[data-target=\"m-main\"]")
        .await
        .unwrap();
    assert_eq!(down, "DOWN");
    let ok = browser
        .text("tr[data-instance=\"gitlab-a\"] td[data-target=\"m-canary\"]")
        .await
        .unwrap();
    assert!(ok.starts_with("OK ") && ok.ends_with(" ms"), "{ok}");
    let title = browser
        .attribute(
            "tr[data-instance=\"gitlab-b\"] td[data-target=\"m-main\"]",
            "title",
        )
        .await
        .unwrap()
        .unwrap_or_default();
    assert!(title.contains("Connection refused"), "{title}");
    std::fs::write(
        screenshots().join("matrix.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    // Filtering, through the form.
    browser.goto(&format!("{base}/instances")).await.unwrap();
    browser.fill("#filter-label", "ring=main").await.unwrap();
    browser.click("#filter-apply").await.unwrap();
    // The click returns before the form's page has loaded: read the rows
    // of the new page, not the old one's.
    let filtered = format!("{base}/instances?label=ring%3Dmain&profile=&state=&sort=");
    let url = browser.wait_url(&filtered, crate::WAIT).await.unwrap();
    assert_eq!(url, filtered);
    visited.push(url);
    let rows = browser.texts("#instances tr td:first-child").await.unwrap();
    assert_eq!(rows, ["gitlab-b"]);
    browser
        .goto(&format!(
            "{base}/instances?state=SYNCED&label=ring%3Dcanary"
        ))
        .await
        .unwrap();
    let rows = browser.texts("#instances tr td:first-child").await.unwrap();
    assert_eq!(rows, ["gitlab-a"]);

    // The instance page: the transition, and where values come from.
    browser
        .goto(&format!("{base}/instances/gitlab-b"))
        .await
        .unwrap();
    visited.push(browser.current_url().await.unwrap());
    let transitions = browser.texts("#transitions tr").await.unwrap();
    assert!(
        transitions
            .iter()
            .any(|t| t.contains("m-main") && t.contains("DOWN")),
        "{transitions:?}"
    );
    assert!(
        transitions
            .iter()
            .any(|t| t.contains("m-main") && t.contains("OK")),
        "{transitions:?}"
    );
    browser
        .goto(&format!("{base}/instances/gitlab-a"))
        .await
        .unwrap();
    let effective = browser.text("#effective").await.unwrap();
    assert!(
        effective.contains("AI gateway") && effective.contains("from default"),
        "{effective}"
    );
    assert!(
        browser.source().await.unwrap().contains("<svg"),
        "a latency chart"
    );
    std::fs::write(
        screenshots().join("instance.png"),
        browser.screenshot().await.unwrap(),
    )
    .unwrap();

    // History, models, profiles: read-only pages that render.
    for (path, id) in [
        ("/history", "#revisions"),
        ("/history/1", "#changes"),
        ("/models", "#models"),
    ] {
        browser.goto(&format!("{base}{path}")).await.unwrap();
        visited.push(browser.current_url().await.unwrap());
        assert!(!browser.text(id).await.unwrap().is_empty(), "{path}");
    }

    // No token in any URL, and none in any page.
    for url in &visited {
        assert!(
            !url.contains(&viewer_token) && !url.contains("token="),
            "{url}"
        );
    }
    assert!(!browser.source().await.unwrap().contains(&viewer_token));

    // Logging out ends the session.
    browser.click("nav button").await.unwrap();
    let out = browser
        .wait_url(&format!("{base}/login"), crate::WAIT)
        .await
        .unwrap();
    assert_eq!(out, format!("{base}/login"));
    browser.goto(&format!("{base}/health")).await.unwrap();
    assert!(browser.current_url().await.unwrap().ends_with("/login"));
}

/// The rules a browser does not show: a login without the form's CSRF
/// value is refused, a join token cannot sign in, the session cookie is
/// HttpOnly and SameSite=Strict, and the pages forbid scripts and framing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_need_the_form_and_a_viewer_or_admin_token() {
    let (_dir, daemon) = fresh_daemon();
    let addr = &daemon.http_addr;
    let form = |token: &str, csrf: &str, cookie: &str| {
        let body = format!("token={token}&csrf={csrf}");
        format!(
            "POST /login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n{cookie}Connection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let admin = daemon.token();
    // No CSRF cookie: refused even with the right token.
    let (status, _) = raw(addr, &form(&admin, "abc", ""));
    assert_eq!(status, 403);
    // The enroll (join-like agent) token: refused.
    let enroll = std::fs::read_to_string(daemon.data_dir().join("enroll.token")).unwrap();
    let cookie = "Cookie: duofleet_login=abc\r\n";
    let (status, _) = raw(addr, &form(enroll.trim(), "abc", cookie));
    assert_eq!(status, 401);
    // The admin token: a session cookie, HttpOnly and SameSite=Strict.
    let (status, response) = raw(addr, &form(&admin, "abc", cookie));
    assert_eq!(status, 303, "{response}");
    let set_cookie = response
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: duofleet_session=")
        })
        .expect("a session cookie");
    assert!(
        set_cookie.contains("; HttpOnly; SameSite=Strict; Path=/"),
        "{set_cookie}"
    );
    assert!(!set_cookie.contains(&admin));
    let session = set_cookie
        .split_once('=')
        .unwrap()
        .1
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let (status, page) = raw(
        addr,
        &format!(
            "GET / HTTP/1.1\r\nHost: {addr}\r\nCookie: duofleet_session={session}\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200);
    let lower = page.to_ascii_lowercase();
    assert!(
        lower.contains("content-security-policy: default-src 'none'"),
        "{page}"
    );
    assert!(lower.contains("x-frame-options: deny"));
    assert!(!lower.contains("<script"));
}
