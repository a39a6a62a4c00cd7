//! Reading: get, describe, status and history.

use crate::table::{Table, WIDTH};
use crate::{Failure, Kind, One, Outcome, Output, refused, view};
use clap::Subcommand;
use duofleet_control_plane::client::Clients;
use duofleet_control_plane::diff::{labels, setting_text};
use duofleet_proto::v1::{
    ChangeAction, DiffRevisionsRequest, FieldChange, GetInstanceRequest, GetModelRequest,
    GetProfileRequest, HealthState, Instance, ListInstancesRequest, ListModelsRequest,
    ListProfilesRequest, ListRevisionsRequest, ListTokensRequest, SyncState,
};
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Subcommand)]
pub enum HistoryShow {
    /// What one revision changed, field by field.
    Show { revision: u64 },
}

/// `-l k=v` arguments as a selector.
pub fn selector(pairs: &[String]) -> Result<BTreeMap<String, String>, Failure> {
    pairs
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| Failure(format!("selector {pair:?}: write KEY=VALUE")))
        })
        .collect()
}

fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.into()
    }
}

fn health_summary(instance: &Instance) -> String {
    let total = instance.health.len();
    if total == 0 {
        return "-".into();
    }
    let healthy = instance
        .health
        .iter()
        .filter(|h| h.state() == HealthState::Healthy)
        .count();
    format!("{healthy}/{total}")
}

/// The targets of an instance that are not healthy, by name.
fn failing(instance: &Instance) -> String {
    let names: Vec<&str> = instance
        .health
        .iter()
        .filter(|h| h.state() == HealthState::Unhealthy)
        .map(|h| h.target.as_str())
        .collect();
    or_dash(&names.join(","))
}

pub async fn get(
    c: &mut Clients,
    kind: Kind,
    selector_args: &[String],
    output: Output,
) -> Result<Outcome, Failure> {
    let yaml = output == Output::Yaml;
    let structured = matches!(output, Output::Json | Output::Yaml);
    let wide = output == Output::Wide;
    let text = match kind {
        Kind::Models => {
            let models = c
                .models
                .list_models(ListModelsRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .models;
            if structured {
                view::print_list("models", models.iter().map(view::model).collect(), yaml);
                return Ok(Outcome::Done);
            }
            let mut headers = vec!["NAME", "FAMILY", "ENDPOINT", "API KEY", "REVISION"];
            if wide {
                headers.extend(["IDENTIFIER", "PROVIDER", "UPDATED"]);
            }
            let mut table = Table::new(&headers);
            for m in &models {
                let mut row = vec![
                    m.name.clone(),
                    m.family.clone(),
                    m.endpoint.clone(),
                    if m.has_api_key { "set" } else { "none" }.into(),
                    m.revision.to_string(),
                ];
                if wide {
                    row.push(or_dash(&m.identifier));
                    row.push(duofleet_control_plane::validate::model_provider(m).to_string());
                    row.push(m.update_time.as_ref().map_or("-".into(), view::rfc3339));
                }
                table.row(row);
            }
            table.render(if wide { usize::MAX } else { WIDTH })
        }
        Kind::Profiles => {
            let profiles = c
                .profiles
                .list_profiles(ListProfilesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .profiles;
            if structured {
                view::print_list(
                    "profiles",
                    profiles.iter().map(view::profile).collect(),
                    yaml,
                );
                return Ok(Outcome::Done);
            }
            let mut headers = vec![
                "NAME", "PRIORITY", "SELECTOR", "GATEWAY", "FEATURES", "REVISION",
            ];
            if wide {
                headers.extend(["INTERNAL GATEWAY", "TIMEOUT", "AGENT PLATFORM"]);
            }
            let mut table = Table::new(&headers);
            for p in &profiles {
                let mut row = vec![
                    p.name.clone(),
                    p.priority.to_string(),
                    or_dash(&labels(&p.selector)),
                    or_dash(&p.ai_gateway_url),
                    p.features.len().to_string(),
                    p.revision.to_string(),
                ];
                if wide {
                    row.push(or_dash(&p.ai_gateway_internal_url));
                    row.push(match p.ai_gateway_timeout_seconds {
                        0 => "-".into(),
                        s => format!("{s}s"),
                    });
                    row.push(or_dash(&p.duo_agent_platform_service_url));
                }
                table.row(row);
            }
            table.render(if wide { usize::MAX } else { WIDTH })
        }
        Kind::Instances => {
            let instances = list_instances(c, selector_args).await?;
            if structured {
                view::print_list(
                    "instances",
                    instances.iter().map(view::instance).collect(),
                    yaml,
                );
                return Ok(Outcome::Done);
            }
            let mut headers = vec![
                "INSTANCE",
                "STATE",
                "PROFILE",
                "DESIRED",
                "APPLIED",
                "HEALTHY",
                "LAST SEEN",
            ];
            if wide {
                headers.extend(["HOSTNAME", "GITLAB", "AGENT", "LABELS"]);
            }
            let mut table = Table::new(&headers);
            for i in &instances {
                let mut row = vec![
                    i.instance_id.clone(),
                    i.sync_state().word().into(),
                    or_dash(&i.profile),
                    i.desired_revision.to_string(),
                    i.applied_revision.to_string(),
                    health_summary(i),
                    i.last_seen.as_ref().map_or("-".into(), view::rfc3339),
                ];
                if wide {
                    row.push(or_dash(&i.hostname));
                    row.push(or_dash(&i.gitlab_version));
                    row.push(or_dash(&i.agent_version));
                    row.push(or_dash(&labels(&i.labels)));
                }
                table.row(row);
            }
            table.render(if wide { usize::MAX } else { WIDTH })
        }
        Kind::Revisions => {
            let revisions = c
                .history
                .list_revisions(ListRevisionsRequest {
                    page_size: 50,
                    page_token: String::new(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .revisions;
            if structured {
                view::print_list(
                    "revisions",
                    revisions.iter().map(view::revision).collect(),
                    yaml,
                );
                return Ok(Outcome::Done);
            }
            revisions_table(&revisions, wide)
        }
        Kind::Tokens => {
            let tokens = c
                .tokens
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .tokens;
            if structured {
                view::print_list("tokens", tokens.iter().map(view::token).collect(), yaml);
                return Ok(Outcome::Done);
            }
            let mut table = Table::new(&["NAME", "ROLE", "CREATED BY", "EXPIRES", "USES LEFT"]);
            for t in &tokens {
                table.row(vec![
                    t.name.clone(),
                    t.role()
                        .as_str_name()
                        .trim_start_matches("ROLE_")
                        .to_lowercase(),
                    or_dash(&t.created_by),
                    t.expire_time.as_ref().map_or("never".into(), view::rfc3339),
                    match (t.role(), t.uses_left) {
                        (duofleet_proto::v1::Role::Join, 0) => "unlimited".into(),
                        (duofleet_proto::v1::Role::Join, n) => n.to_string(),
                        _ => "-".into(),
                    },
                ]);
            }
            table.render(WIDTH)
        }
    };
    print!("{text}");
    Ok(Outcome::Done)
}

async fn list_instances(
    c: &mut Clients,
    selector_args: &[String],
) -> Result<Vec<Instance>, Failure> {
    Ok(c.fleet
        .list_instances(ListInstancesRequest {
            selector: selector(selector_args)?,
        })
        .await
        .map_err(refused)?
        .into_inner()
        .instances)
}

fn revisions_table(revisions: &[duofleet_proto::v1::Revision], wide: bool) -> String {
    let mut table = Table::new(&["REVISION", "TIME", "ACTOR", "SUMMARY"]);
    for r in revisions {
        table.row(vec![
            r.revision.to_string(),
            r.create_time.as_ref().map_or("-".into(), view::rfc3339),
            r.actor.clone(),
            r.summary.clone(),
        ]);
    }
    table.render(if wide { usize::MAX } else { WIDTH })
}

pub async fn describe(
    c: &mut Clients,
    kind: One,
    name: &str,
    output: Output,
) -> Result<Outcome, Failure> {
    let yaml = output == Output::Yaml;
    let structured = matches!(output, Output::Json | Output::Yaml);
    let mut out = String::new();
    match kind {
        One::Model => {
            let m = c
                .models
                .get_model(GetModelRequest { name: name.into() })
                .await
                .map_err(refused)?
                .into_inner();
            if structured {
                view::print_value(&view::model(&m), yaml);
                return Ok(Outcome::Done);
            }
            let used_by: Vec<String> = c
                .profiles
                .list_profiles(ListProfilesRequest {})
                .await
                .map_err(refused)?
                .into_inner()
                .profiles
                .iter()
                .flat_map(|p| {
                    p.features
                        .iter()
                        .filter(|s| s.model == m.name)
                        .map(move |s| format!("{} ({})", p.name, s.feature))
                })
                .collect();
            let _ = writeln!(out, "Name:        {}", m.name);
            let _ = writeln!(out, "Family:      {}", m.family);
            let _ = writeln!(out, "Endpoint:    {}", m.endpoint);
            let _ = writeln!(out, "Identifier:  {}", or_dash(&m.identifier));
            let inferred = if m.provider.is_empty() {
                " (from the identifier)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "Provider:    {}{inferred}",
                duofleet_control_plane::validate::model_provider(&m)
            );
            let _ = writeln!(
                out,
                "API key:     {}",
                if m.has_api_key { "set" } else { "none" }
            );
            let _ = writeln!(out, "Revision:    {}", m.revision);
            let _ = writeln!(out, "Used by:     {}", or_dash(&used_by.join(", ")));
        }
        One::Profile => {
            let p = c
                .profiles
                .get_profile(GetProfileRequest { name: name.into() })
                .await
                .map_err(refused)?
                .into_inner();
            if structured {
                view::print_value(&view::profile(&p), yaml);
                return Ok(Outcome::Done);
            }
            let _ = writeln!(out, "Name:              {}", p.name);
            if !p.parent.is_empty() {
                let _ = writeln!(
                    out,
                    "Parent:            {} (inherits what this profile does not set)",
                    p.parent
                );
            }
            let _ = writeln!(out, "Selector:          {}", or_dash(&labels(&p.selector)));
            let _ = writeln!(out, "Priority:          {}", p.priority);
            let _ = writeln!(out, "Gateway:           {}", or_dash(&p.ai_gateway_url));
            let _ = writeln!(
                out,
                "Internal gateway:  {}",
                or_dash(&p.ai_gateway_internal_url)
            );
            if p.ai_gateway_timeout_seconds > 0 {
                let _ = writeln!(out, "Gateway timeout:   {}s", p.ai_gateway_timeout_seconds);
            }
            if !p.duo_agent_platform_service_url.is_empty() {
                let _ = writeln!(
                    out,
                    "Agent platform:    {}",
                    p.duo_agent_platform_service_url
                );
            }
            if let Some(w) = &p.reconfigure_window {
                let _ = writeln!(
                    out,
                    "Window:            {}",
                    duofleet_proto::window::describe(w)
                );
            }
            let _ = writeln!(out, "Revision:          {}", p.revision);
            let _ = writeln!(out, "Features:");
            if p.features.is_empty() {
                let _ = writeln!(out, "  (none: GitLab's defaults)");
            }
            for s in &p.features {
                let _ = writeln!(out, "  {:<36} {}", s.feature, setting_text(s));
            }
        }
        One::Instance => {
            let i = c
                .fleet
                .get_instance(GetInstanceRequest {
                    instance_id: name.into(),
                })
                .await
                .map_err(refused)?
                .into_inner();
            if structured {
                view::print_value(&view::instance(&i), yaml);
                return Ok(Outcome::Done);
            }
            describe_instance(&mut out, &i);
        }
    }
    print!("{out}");
    Ok(Outcome::Done)
}

fn describe_instance(out: &mut String, i: &Instance) {
    let _ = writeln!(out, "Instance:    {}", i.instance_id);
    let _ = writeln!(out, "Hostname:    {}", or_dash(&i.hostname));
    let _ = writeln!(
        out,
        "Deployment:  {}",
        i.deployment()
            .as_str_name()
            .trim_start_matches("DEPLOYMENT_")
            .to_lowercase()
            .replace('_', "-")
    );
    let _ = writeln!(out, "GitLab:      {}", or_dash(&i.gitlab_version));
    let _ = writeln!(out, "Agent:       {}", or_dash(&i.agent_version));
    let _ = writeln!(out, "Labels:      {}", or_dash(&labels(&i.labels)));
    if i.reported_labels != i.labels {
        let _ = writeln!(
            out,
            "Reported:    {} (the agent's; not applied)",
            or_dash(&labels(&i.reported_labels))
        );
    }
    let _ = writeln!(
        out,
        "State:       {} ({})",
        i.sync_state().word(),
        if i.connected {
            "connected"
        } else {
            "not connected"
        }
    );
    let _ = writeln!(
        out,
        "Revision:    desired {}, applied {}",
        i.desired_revision, i.applied_revision
    );
    if let Some(host) = &i.host_sync {
        let _ = writeln!(
            out,
            "Host layer:  applied {}{}",
            host.applied_revision,
            if host.error.is_empty() {
                String::new()
            } else {
                format!(", error: {}", host.error)
            }
        );
        if !host.detail.is_empty() {
            let _ = writeln!(out, "             {}", host.detail);
        }
    }
    if let Some(api) = &i.gitlab_sync {
        let _ = writeln!(
            out,
            "API layer:   {}",
            if api.enabled {
                format!("applied {} ({})", api.applied_revision, api.detail)
            } else {
                or_dash(&api.detail)
            }
        );
        for item in &api.items {
            let _ = writeln!(
                out,
                "  {:<8} {:<36} {}{}",
                item.kind,
                item.key,
                item.state()
                    .as_str_name()
                    .trim_start_matches("SYNC_ITEM_STATE_"),
                if item.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", item.detail)
                }
            );
        }
    }
    if !i.last_error.is_empty() {
        let _ = writeln!(out, "Last error:  {}", i.last_error);
    }
    if !i.conflict.is_empty() {
        let _ = writeln!(out, "Conflict:    {}", i.conflict);
    }
    if let Some(e) = &i.effective {
        // "(from default)" where a value is inherited.
        let from = |field: &str| match e.sources.get(field) {
            Some(source) if *source != e.profile => format!("  (from {source})"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "Receives (revision {}, profile {}):",
            e.revision, e.profile
        );
        let _ = writeln!(
            out,
            "  gateway           {}{}",
            or_dash(&e.ai_gateway_url),
            from("ai_gateway_url")
        );
        if !e.ai_gateway_internal_url.is_empty() {
            let _ = writeln!(
                out,
                "  internal gateway  {}{}",
                e.ai_gateway_internal_url,
                from("ai_gateway_internal_url")
            );
        }
        if let Some(w) = &e.reconfigure_window {
            let _ = writeln!(
                out,
                "  window            {}{}",
                duofleet_proto::window::describe(w),
                from("reconfigure_window")
            );
        }
        for m in &e.models {
            let _ = writeln!(
                out,
                "  model             {} ({}, {}, key {})",
                m.name,
                m.family,
                m.endpoint,
                if m.has_api_key { "set" } else { "none" }
            );
        }
        for s in &e.features {
            let _ = writeln!(
                out,
                "  feature           {:<36} {}{}",
                s.feature,
                setting_text(s),
                from(&format!("features.{}", s.feature))
            );
        }
    }
    let _ = writeln!(out, "Health:");
    if i.health.is_empty() {
        let _ = writeln!(out, "  (no report yet)");
    }
    for h in &i.health {
        let _ = writeln!(
            out,
            "  {:<10} {:<44} {:>6}  {}",
            h.state().as_str_name().trim_start_matches("HEALTH_STATE_"),
            h.target,
            format!("{}ms", h.latency_ms),
            h.error
        );
    }
    if !i.health_transitions.is_empty() {
        let _ = writeln!(out, "Recent transitions:");
        for h in i.health_transitions.iter().rev().take(10) {
            let _ = writeln!(
                out,
                "  {}  {:<44} {}",
                h.check_time.as_ref().map_or("-".into(), view::rfc3339),
                h.target,
                h.state().as_str_name().trim_start_matches("HEALTH_STATE_")
            );
        }
    }
}

pub async fn status(
    c: &mut Clients,
    check: bool,
    selector_args: &[String],
    output: Output,
) -> Result<Outcome, Failure> {
    let instances = list_instances(c, selector_args).await?;
    if matches!(output, Output::Json | Output::Yaml) {
        view::print_list(
            "instances",
            instances.iter().map(view::instance).collect(),
            output == Output::Yaml,
        );
    } else {
        let mut table = Table::new(&[
            "INSTANCE",
            "STATE",
            "PROFILE",
            "DESIRED",
            "APPLIED",
            "FAILING TARGETS",
        ]);
        for i in &instances {
            table.row(vec![
                i.instance_id.clone(),
                i.sync_state().word().into(),
                or_dash(&i.profile),
                i.desired_revision.to_string(),
                i.applied_revision.to_string(),
                failing(i),
            ]);
        }
        print!("{}", table.render(WIDTH));
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for i in &instances {
            *counts.entry(i.sync_state().word()).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
        let unhealthy = instances
            .iter()
            .filter(|i| i.health.iter().any(|h| h.state() == HealthState::Unhealthy))
            .count();
        println!(
            "\n{} instance{}: {}; {unhealthy} with failing targets",
            instances.len(),
            if instances.len() == 1 { "" } else { "s" },
            if parts.is_empty() {
                "none".into()
            } else {
                parts.join(", ")
            },
        );
    }
    let in_trouble = instances.iter().any(|i| {
        matches!(
            i.sync_state(),
            SyncState::Failed | SyncState::Drifted | SyncState::Offline
        )
    });
    Ok(if check && in_trouble {
        Outcome::Negative
    } else {
        Outcome::Done
    })
}

pub async fn history(
    c: &mut Clients,
    show: Option<HistoryShow>,
    limit: u32,
    output: Output,
) -> Result<Outcome, Failure> {
    let structured = matches!(output, Output::Json | Output::Yaml);
    match show {
        None => {
            let revisions = c
                .history
                .list_revisions(ListRevisionsRequest {
                    page_size: limit.min(1000) as i32,
                    page_token: String::new(),
                })
                .await
                .map_err(refused)?
                .into_inner()
                .revisions;
            if structured {
                view::print_list(
                    "revisions",
                    revisions.iter().map(view::revision).collect(),
                    output == Output::Yaml,
                );
            } else {
                print!("{}", revisions_table(&revisions, output == Output::Wide));
            }
        }
        Some(HistoryShow::Show { revision }) => {
            if revision == 0 {
                return Err(Failure(
                    "revision 0 is the empty start; show 1 or later".into(),
                ));
            }
            let record = c
                .history
                .get_revision(duofleet_proto::v1::GetRevisionRequest { revision })
                .await
                .map_err(refused)?
                .into_inner();
            let diff = c
                .history
                .diff_revisions(DiffRevisionsRequest {
                    from: revision - 1,
                    to: revision,
                })
                .await
                .map_err(refused)?
                .into_inner();
            println!(
                "revision {} by {} at {}: {}",
                record.revision,
                record.actor,
                record
                    .create_time
                    .as_ref()
                    .map_or("-".into(), view::rfc3339),
                record.summary
            );
            print!("{}", field_changes_text(&diff.changes));
        }
    }
    Ok(Outcome::Done)
}

/// Field changes, one per line: `model mixtral-prod endpoint: old → new`.
pub fn field_changes_text(changes: &[FieldChange]) -> String {
    let mut out = String::new();
    for change in changes {
        let kind = change
            .kind()
            .as_str_name()
            .trim_start_matches("RESOURCE_KIND_")
            .to_lowercase();
        let line = match (change.action(), change.field.as_str()) {
            (ChangeAction::Created, "") => format!("+ {kind} {} created", change.name),
            (ChangeAction::Deleted, _) => format!("- {kind} {} deleted", change.name),
            (ChangeAction::Created, field) => {
                format!("    {field}: {}", change.new_value)
            }
            // Never a value: only whether it was set, changed or removed.
            (_, "api_key") => format!("~ {kind} {} api_key: {}", change.name, change.new_value),
            (_, field) => format!(
                "~ {kind} {} {field}: {} → {}",
                change.name,
                shown(&change.old_value),
                shown(&change.new_value)
            ),
        };
        out.push_str(&line);
        out.push('\n');
    }
    if changes.is_empty() {
        out.push_str("(no change)\n");
    }
    out
}

fn shown(value: &str) -> &str {
    if value.is_empty() { "(none)" } else { value }
}
