//! The read-only fleet dashboard on `--http-listen`: server-rendered HTML
//! (maud escapes everything it is given), no JavaScript, no external
//! assets; pages refresh themselves.
//!
//! Access: a viewer or admin token, entered once in the login form (it
//! posts `token` to `/login`). The token is checked like a gRPC caller's
//! and kept in memory only; the browser gets a random session id in an
//! HttpOnly, SameSite=Strict cookie (Secure when the request came over
//! HTTPS through a proxy). A session ends after 12 hours, at logout, or as
//! soon as its token is revoked or expires. Forms carry a per-session CSRF
//! value (the login form a per-visit one, also in a cookie). Without a
//! session every page answers with a redirect to the login page.

mod pages;
mod svg;

use crate::auth::{Role, Tokens};
use crate::registry::Registry;
use crate::rollout::Rollouts;
use crate::store::Store;
use axum::Router;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SESSION_COOKIE: &str = "duofleet_session";
const LOGIN_CSRF_COOKIE: &str = "duofleet_login";
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions at most; the oldest goes first.
const MAX_SESSIONS: usize = 1000;

/// What the pages read.
#[derive(Clone)]
pub struct Dashboard {
    pub store: Arc<Store>,
    pub registry: Arc<Registry>,
    pub rollouts: Arc<Rollouts>,
    pub tokens: Arc<Tokens>,
    /// The listener serves HTTPS: cookies are Secure.
    https: bool,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
}

#[derive(Clone)]
struct Session {
    /// The token itself, in memory only, to check it again on each page.
    token: String,
    name: String,
    csrf: String,
    created: Instant,
}

/// Who is looking, for the page header.
pub struct Viewer {
    pub name: String,
    pub csrf: String,
}

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the system's random source");
    hex::encode(bytes)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Secure` when the browser reached us over HTTPS (through a proxy).
fn secure(headers: &HeaderMap) -> &'static str {
    match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "; Secure",
        _ => "",
    }
}

impl Dashboard {
    pub fn new(
        store: Arc<Store>,
        registry: Arc<Registry>,
        rollouts: Arc<Rollouts>,
        tokens: Arc<Tokens>,
        https: bool,
    ) -> Dashboard {
        Dashboard {
            store,
            registry,
            rollouts,
            tokens,
            https,
            sessions: Arc::default(),
        }
    }

    /// `Secure` when the browser reached us over HTTPS: this listener's
    /// own, or a proxy's in front of it.
    fn secure(&self, headers: &HeaderMap) -> &'static str {
        if self.https {
            "; Secure"
        } else {
            secure(headers)
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/", get(overview))
            .route("/ui/", get(overview))
            .route("/login", get(login_form).post(login))
            .route("/logout", post(logout))
            .route("/instances", get(instances))
            .route("/instances/{id}", get(instance))
            .route("/health", get(matrix))
            .route("/history", get(history))
            .route("/history/{revision}", get(revision))
            .route("/models", get(models))
            .route("/profiles", get(profiles))
            .route("/rollouts/{id}", get(rollout))
            .with_state(self)
    }

    /// The viewer behind the request's session cookie, when it is valid.
    fn viewer(&self, headers: &HeaderMap) -> Option<Viewer> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(id)?.clone();
        let valid = session.created.elapsed() < SESSION_LIFETIME
            && self
                .tokens
                .authenticate(Some(&format!("Bearer {}", session.token)))
                .is_ok_and(|c| matches!(c.role, Role::Admin | Role::Viewer));
        if !valid {
            sessions.remove(id);
            return None;
        }
        Some(Viewer {
            name: session.name,
            csrf: session.csrf,
        })
    }
}

/// Security headers for every page.
fn page(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// Runs `render` for a logged-in viewer, or sends to the login page.
fn guarded(
    dashboard: &Dashboard,
    headers: &HeaderMap,
    render: impl FnOnce(&Viewer) -> Result<String, (StatusCode, String)>,
) -> Response {
    let Some(viewer) = dashboard.viewer(headers) else {
        return Redirect::to("/login").into_response();
    };
    match render(&viewer) {
        Ok(html) => page(StatusCode::OK, html),
        Err((status, message)) => page(status, pages::error(&viewer, status, &message)),
    }
}

async fn login_form(State(dashboard): State<Dashboard>, headers: HeaderMap) -> Response {
    let csrf = random_hex();
    let mut response = page(StatusCode::OK, pages::login(&csrf, None));
    let cookie = format!(
        "{LOGIN_CSRF_COOKIE}={csrf}; HttpOnly; SameSite=Strict; Path=/login{}",
        dashboard.secure(&headers)
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
    csrf: String,
}

async fn login(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let expected = cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or_default();
    if expected.is_empty() || expected != form.csrf {
        return page(
            StatusCode::FORBIDDEN,
            pages::login(
                &form.csrf,
                Some("The form expired: load the login page again."),
            ),
        );
    }
    let token = form.token.trim().to_string();
    let caller = dashboard
        .tokens
        .authenticate(Some(&format!("Bearer {token}")));
    let caller = match caller {
        Ok(caller) if matches!(caller.role, Role::Admin | Role::Viewer) => caller,
        Ok(_) | Err(_) => {
            dashboard
                .tokens
                .refusals
                .record(None, None, "a refused dashboard login");
            return page(
                StatusCode::UNAUTHORIZED,
                pages::login(
                    &form.csrf,
                    Some("That token was refused: use a viewer or admin token."),
                ),
            );
        }
    };
    let id = random_hex();
    {
        let mut sessions = dashboard.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.created.elapsed() < SESSION_LIFETIME);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.created)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                token,
                name: caller.name.clone(),
                csrf: random_hex(),
                created: Instant::now(),
            },
        );
    }
    tracing::info!(token = %caller.name, "dashboard login");
    let mut response = Redirect::to("/").into_response();
    let cookie = format!(
        "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        SESSION_LIFETIME.as_secs(),
        dashboard.secure(&headers)
    );
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(serde::Deserialize)]
struct LogoutForm {
    csrf: String,
}

async fn logout(
    State(dashboard): State<Dashboard>,
    headers: HeaderMap,
    Form(form): Form<LogoutForm>,
) -> Response {
    if let Some(id) = cookie(&headers, SESSION_COOKIE) {
        let mut sessions = dashboard.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.get(id).is_some_and(|s| s.csrf == form.csrf) {
            sessions.remove(id);
        }
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("duofleet_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    response
}

async fn overview(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    guarded(&d, &headers, |viewer| Ok(pages::overview(&d, viewer)))
}

async fn instances(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<pages::ListQuery>,
) -> Response {
    guarded(&d, &headers, |viewer| pages::instances(&d, viewer, &query))
}

async fn matrix(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<pages::ListQuery>,
) -> Response {
    guarded(&d, &headers, |viewer| pages::matrix(&d, viewer, &query))
}

async fn instance(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    guarded(&d, &headers, |viewer| pages::instance(&d, viewer, &id))
}

async fn history(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Query(query): Query<pages::HistoryQuery>,
) -> Response {
    guarded(&d, &headers, |viewer| pages::history(&d, viewer, &query))
}

async fn revision(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(revision): Path<u64>,
) -> Response {
    guarded(&d, &headers, |viewer| pages::revision(&d, viewer, revision))
}

async fn models(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    guarded(&d, &headers, |viewer| Ok(pages::models(&d, viewer)))
}

async fn profiles(State(d): State<Dashboard>, headers: HeaderMap) -> Response {
    guarded(&d, &headers, |viewer| Ok(pages::profiles(&d, viewer)))
}

async fn rollout(
    State(d): State<Dashboard>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    guarded(&d, &headers, |viewer| pages::rollout(&d, viewer, &id))
}
