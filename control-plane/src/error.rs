//! Errors of the configuration domain. They know nothing of gRPC: the
//! mapping to `tonic::Status` lives in `grpc::status`, the one table.

/// Why a configuration request was refused. A refused request changes
/// nothing and creates no revision.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A malformed field: the field path and the rule it breaks.
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
    #[error("{kind} {name:?} already exists")]
    AlreadyExists { kind: &'static str, name: String },
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    #[error("revision {0} not found")]
    RevisionNotFound(u64),
    /// The request is well-formed but the current configuration blocks it;
    /// the message names what blocks it.
    #[error("{0}")]
    Blocked(String),
    /// An apply made from an older export: the configuration moved on.
    #[error(
        "expected_revision: the configuration is at revision {current}, not {expected}; it changed since the file was exported: export it again (or diff), and apply once more"
    )]
    Stale { expected: u64, current: u64 },
}

impl ConfigError {
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

/// Quotes user input for an error message, cut to a readable length so that
/// a hostile 1 MiB value is not echoed back.
pub fn quoted(value: &str) -> String {
    const MAX: usize = 64;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}

/// An error and its causes on one line, for the log.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
