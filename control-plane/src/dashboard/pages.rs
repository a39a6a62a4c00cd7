//! The dashboard's pages. Every value goes through maud, which escapes it;
//! states are written out in words as well as in colour.

use super::{Dashboard, Viewer};
use crate::diff::{labels, public_field_changes, setting_text};
use crate::effective::{self, Labels};
use axum::http::StatusCode;
use duofleet_proto::v1::{HealthState, Instance, RolloutState, SyncState, TargetKind, WaveState};
use maud::{DOCTYPE, Markup, PreEscaped, html};
use std::collections::{BTreeMap, BTreeSet};

/// Rows per page of the instance list and the matrix.
pub const PAGE: usize = 50;
const MAX_PAGE: usize = 200;

const CSS: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
nav{background:#2b2250;padding:.5em 1em;display:flex;gap:1em;align-items:center}
nav a{color:#fff;text-decoration:none}nav .who{margin-left:auto;color:#ddd}
nav form{display:inline}nav button{background:none;border:1px solid #aaa;color:#fff;cursor:pointer}
main{padding:1em 1.5em}h1{font-size:1.4em}table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eee}.num{text-align:right}
.card{display:inline-block;border:1px solid #ccc;padding:.5em 1em;margin:.25em;background:#fff}
.ok{background:#d9f2d9}.bad{background:#f8d0d0}.warn{background:#fcebc2}.idle{background:#eee}
.card b{display:block;font-size:1.6em}form.filter input,form.filter select{margin-right:.5em}
.error{color:#900}.muted{color:#666}code{background:#f0f0f0;padding:0 .2em}
.bar{display:inline-block;height:.8em;background:#6a5acd}.barbg{display:inline-block;width:10em;height:.8em;background:#ddd}
"#;

fn layout(title: &str, viewer: &Viewer, refresh: bool, body: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                @if refresh { meta http-equiv="refresh" content="15"; }
                title { "duofleet · " (title) }
                style { (PreEscaped(CSS)) }
            }
            body {
                nav {
                    a href="/" { "Overview" }
                    a href="/instances" { "Instances" }
                    a href="/health" { "Health matrix" }
                    a href="/history" { "History" }
                    a href="/models" { "Models" }
                    a href="/profiles" { "Profiles" }
                    span class="who" { "signed in as " (viewer.name) }
                    form method="post" action="/logout" {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        button type="submit" { "Log out" }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
    .into_string()
}

pub fn login(csrf: &str, problem: Option<&str>) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "duofleet · sign in" } style { (PreEscaped(CSS)) } }
            body { main {
                h1 { "duofleet" }
                p { "Sign in with a viewer or admin token (" code { "duofleetctl token create NAME --role viewer" } ")." }
                @if let Some(problem) = problem { p class="error" id="problem" { (problem) } }
                form method="post" action="/login" {
                    input type="hidden" name="csrf" value=(csrf);
                    label { "Token " input type="password" name="token" id="token" autocomplete="off" required; }
                    " "
                    button type="submit" id="signin" { "Sign in" }
                }
            } }
        }
    }
    .into_string()
}

pub fn error(viewer: &Viewer, status: StatusCode, message: &str) -> String {
    layout(
        status.canonical_reason().unwrap_or("Error"),
        viewer,
        false,
        html! { p class="error" { (message) } },
    )
}

fn state_class(state: SyncState) -> &'static str {
    match state {
        SyncState::Synced => "ok",
        SyncState::Failed | SyncState::Drifted | SyncState::Offline => "bad",
        SyncState::Pending | SyncState::WaitingForWindow => "warn",
        SyncState::Unspecified => "idle",
    }
}

fn health_word(state: HealthState) -> &'static str {
    match state {
        HealthState::Healthy => "OK",
        HealthState::Unhealthy => "DOWN",
        HealthState::Unknown => "UNKNOWN",
    }
}

fn health_class(state: HealthState) -> &'static str {
    match state {
        HealthState::Healthy => "ok",
        HealthState::Unhealthy => "bad",
        HealthState::Unknown => "idle",
    }
}

fn time(ts: &Option<prost_types::Timestamp>) -> String {
    ts.map(|t| {
        duofleet_proto::window::timestamp(&t)
            .strftime("%Y-%m-%d %H:%M:%S UTC")
            .to_string()
    })
    .unwrap_or_else(|| "-".into())
}

/// A target as the matrix columns name it: the gateway (whatever its
/// URL), or a model by name.
fn column(kind: TargetKind, target: &str) -> String {
    match kind {
        TargetKind::AiGateway => "AI gateway".into(),
        TargetKind::AiGatewayInternal => "AI gateway (internal)".into(),
        TargetKind::GitlabConnectionCheck => format!("{target} (GitLab check)"),
        _ => target.into(),
    }
}

pub fn overview(d: &Dashboard, viewer: &Viewer) -> String {
    let config = d.store.current();
    let newest = d
        .store
        .list_revisions(None, 1)
        .ok()
        .and_then(|r| r.into_iter().next());
    // One pass: counts by state, and the instances that need attention.
    let mut counts: BTreeMap<&'static str, (usize, &'static str)> = BTreeMap::new();
    let mut unreachable = 0usize;
    let mut attention: Vec<(String, SyncState, String)> = d.registry.scan(|i| {
        let state = i.sync_state();
        let entry = counts
            .entry(state.word())
            .or_insert((0, state_class(state)));
        entry.0 += 1;
        if i.health.iter().any(|h| h.state() == HealthState::Unhealthy) {
            unreachable += 1;
        }
        let trouble = matches!(
            state,
            SyncState::Failed | SyncState::Drifted | SyncState::Offline
        ) || !i.conflict.is_empty();
        trouble.then(|| {
            let why = if !i.conflict.is_empty() {
                format!("conflict: {}", i.conflict)
            } else {
                i.last_error.clone()
            };
            (i.instance_id.clone(), state, why)
        })
    });
    attention.sort_by(|a, b| (a.1 as i32, &a.0).cmp(&(b.1 as i32, &b.0)));
    let total: usize = counts.values().map(|(n, _)| n).sum();
    let rollouts: Vec<_> = d
        .rollouts
        .list()
        .into_iter()
        .filter(|r| matches!(r.state(), RolloutState::Progressing | RolloutState::Paused))
        .collect();
    let body = html! {
        p {
            "Configuration revision " b id="revision" { (config.revision) }
            @if let Some(r) = &newest { ", by " (r.actor) " at " (time(&r.create_time)) ": " (r.summary) }
        }
        div id="counts" {
            div class="card" { b { (total) } "instances" }
            @for (state, (n, class)) in &counts {
                div class={ "card " (class) } { b { (n) } (state) }
            }
            a href="/health" {
                div class={ "card " (if unreachable > 0 { "bad" } else { "ok" }) } id="unreachable" {
                    b { (unreachable) } "with a target down"
                }
            }
        }
        h2 { "Needs attention" }
        @if attention.is_empty() { p class="muted" { "Nothing: no instance is FAILED, DRIFTED, OFFLINE or in conflict." } }
        @else {
            table id="attention" {
                tr { th { "Instance" } th { "State" } th { "Why" } }
                @for (id, state, why) in attention.iter().take(100) {
                    tr {
                        td { a href={ "/instances/" (id) } { (id) } }
                        td class=(state_class(*state)) { (state.word()) }
                        td { (why) }
                    }
                }
            }
            @if attention.len() > 100 { p class="muted" { (attention.len() - 100) " more: see " a href="/instances?state=FAILED" { "the instance list" } } }
        }
        h2 { "Active rollouts" }
        @if rollouts.is_empty() { p class="muted" { "None." } }
        @for r in &rollouts {
            div class="card" id={ "rollout-" (r.id) } {
                a href={ "/rollouts/" (r.id) } { (r.id) } " "
                (r.state().as_str_name().trim_start_matches("ROLLOUT_STATE_"))
                @if !r.reason.is_empty() { div class="error" { (r.reason) } }
                @for w in &r.waves {
                    div {
                        "wave " (w.index + 1) ": " (w.state().as_str_name().trim_start_matches("WAVE_STATE_")) " "
                        (progress(applied_of(w), w.instances.len()))
                        " " (applied_of(w)) "/" (w.instances.len())
                    }
                }
            }
        }
    };
    layout("Fleet overview", viewer, true, body)
}

fn applied_of(w: &duofleet_proto::v1::WaveStatus) -> usize {
    if w.state() == WaveState::Passed {
        w.instances.len()
    } else {
        w.applied as usize
    }
}

fn progress(done: usize, total: usize) -> Markup {
    let width = if total == 0 {
        0
    } else {
        done * 10 / total.max(1)
    };
    html! {
        span class="barbg" title={ (done) " of " (total) } {
            span class="bar" style={ "width:" (width) "em" } {}
        }
    }
}

/// The instance list's and the matrix's filters, sort and page.
#[derive(Debug, Default, serde::Deserialize)]
pub struct ListQuery {
    /// `key=value`; several separated by commas.
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub profile: String,
    /// SYNCED, PENDING, FAILED, DRIFTED, OFFLINE, WAITING_FOR_WINDOW.
    #[serde(default)]
    pub state: String,
    /// instance, state, profile, applied, seen.
    #[serde(default)]
    pub sort: String,
    #[serde(default)]
    pub page: usize,
    #[serde(default)]
    pub size: usize,
}

impl ListQuery {
    fn selector(&self) -> Result<Labels, (StatusCode, String)> {
        self.label
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|pair| {
                pair.split_once('=')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                    .ok_or((
                        StatusCode::BAD_REQUEST,
                        format!("label: {pair:?} is not key=value"),
                    ))
            })
            .collect()
    }

    fn size(&self) -> usize {
        match self.size {
            0 => PAGE,
            n => n.min(MAX_PAGE),
        }
    }

    /// The query string with `page` replaced.
    fn with_page(&self, page: usize) -> String {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        format!(
            "?label={}&profile={}&state={}&sort={}&size={}&page={page}",
            enc(&self.label),
            enc(&self.profile),
            enc(&self.state),
            enc(&self.sort),
            self.size()
        )
    }
}

/// The filtered, sorted page of instances, and how many matched.
fn select(
    d: &Dashboard,
    query: &ListQuery,
) -> Result<(Vec<Instance>, usize), (StatusCode, String)> {
    let selector = query.selector()?;
    let state = query.state.trim().to_ascii_uppercase();
    if !state.is_empty() && SyncState::from_str_name(&format!("SYNC_STATE_{state}")).is_none() {
        return Err((
            StatusCode::BAD_REQUEST,
            format!(
                "state: {state:?} is not SYNCED, PENDING, FAILED, DRIFTED, OFFLINE or WAITING_FOR_WINDOW"
            ),
        ));
    }
    // One pass over the fleet for the keys only; then the page's rows.
    let mut keys: Vec<(i64, String, String)> = d.registry.scan(|i| {
        let matches = selector.iter().all(|(k, v)| i.labels.get(k) == Some(v))
            && (query.profile.is_empty() || i.profile == query.profile)
            && (state.is_empty() || i.sync_state().word() == state);
        matches.then(|| {
            let id = i.instance_id.clone();
            match query.sort.as_str() {
                "state" => (i.sync_state as i64, String::new(), id),
                "profile" => (0, i.profile.clone(), id),
                "applied" => (i.applied_revision as i64, String::new(), id),
                "seen" => (-i.last_seen.map_or(0, |t| t.seconds), String::new(), id),
                _ => (0, String::new(), id),
            }
        })
    });
    keys.sort();
    let total = keys.len();
    let size = query.size();
    let page: Vec<Instance> = keys
        .into_iter()
        .skip(query.page * size)
        .take(size)
        // Only what the pages show: not the health transitions (`peek`
        // has none) nor the sync's items.
        .filter_map(|(_, _, id)| {
            d.registry.peek(&id, |i| Instance {
                gitlab_sync: None,
                ..i.clone()
            })
        })
        .collect();
    Ok((page, total))
}

fn filter_form(action: &str, query: &ListQuery) -> Markup {
    html! {
        form class="filter" method="get" action=(action) {
            label { "Labels " input type="text" name="label" id="filter-label" placeholder="ring=canary" value=(query.label); }
            label { "Profile " input type="text" name="profile" id="filter-profile" value=(query.profile); }
            label { "State "
                select name="state" id="filter-state" {
                    option value="" { "any" }
                    @for s in ["SYNCED", "PENDING", "FAILED", "DRIFTED", "OFFLINE", "WAITING_FOR_WINDOW"] {
                        @if query.state.eq_ignore_ascii_case(s) { option value=(s) selected { (s) } } @else { option value=(s) { (s) } }
                    }
                }
            }
            input type="hidden" name="sort" value=(query.sort);
            button type="submit" id="filter-apply" { "Filter" }
        }
    }
}

fn pager(query: &ListQuery, total: usize) -> Markup {
    let size = query.size();
    let pages = total.div_ceil(size).max(1);
    html! {
        p class="muted" {
            (total) " instances · page " (query.page + 1) " of " (pages) " "
            @if query.page > 0 { a href=(query.with_page(query.page - 1)) { "previous" } " " }
            @if query.page + 1 < pages { a href=(query.with_page(query.page + 1)) id="next" { "next" } }
        }
    }
}

pub fn instances(
    d: &Dashboard,
    viewer: &Viewer,
    query: &ListQuery,
) -> Result<String, (StatusCode, String)> {
    let (rows, total) = select(d, query)?;
    let sort_link = |key: &str, label: &str| {
        let q = ListQuery {
            sort: key.into(),
            page: 0,
            label: query.label.clone(),
            profile: query.profile.clone(),
            state: query.state.clone(),
            size: query.size,
        };
        html! { a href={ "/instances" (q.with_page(0)) } { (label) } }
    };
    let body = html! {
        (filter_form("/instances", query))
        (pager(query, total))
        table id="instances" {
            tr {
                th { (sort_link("instance", "Instance")) } th { (sort_link("state", "State")) }
                th { (sort_link("profile", "Profile")) } th { "Desired" } th { (sort_link("applied", "Applied")) }
                th { "Labels" } th { "Healthy targets" } th { (sort_link("seen", "Last seen")) }
            }
            @for i in &rows {
                tr {
                    td { a href={ "/instances/" (i.instance_id) } { (i.instance_id) } }
                    td class=(state_class(i.sync_state())) { (i.sync_state().word()) }
                    td { (i.profile) }
                    td class="num" { (i.desired_revision) }
                    td class="num" { (i.applied_revision) }
                    td { (labels(&i.labels)) }
                    td class="num" {
                        (i.health.iter().filter(|h| h.state() == HealthState::Healthy).count()) "/" (i.health.len())
                    }
                    td { (time(&i.last_seen)) }
                }
            }
        }
    };
    Ok(layout("Instances", viewer, true, body))
}

pub fn matrix(
    d: &Dashboard,
    viewer: &Viewer,
    query: &ListQuery,
) -> Result<String, (StatusCode, String)> {
    let (rows, total) = select(d, query)?;
    // Columns: the gateway kinds first, then models by name.
    let mut columns: BTreeSet<(i32, String)> = BTreeSet::new();
    for i in &rows {
        for h in &i.health {
            let key = match h.kind() {
                TargetKind::AiGateway | TargetKind::AiGatewayInternal => String::new(),
                _ => h.target.clone(),
            };
            columns.insert((h.kind, key));
        }
    }
    let body = html! {
        p class="muted" { "Each cell is the last probe from that GitLab host: state and latency. A cell links to the instance's page, where the error is." }
        (filter_form("/health", query))
        (pager(query, total))
        table id="matrix" {
            tr {
                th { "Instance" }
                @for (kind, target) in &columns {
                    th { (column(TargetKind::try_from(*kind).unwrap_or_default(), target)) }
                }
            }
            @for i in &rows {
                tr data-instance=(i.instance_id) {
                    td { a href={ "/instances/" (i.instance_id) } { (i.instance_id) } }
                    @for (kind, target) in &columns {
                        @let cell = i.health.iter().find(|h| h.kind == *kind && (target.is_empty() || &h.target == target));
                        @match cell {
                            Some(h) => {
                                td class=(health_class(h.state())) data-target=(column(h.kind(), &h.target)) title=(h.error) {
                                    a href={ "/instances/" (i.instance_id) "#target-" (h.target) } {
                                        (health_word(h.state()))
                                        @if h.state() == HealthState::Healthy { " " (h.latency_ms) " ms" }
                                    }
                                }
                            }
                            None => { td class="idle" { "-" } }
                        }
                    }
                }
            }
        }
    };
    Ok(layout("Health matrix", viewer, true, body))
}

pub fn instance(d: &Dashboard, viewer: &Viewer, id: &str) -> Result<String, (StatusCode, String)> {
    let Some(i) = d.registry.get(id) else {
        return Err((StatusCode::NOT_FOUND, format!("no instance {id:?}")));
    };
    let labels_map: Labels = i.labels.clone();
    let config = d.store.current();
    let e = effective::public_config(&config, &labels_map);
    let from = |field: &str| -> String {
        match e.sources.get(field) {
            Some(source) if *source != e.profile => format!("from {source}"),
            Some(_) => "this profile".into(),
            None => "-".into(),
        }
    };
    let latency = d.registry.latency(id);
    let body = html! {
        table id="summary" {
            tr { th { "State" } td class=(state_class(i.sync_state())) id="state" { (i.sync_state().word()) @if !i.connected { " (not connected)" } } }
            tr { th { "Profile" } td { (i.profile) } }
            tr { th { "Revision" } td { "desired " (i.desired_revision) ", applied " (i.applied_revision) } }
            tr { th { "Hostname" } td { (i.hostname) } }
            tr { th { "GitLab" } td { (i.gitlab_version) } }
            tr { th { "Agent" } td { (i.agent_version) } }
            tr { th { "Labels" } td { (labels(&i.labels)) } }
            @if i.reported_labels != i.labels { tr { th { "Reported labels" } td { (labels(&i.reported_labels)) " (not applied)" } } }
            @if !i.last_error.is_empty() { tr { th { "Last error" } td class="error" id="last-error" { (i.last_error) } } }
            @if !i.conflict.is_empty() { tr { th { "Conflict" } td class="error" { (i.conflict) } } }
        }
        h2 { "What it receives" }
        table id="effective" {
            tr { th { "Setting" } th { "Value" } th { "From" } }
            tr { td { "AI gateway" } td { (e.ai_gateway_url) } td { (from("ai_gateway_url")) } }
            @if !e.ai_gateway_internal_url.is_empty() { tr { td { "AI gateway (internal)" } td { (e.ai_gateway_internal_url) } td { (from("ai_gateway_internal_url")) } } }
            @if let Some(w) = &e.reconfigure_window { tr { td { "Reconfigure window" } td { (duofleet_proto::window::describe(w)) } td { (from("reconfigure_window")) } } }
            @for s in &e.features { tr { td { "feature " (s.feature) } td { (setting_text(s)) } td { (from(&format!("features.{}", s.feature))) } } }
            @for m in &e.models { tr { td { "model " (m.name) } td { (m.family) ", " (m.endpoint) ", key " (if m.has_api_key { "set" } else { "none" }) } td { "-" } } }
        }
        h2 { "Layers" }
        table id="layers" {
            @if let Some(h) = &i.host_sync {
                tr { th { "Host" } td { "applied " (h.applied_revision) @if !h.error.is_empty() { span class="error" { " · " (h.error) } } div class="muted" { (h.detail) } @if h.waiting_until.is_some() { div { "waiting for the window, which opens at " (time(&h.waiting_until)) } } } }
            }
            @if let Some(g) = &i.gitlab_sync {
                tr { th { "GitLab API" } td {
                    (g.detail)
                    @for item in &g.items { div { (item.kind) " " (item.key) ": " (item.state().as_str_name().trim_start_matches("SYNC_ITEM_STATE_")) @if !item.detail.is_empty() { " · " (item.detail) } } }
                } }
            }
        }
        h2 { "Health" }
        table id="health" {
            tr { th { "Target" } th { "State" } th { "Latency" } th { "Error" } th { "Recent latency" } }
            @for h in &i.health {
                tr id={ "target-" (h.target) } {
                    td { (column(h.kind(), &h.target)) @if matches!(h.kind(), TargetKind::AiGateway | TargetKind::AiGatewayInternal) { div class="muted" { (h.target) } } }
                    td class=(health_class(h.state())) { (health_word(h.state())) }
                    td class="num" { (h.latency_ms) " ms" }
                    td { (h.error) }
                    td { (super::svg::latency_chart(latency.iter().find(|(k, _)| k.0 == h.kind && k.1 == h.target).map(|(_, s)| s.as_slice()).unwrap_or(&[]))) }
                }
            }
        }
        h2 { "Transitions" }
        table id="transitions" {
            tr { th { "Time" } th { "Target" } th { "State" } th { "Error" } }
            @for t in i.health_transitions.iter().rev() {
                tr { td { (time(&t.check_time)) } td { (column(t.kind(), &t.target)) } td class=(health_class(t.state())) { (health_word(t.state())) } td { (t.error) } }
            }
        }
    };
    Ok(layout(&format!("Instance {id}"), viewer, true, body))
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct HistoryQuery {
    /// Show revisions below this one.
    #[serde(default)]
    pub before: Option<u64>,
}

pub fn history(
    d: &Dashboard,
    viewer: &Viewer,
    query: &HistoryQuery,
) -> Result<String, (StatusCode, String)> {
    let revisions = d.store.list_revisions(query.before, 51).map_err(|e| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::error::error_chain(&e),
        )
    })?;
    let more = revisions.len() > 50;
    let body = html! {
        table id="revisions" {
            tr { th { "Revision" } th { "Time" } th { "Actor" } th { "Summary" } }
            @for r in revisions.iter().take(50) {
                tr {
                    td { a href={ "/history/" (r.revision) } { (r.revision) } }
                    td { (time(&r.create_time)) } td { (r.actor) } td { (r.summary) }
                }
            }
        }
        @if more { @if let Some(last) = revisions.get(49) { a href={ "/history?before=" (last.revision) } { "older" } } }
    };
    Ok(layout("History", viewer, false, body))
}

pub fn revision(
    d: &Dashboard,
    viewer: &Viewer,
    revision: u64,
) -> Result<String, (StatusCode, String)> {
    let failed = |e: crate::store::StoreError| match &e {
        crate::store::StoreError::Config(crate::error::ConfigError::RevisionNotFound(_)) => {
            (StatusCode::NOT_FOUND, e.to_string())
        }
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            crate::error::error_chain(&e),
        ),
    };
    let record = d.store.revision_record(revision).map_err(failed)?;
    let old = d
        .store
        .config_at_revision(revision.saturating_sub(1))
        .map_err(failed)?;
    let new = d.store.config_at_revision(revision).map_err(failed)?;
    let changes = public_field_changes(&old, &new);
    let body = html! {
        p { "By " (record.actor) " at " (time(&record.create_time)) ": " (record.summary) }
        table id="changes" {
            tr { th { "Resource" } th { "Field" } th { "Old" } th { "New" } }
            @for c in &changes {
                tr {
                    td { (c.kind().as_str_name().trim_start_matches("RESOURCE_KIND_").to_lowercase()) " " (c.name) }
                    td { @if c.field.is_empty() { (c.action().as_str_name().trim_start_matches("CHANGE_ACTION_").to_lowercase()) } @else { (c.field) } }
                    td { (c.old_value) } td { (c.new_value) }
                }
            }
        }
    };
    Ok(layout(&format!("Revision {revision}"), viewer, false, body))
}

pub fn models(d: &Dashboard, viewer: &Viewer) -> String {
    let config = d.store.current();
    let body = html! {
        table id="models" {
            tr { th { "Name" } th { "Family" } th { "Endpoint" } th { "Identifier" } th { "Provider" } th { "API key" } th { "Revision" } }
            @for m in config.models.values() {
                tr { td { (m.name) } td { (m.family) } td { (m.endpoint) } td { (m.identifier) } td { (crate::validate::model_provider(m)) } td { (if m.api_key.is_empty() { "none" } else { "set" }) } td class="num" { (m.revision) } }
            }
        }
    };
    layout("Models", viewer, false, body)
}

pub fn profiles(d: &Dashboard, viewer: &Viewer) -> String {
    let config = d.store.current();
    let body = html! {
        @for p in config.profiles.values() {
            h2 id={ "profile-" (p.name) } { (p.name) }
            table {
                @if !p.parent.is_empty() { tr { th { "Parent" } td { (p.parent) } } }
                tr { th { "Selector" } td { (labels(&p.selector)) } }
                tr { th { "Priority" } td { (p.priority) } }
                tr { th { "AI gateway" } td { (p.ai_gateway_url) } }
                @if !p.ai_gateway_internal_url.is_empty() { tr { th { "Internal gateway" } td { (p.ai_gateway_internal_url) } } }
                @if let Some(w) = &p.reconfigure_window { tr { th { "Reconfigure window" } td { (duofleet_proto::window::describe(w)) } } }
                @for s in &p.features { tr { th { "feature " (s.feature) } td { (setting_text(s)) } } }
                tr { th { "Revision" } td { (p.revision) } }
            }
        }
    };
    layout("Profiles", viewer, false, body)
}

pub fn rollout(d: &Dashboard, viewer: &Viewer, id: &str) -> Result<String, (StatusCode, String)> {
    let r = d
        .rollouts
        .get(id)
        .map_err(|e| (StatusCode::NOT_FOUND, e.to_string()))?;
    let body = html! {
        p { (r.state().as_str_name().trim_start_matches("ROLLOUT_STATE_")) ": revision " (r.revision) " (from " (r.base_revision) ") by " (r.actor) ": " (r.summary) }
        @if !r.reason.is_empty() { p class="error" { (r.reason) } }
        table {
            tr { th { "Wave" } th { "State" } th { "Progress" } th { "Failed" } th { "Regressions" } th { "Waiting for" } th { "Instances" } }
            @for w in &r.waves {
                tr {
                    td { (w.index + 1) }
                    td { (w.state().as_str_name().trim_start_matches("WAVE_STATE_")) }
                    td { (progress(applied_of(w), w.instances.len())) " " (applied_of(w)) "/" (w.instances.len()) }
                    td class="num" { (w.failed) }
                    td { @for reg in &w.regressions { div { (reg) } } }
                    td {
                        @for waiting in &w.waiting { div { (waiting) } }
                        @if (w.waiting_count as usize) > w.waiting.len() { div { "and " (w.waiting_count as usize - w.waiting.len()) " more" } }
                    }
                    td { @for i in &w.instances { a href={ "/instances/" (i) } { (i) } " " } }
                }
            }
        }
    };
    Ok(layout(&format!("Rollout {id}"), viewer, true, body))
}
