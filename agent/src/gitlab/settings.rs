//! Duo settings in GitLab's database (17.9+): the AI gateway URL, and on
//! newer versions the gateway timeout and the Duo Agent Platform service.
//! Each changed setting is its own mutation, so that one GitLab refuses
//! does not hold back the others.

use super::api::since;
use super::{Sync, SyncError};
use duofleet_proto::GitLabVersion;
use duofleet_proto::v1::{DesiredConfig, SyncItemState};
use serde_json::{Value, json};

const GATEWAY_UPDATE: &str = "mutation duofleetDuoSettings($input: DuoSettingsUpdateInput!) { duoSettingsUpdate(input: $input) { errors } }";

/// One Duo setting: its GraphQL name, the version that brought it, and the
/// desired value (`None`: leave GitLab's own).
struct Wanted {
    field: &'static str,
    since: GitLabVersion,
    value: Option<Value>,
}

impl Sync<'_> {
    pub(super) async fn settings(&mut self, desired: &DesiredConfig) -> Result<(), SyncError> {
        // GitLab trims one trailing "/" (chomp): send what it will keep, so
        // that the next sync finds it equal.
        let chomp = |url: &str| url.strip_suffix('/').unwrap_or(url).to_string();
        let wanted = [
            Wanted {
                field: "aiGatewayUrl",
                since: since::DUO_SETTINGS,
                value: (!desired.ai_gateway_url.is_empty())
                    .then(|| json!(chomp(&desired.ai_gateway_url))),
            },
            Wanted {
                field: "duoAgentPlatformServiceUrl",
                since: since::AGENT_PLATFORM_URL,
                value: (!desired.duo_agent_platform_service_url.is_empty())
                    .then(|| json!(chomp(&desired.duo_agent_platform_service_url))),
            },
            Wanted {
                field: "aiGatewayTimeoutSeconds",
                since: since::GATEWAY_TIMEOUT,
                value: (desired.ai_gateway_timeout_seconds != 0)
                    .then(|| json!(desired.ai_gateway_timeout_seconds)),
            },
        ];
        let mut present = Vec::new();
        for setting in wanted {
            let Some(value) = setting.value else { continue };
            if self.version < setting.since {
                // Before 17.9 the gateway is gitlab.rb's alone: the host
                // layer has it, and there is nothing to skip here.
                if setting.field != "aiGatewayUrl" {
                    let why = format!(
                        "not supported by GitLab {} (it came in {})",
                        self.version, setting.since
                    );
                    self.report
                        .add("setting", setting.field, SyncItemState::Skipped, why);
                }
                continue;
            }
            present.push((setting.field, value));
        }
        if present.is_empty() {
            return Ok(());
        }
        let selection = present
            .iter()
            .map(|(field, _)| *field)
            .collect::<Vec<_>>()
            .join(" ");
        let query = format!("query duofleetDuoSettings {{ duoSettings {{ {selection} }} }}");
        let current = match self.query("duoSettings", &query).await? {
            Ok(data) => data["duoSettings"].clone(),
            Err(why) => {
                for (field, _) in present {
                    let detail = format!("cannot read GitLab's Duo settings: {why}");
                    self.report
                        .add("setting", field, SyncItemState::Failed, detail);
                }
                return Ok(());
            }
        };
        for (field, value) in present {
            if current[field] == value {
                self.report
                    .add("setting", field, SyncItemState::Unchanged, "");
                continue;
            }
            let what = format!("duoSettingsUpdate {field}");
            match self
                .mutate(
                    &what,
                    GATEWAY_UPDATE,
                    "duoSettingsUpdate",
                    json!({ field: value }),
                )
                .await?
            {
                Ok(_) => {
                    let detail = format!("{field} = {value}");
                    self.report
                        .add("setting", field, SyncItemState::Applied, detail);
                }
                Err(why) => self
                    .report
                    .add("setting", field, SyncItemState::Failed, why),
            }
        }
        Ok(())
    }
}
