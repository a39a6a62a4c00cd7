//! duofleet-agent, the sidecar next to each GitLab node.
//!
//! ```text
//!  duofleetd ──DesiredConfig──► session (reconnects with backoff)
//!      ▲                            │ newest config only
//!      └──── Ack / DriftReport ◄── apply ──► gitlab_rb (edit AI_GATEWAY_URL)
//!                                    │        or helm values
//!                                    ├──► command (reconfigure / helm, timeout)
//!                                    └──► state (state.json: applied revision,
//!                                               digest, pending run)
//! ```

#![forbid(unsafe_code)]

pub mod apply;
pub mod args;
pub mod command;
pub mod gitlab;
pub mod gitlab_rb;
pub mod health;
pub mod identity;
pub mod limits;
pub mod run;
pub mod session;
pub mod state;
