//! duofleet-agent, the sidecar next to each GitLab node.
pub mod gitlab_rb;
