//! duofleetd, the duofleet control plane.
//!
//! ```text
//!  grpcurl / duofleetctl ──► grpc (thin tonic handlers, auth interceptor)
//!                               │  ConfigError ─► Status (grpc::status)
//!                               ▼
//!                     config (operations on a Config value)
//!                     validate (field rules) · catalog (families, features)
//!                               │
//!                               ▼
//!                     store (revisions, history, rollback, sealing) over a
//!                            Backend: sled (embedded) or etcd (replicas)
//!                               │ watch<Arc<Config>> + broadcast<Revision>
//!                               ▼
//!                     grpc::agent (one session per agent: effective config
//!                     per instance, coalesced) ──► registry (instances,
//!                     sync state, fleet events) ◄── FleetService
//! ```
//!
//! Domain modules (`catalog`, `validate`, `config`) know nothing of tonic or
//! sled; `grpc` is the only place that builds a `tonic::Status`.

pub mod admission;
pub mod agent_input;
mod apply;
pub mod auth;
pub mod ca;
pub mod catalog;
pub mod client;
pub mod config;
pub mod dashboard;
pub mod diff;
pub mod effective;
pub mod error;
pub mod fanout;
pub mod fleet_health;
pub mod fsutil;
pub mod grpc;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod refusals;
pub mod registry;
pub mod rollout;
pub mod secrets;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod transport_errors;
pub mod validate;
mod wake;

#[cfg(test)]
mod fuzz_tests;
