//! What `-o json` and `-o yaml` print: the proto messages in grpcurl's JSON
//! shape (camelCase fields, enum names, RFC 3339 times), leaving out what
//! is empty. Keys are never in them: the server does not send any.

use duofleet_proto::v1::{
    EffectiveConfig, EndpointHealth, FeatureSetting, GitLabSync, HostSync, Instance, Model,
    Profile, Revision, Token,
};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

pub fn time(ts: &Option<prost_types::Timestamp>) -> Value {
    match ts {
        Some(ts) => Value::String(rfc3339(ts)),
        None => Value::Null,
    }
}

/// `2026-11-26T23:01:02Z` (UTC, whole seconds).
pub fn rfc3339(ts: &prost_types::Timestamp) -> String {
    let secs = ts.seconds;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) date (H. Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Drops nulls, empty strings, zeros, `false`, and empty lists and maps.
fn compact(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, compact(v)))
                .filter(|(_, v)| !is_empty(v))
                .collect::<Map<_, _>>(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(compact).collect()),
        other => other,
    }
}

fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

fn labels(map: &BTreeMap<String, String>) -> Value {
    json!(map)
}

pub fn model(m: &Model) -> Value {
    compact(json!({
        "name": m.name,
        "family": m.family,
        "endpoint": m.endpoint,
        "identifier": m.identifier,
        "provider": m.provider,
        "hasApiKey": m.has_api_key,
        "revision": m.revision,
        "createTime": time(&m.create_time),
        "updateTime": time(&m.update_time),
    }))
}

fn setting(s: &FeatureSetting) -> Value {
    compact(json!({
        "feature": s.feature,
        "provider": s.provider().as_str_name(),
        "model": s.model,
    }))
}

fn window(w: &Option<duofleet_proto::v1::ReconfigureWindow>) -> Value {
    match w {
        None => Value::Null,
        Some(w) => compact(json!({
            "days": w.days,
            "start": w.start,
            "end": w.end,
            "timeZone": w.time_zone,
        })),
    }
}

pub fn profile(p: &Profile) -> Value {
    compact(json!({
        "name": p.name,
        "parent": p.parent,
        "reconfigureWindow": window(&p.reconfigure_window),
        "aiGatewayUrl": p.ai_gateway_url,
        "aiGatewayInternalUrl": p.ai_gateway_internal_url,
        "selector": labels(&p.selector),
        "priority": p.priority,
        "features": p.features.iter().map(setting).collect::<Vec<_>>(),
        "aiGatewayTimeoutSeconds": p.ai_gateway_timeout_seconds,
        "duoAgentPlatformServiceUrl": p.duo_agent_platform_service_url,
        "revision": p.revision,
        "createTime": time(&p.create_time),
        "updateTime": time(&p.update_time),
    }))
}

fn health(h: &EndpointHealth) -> Value {
    compact(json!({
        "kind": h.kind().as_str_name(),
        "target": h.target,
        "state": h.state().as_str_name(),
        "error": h.error,
        "latencyMs": h.latency_ms,
        "checkTime": time(&h.check_time),
    }))
}

fn host_sync(h: &Option<HostSync>) -> Value {
    match h {
        None => Value::Null,
        Some(h) => compact(json!({
            "appliedRevision": h.applied_revision,
            "error": h.error,
            "detail": h.detail,
        })),
    }
}

fn gitlab_sync(g: &Option<GitLabSync>) -> Value {
    match g {
        None => Value::Null,
        Some(g) => compact(json!({
            "enabled": g.enabled,
            "detail": g.detail,
            "unmanagedModels": g.unmanaged_models,
            "appliedRevision": g.applied_revision,
            "items": g.items.iter().map(|i| compact(json!({
                "kind": i.kind,
                "key": i.key,
                "state": i.state().as_str_name(),
                "detail": i.detail,
            }))).collect::<Vec<_>>(),
        })),
    }
}

fn effective(e: &Option<EffectiveConfig>) -> Value {
    match e {
        None => Value::Null,
        Some(e) => compact(json!({
            "revision": e.revision,
            "profile": e.profile,
            "aiGatewayUrl": e.ai_gateway_url,
            "aiGatewayInternalUrl": e.ai_gateway_internal_url,
            "models": e.models.iter().map(model).collect::<Vec<_>>(),
            "features": e.features.iter().map(setting).collect::<Vec<_>>(),
            "aiGatewayTimeoutSeconds": e.ai_gateway_timeout_seconds,
            "duoAgentPlatformServiceUrl": e.duo_agent_platform_service_url,
            "reconfigureWindow": window(&e.reconfigure_window),
            "sources": labels(&e.sources),
        })),
    }
}

pub fn instance(i: &Instance) -> Value {
    compact(json!({
        "instanceId": i.instance_id,
        "hostname": i.hostname,
        "deployment": i.deployment().as_str_name(),
        "labels": labels(&i.labels),
        "reportedLabels": labels(&i.reported_labels),
        "agentVersion": i.agent_version,
        "gitlabVersion": i.gitlab_version,
        "profile": i.profile,
        "connected": i.connected,
        "lastSeen": time(&i.last_seen),
        "desiredRevision": i.desired_revision,
        "appliedRevision": i.applied_revision,
        "syncState": i.sync_state().as_str_name(),
        "lastError": i.last_error,
        "conflict": i.conflict,
        "hostSync": host_sync(&i.host_sync),
        "gitlabSync": gitlab_sync(&i.gitlab_sync),
        "health": i.health.iter().map(health).collect::<Vec<_>>(),
        "healthTransitions": i.health_transitions.iter().map(health).collect::<Vec<_>>(),
        "effective": effective(&i.effective),
    }))
}

pub fn revision(r: &Revision) -> Value {
    compact(json!({
        "revision": r.revision,
        "createTime": time(&r.create_time),
        "actor": r.actor,
        "summary": r.summary,
        "changes": r.changes.iter().map(|c| json!({
            "kind": c.kind().as_str_name(),
            "name": c.name,
            "action": c.action().as_str_name(),
        })).collect::<Vec<_>>(),
    }))
}

pub fn token(t: &Token) -> Value {
    compact(json!({
        "name": t.name,
        "role": t.role().as_str_name(),
        "createTime": time(&t.create_time),
        "expireTime": time(&t.expire_time),
        "createdBy": t.created_by,
        "usesLeft": t.uses_left,
        "labels": labels(&t.labels),
        "allowedLabelKeys": t.allowed_label_keys,
    }))
}

/// Prints `values` as JSON (`{"items": [...]}`) or YAML.
pub fn print_list(key: &str, values: Vec<Value>, yaml: bool) {
    let mut map = Map::new();
    map.insert(key.to_string(), Value::Array(values));
    print_value(&Value::Object(map), yaml);
}

pub fn print_value(value: &Value, yaml: bool) {
    if yaml {
        print!(
            "{}",
            serde_norway::to_string(value).expect("JSON values serialize")
        );
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(value).expect("JSON values serialize")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        let ts = prost_types::Timestamp {
            seconds: 1_795_734_062,
            nanos: 5,
        };
        assert_eq!(rfc3339(&ts), "2026-11-26T23:01:02Z");
        assert_eq!(
            rfc3339(&prost_types::Timestamp {
                seconds: 951_782_400,
                nanos: 0
            }),
            "2000-02-29T00:00:00Z"
        );
    }
}
