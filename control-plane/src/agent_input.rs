//! Limits on what an agent may send. An agent is a host, and a host can be
//! compromised: every string and list it sends has a bound, and so has each
//! whole message, so that no agent can grow the daemon's memory, the
//! database or an instance record without limit. A refusal names the field
//! and the limit.

use crate::error::ConfigError;
use crate::validate;
use duofleet_proto::v1::agent_message::Message;
use duofleet_proto::v1::{Ack, AgentMessage, GitLabSync, HealthReport, Hello, HostSync};
use prost::Message as _;

/// A whole Hello, encoded.
pub const HELLO_MAX_BYTES: usize = 8 * 1024;
/// Any other message, encoded: an ack with a long reconfigure tail and a
/// per-item GitLab report, or a health report of every target.
pub const MESSAGE_MAX_BYTES: usize = 256 * 1024;
/// What the agent stream decodes at all; anything larger is refused by the
/// transport before it is read.
pub const DECODE_MAX_BYTES: usize = 1024 * 1024;
/// Versions, as agents and GitLab print them.
pub const VERSION_MAX: usize = 64;
/// One-line details: a GitLab item, a host step, a sync status.
pub const DETAIL_MAX: usize = 2048;
/// An apply's error: GitLab's messages and the last lines of a reconfigure.
pub const ERROR_MAX: usize = 16 * 1024;
/// Items of a GitLab sync, unmanaged models, health targets.
pub const LIST_MAX: usize = 256;

type Result = std::result::Result<(), ConfigError>;

fn text(field: &str, value: &str, max: usize) -> Result {
    let len = value.len();
    if len > max {
        return Err(ConfigError::invalid(
            field,
            format!("must be at most {max} bytes (got {len})"),
        ));
    }
    Ok(())
}

fn list<T>(field: &str, items: &[T], max: usize) -> Result {
    if items.len() > max {
        return Err(ConfigError::invalid(
            field,
            format!("at most {max} entries (got {})", items.len()),
        ));
    }
    Ok(())
}

fn encoded(field: &str, len: usize, max: usize) -> Result {
    if len > max {
        return Err(ConfigError::invalid(
            field,
            format!("the message must be at most {max} bytes (got {len})"),
        ));
    }
    Ok(())
}

pub fn hello(hello: &Hello) -> Result {
    encoded("hello", hello.encoded_len(), HELLO_MAX_BYTES)?;
    validate::instance_id("hello.instance_id", &hello.instance_id)?;
    if !hello.hostname.is_empty() {
        validate::instance_id("hello.hostname", &hello.hostname)?;
    }
    validate::selector("hello.labels", &hello.labels)?;
    text("hello.agent_version", &hello.agent_version, VERSION_MAX)?;
    text("hello.gitlab_version", &hello.gitlab_version, VERSION_MAX)?;
    let digest = &hello.applied_digest;
    if !digest.is_empty() && (digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(ConfigError::invalid(
            "hello.applied_digest",
            "must be empty or a SHA-256 in hex (64 characters 0-9a-f)",
        ));
    }
    if let Some(sync) = &hello.gitlab_sync {
        gitlab_sync("hello.gitlab_sync", sync)?;
    }
    Ok(())
}

/// Every message after Hello.
pub fn message(message: &AgentMessage) -> Result {
    encoded("message", message.encoded_len(), MESSAGE_MAX_BYTES)?;
    match &message.message {
        Some(Message::Hello(h)) => hello(h),
        Some(Message::Ack(a)) => ack(a),
        Some(Message::HealthReport(r)) => health(r),
        Some(Message::DriftReport(d)) => text("drift_report.detail", &d.detail, ERROR_MAX),
        None => Ok(()),
    }
}

fn ack(ack: &Ack) -> Result {
    text("ack.error", &ack.error, ERROR_MAX)?;
    if let Some(sync) = &ack.gitlab_sync {
        gitlab_sync("ack.gitlab_sync", sync)?;
    }
    if let Some(host) = &ack.host_sync {
        host_sync(host)?;
    }
    Ok(())
}

fn host_sync(host: &HostSync) -> Result {
    text("ack.host_sync.error", &host.error, ERROR_MAX)?;
    text("ack.host_sync.detail", &host.detail, DETAIL_MAX)
}

fn gitlab_sync(field: &str, sync: &GitLabSync) -> Result {
    text(&format!("{field}.detail"), &sync.detail, DETAIL_MAX)?;
    list(
        &format!("{field}.unmanaged_models"),
        &sync.unmanaged_models,
        LIST_MAX,
    )?;
    for (i, name) in sync.unmanaged_models.iter().enumerate() {
        text(
            &format!("{field}.unmanaged_models[{i}]"),
            name,
            validate::MODEL_NAME_MAX,
        )?;
    }
    list(&format!("{field}.items"), &sync.items, LIST_MAX)?;
    for (i, item) in sync.items.iter().enumerate() {
        text(&format!("{field}.items[{i}].kind"), &item.kind, 16)?;
        text(
            &format!("{field}.items[{i}].key"),
            &item.key,
            validate::MODEL_NAME_MAX,
        )?;
        text(
            &format!("{field}.items[{i}].detail"),
            &item.detail,
            DETAIL_MAX,
        )?;
    }
    Ok(())
}

fn health(report: &HealthReport) -> Result {
    list("health_report.results", &report.results, LIST_MAX)?;
    for (i, result) in report.results.iter().enumerate() {
        text(
            &format!("health_report.results[{i}].target"),
            &result.target,
            validate::URL_MAX,
        )?;
        text(
            &format!("health_report.results[{i}].error"),
            &result.error,
            DETAIL_MAX,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use duofleet_proto::v1::EndpointHealth;

    #[test]
    fn oversized_fields_are_named() {
        let big = Hello {
            instance_id: "gitlab-a".into(),
            agent_version: "x".repeat(100),
            ..Default::default()
        };
        assert_eq!(
            hello(&big).unwrap_err().to_string(),
            "hello.agent_version: must be at most 64 bytes (got 100)"
        );
        let huge = Hello {
            instance_id: "gitlab-a".into(),
            gitlab_version: "x".repeat(3 << 20),
            ..Default::default()
        };
        assert!(
            hello(&huge)
                .unwrap_err()
                .to_string()
                .starts_with("hello: the message must be at most 8192 bytes")
        );
        let digest = |d: &str| Hello {
            instance_id: "gitlab-a".into(),
            applied_digest: d.into(),
            ..Default::default()
        };
        assert_eq!(
            hello(&digest("zz")).unwrap_err().to_string(),
            "hello.applied_digest: must be empty or a SHA-256 in hex (64 characters 0-9a-f)"
        );
        hello(&digest(&"ab".repeat(32))).unwrap();
        hello(&digest("")).unwrap();
        let report = AgentMessage {
            message: Some(Message::HealthReport(HealthReport {
                results: vec![EndpointHealth::default(); 300],
            })),
        };
        assert_eq!(
            message(&report).unwrap_err().to_string(),
            "health_report.results: at most 256 entries (got 300)"
        );
        let fine = AgentMessage {
            message: Some(Message::Ack(Ack {
                error: "e".repeat(ERROR_MAX),
                ..Default::default()
            })),
        };
        message(&fine).unwrap();
    }
}
