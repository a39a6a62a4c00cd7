//! What each GitLab version offers, as GitLab's own source has it: the
//! families of `AiAcceptedSelfHostedModels`, the features of `AiFeatures`
//! with their compatible families and release state, and the fields of each
//! GraphQL input type. Kept apart from duofleet's catalog on purpose: the
//! simulator must follow GitLab, not duofleet's idea of it.

/// A GitLab version, major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32);

impl Version {
    pub fn parse(text: &str) -> Version {
        let mut parts = text
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        Version(parts.next().unwrap_or(0), parts.next().unwrap_or(0))
    }

    pub fn at_least(self, major: u32, minor: u32) -> bool {
        self >= Version(major, minor)
    }
}

pub struct Family {
    /// The enum value (upper case); stored and listed in lower case.
    pub name: &'static str,
    pub since: Version,
    /// Beta families are hidden until the testing terms are accepted.
    pub beta: bool,
}

pub const FAMILIES: &[Family] = &[
    family("CLAUDE_3", 17, 1, false),
    family("CODEGEMMA", 17, 1, true),
    family("CODELLAMA", 17, 1, true),
    family("CODESTRAL", 17, 1, false),
    family("DEEPSEEKCODER", 17, 1, true),
    family("EMBEDDING", 19, 1, true),
    family("GEMINI", 19, 0, true),
    family("GENERAL", 18, 3, true),
    family("GPT", 17, 1, false),
    family("LLAMA3", 17, 1, true),
    family("MISTRAL", 17, 1, false),
    family("MIXTRAL", 17, 1, false),
    family("QWEN", 19, 2, true),
];

const fn family(name: &'static str, major: u32, minor: u32, beta: bool) -> Family {
    Family {
        name,
        since: Version(major, minor),
        beta,
    }
}

pub struct Feature {
    /// Lower case, as `aiFeatureSettings` lists it.
    pub key: &'static str,
    /// The title before `renamed`.
    pub title: &'static str,
    /// A later title and the version that brought it.
    pub renamed: Option<(Version, &'static str)>,
    pub since: Version,
    /// From this version the feature is GA; before it, beta (hidden until
    /// the testing terms are accepted). `None`: never GA.
    pub ga_since: Option<Version>,
    /// Premium drops it (vulnerability features need Ultimate).
    pub ultimate_only: bool,
    pub compatible: &'static [&'static str],
    /// Families accepted only from a later version.
    pub compatible_later: &'static [(&'static str, Version)],
    /// In GitLab's feature metadata but not in the `AiFeatures` enum.
    pub in_enum: bool,
    /// Assigning a self-hosted model needs the `update_dap_self_hosted_model`
    /// ability (the self-hosted agent-platform add-on).
    pub dap_gate: bool,
}

const CODE: &[&str] = &[
    "codegemma",
    "codellama",
    "codestral",
    "deepseekcoder",
    "mistral",
    "mixtral",
    "llama3",
    "claude_3",
    "gpt",
    "general",
];
const CHAT: &[&str] = &[
    "mistral",
    "mixtral",
    "codestral",
    "claude_3",
    "gpt",
    "llama3",
    "general",
];
const OTHER: &[&str] = &["mistral", "mixtral", "claude_3", "gpt", "llama3", "general"];
const REVIEW: &[&str] = &["claude_3", "mistral", "mixtral", "gpt", "llama3", "general"];
const AGENTS: &[&str] = &["claude_3", "gpt", "general"];
const NEWER: &[&str] = &["claude_3", "gpt", "general"];
const QWEN_LATER: &[(&str, Version)] = &[("qwen", Version(19, 2))];
const AGENTS_LATER: &[(&str, Version)] = &[
    ("mistral", Version(19, 0)),
    ("gemini", Version(19, 0)),
    ("qwen", Version(19, 2)),
];
const V17_4: Version = Version(17, 4);

const fn ga(
    key: &'static str,
    title: &'static str,
    compatible: &'static [&'static str],
) -> Feature {
    Feature {
        key,
        title,
        renamed: None,
        since: V17_4,
        ga_since: Some(V17_4),
        ultimate_only: false,
        compatible,
        compatible_later: QWEN_LATER,
        in_enum: true,
        dap_gate: false,
    }
}

const fn beta(key: &'static str, title: &'static str, since: Version) -> Feature {
    Feature {
        since,
        ga_since: None,
        ..ga(key, title, OTHER)
    }
}

const fn newer(key: &'static str, title: &'static str, since: Version) -> Feature {
    Feature {
        compatible: NEWER,
        compatible_later: &[],
        ..beta(key, title, since)
    }
}

const V18_1: Version = Version(18, 1);

pub const FEATURES: &[Feature] = &[
    ga("code_generations", "Code Generation", CODE),
    ga("code_completions", "Code Completion", CODE),
    ga("duo_chat", "General Chat", CHAT),
    ga("duo_chat_explain_code", "Code Explanation", CHAT),
    ga("duo_chat_write_tests", "Test Generation", CHAT),
    ga("duo_chat_refactor_code", "Refactor Code", CHAT),
    ga("duo_chat_fix_code", "Fix Code", CHAT),
    beta(
        "duo_chat_troubleshoot_job",
        "Root Cause Analysis",
        Version(17, 10),
    ),
    Feature {
        ultimate_only: true,
        ..beta(
            "duo_chat_explain_vulnerability",
            "Vulnerability Explanation",
            V18_1,
        )
    },
    beta("duo_chat_summarize_comments", "Discussion Summary", V18_1),
    beta(
        "generate_commit_message",
        "Merge Commit Message Generation",
        V18_1,
    ),
    beta(
        "summarize_new_merge_request",
        "Merge Request Summary",
        V18_1,
    ),
    Feature {
        ultimate_only: true,
        ..beta("resolve_vulnerability", "Vulnerability Resolution", V18_1)
    },
    beta("summarize_review", "Code Review Summary", V18_1),
    beta("glab_ask_git_command", "GitLab Duo for CLI", V18_1),
    Feature {
        ga_since: Some(Version(18, 4)),
        compatible: REVIEW,
        renamed: Some((Version(19, 3), "Non-Agentic Code Review")),
        ..beta("review_merge_request", "Code Review", Version(18, 3))
    },
    Feature {
        since: Version(18, 4),
        ga_since: Some(Version(18, 4)),
        renamed: Some((Version(19, 0), "Agents & flows")),
        compatible_later: AGENTS_LATER,
        dap_gate: true,
        ..ga(
            "duo_agent_platform",
            "All agents, except Agentic Chat",
            AGENTS,
        )
    },
    Feature {
        since: Version(18, 7),
        ga_since: Some(Version(18, 7)),
        compatible_later: AGENTS_LATER,
        dap_gate: true,
        ..ga("duo_agent_platform_agentic_chat", "Agentic Chat", AGENTS)
    },
    newer(
        "sast_vulnerability_fp_detection",
        "SAST false-positive detection",
        Version(18, 11),
    ),
    newer(
        "sast_vulnerability_resolution",
        "SAST vulnerability resolution",
        Version(18, 11),
    ),
    newer(
        "secret_vulnerability_fp_detection",
        "Secret detection false-positive detection",
        Version(18, 11),
    ),
    Feature {
        since: Version(19, 1),
        ga_since: Some(Version(19, 1)),
        ..ga("review_merge_request_dap", "Agentic Code Review", REVIEW)
    },
    newer("security_review", "Security Review", Version(19, 2)),
    newer(
        "resolve_dependency_bump",
        "Dependency bump resolution",
        Version(19, 2),
    ),
    Feature {
        since: Version(19, 3),
        ga_since: Some(Version(19, 3)),
        compatible: &["claude_3", "gpt", "general", "mistral", "gemini", "qwen"],
        compatible_later: &[],
        ..ga("duo_developer", "Duo Developer", AGENTS)
    },
    Feature {
        compatible: &["embedding"],
        in_enum: false,
        ..newer("embeddings_code", "Code embeddings", Version(19, 2))
    },
    Feature {
        compatible: &["gemini"],
        in_enum: false,
        ..newer(
            "feature_discovery_search",
            "Feature discovery",
            Version(19, 2),
        )
    },
];

impl Feature {
    pub fn beta_at(&self, version: Version) -> bool {
        self.ga_since.is_none_or(|ga| version < ga)
    }

    /// Whether GitLab `version` accepts a `family` model for it.
    pub fn accepts(&self, family: &str, version: Version) -> bool {
        self.compatible.contains(&family)
            || self
                .compatible_later
                .iter()
                .any(|(f, since)| *f == family && version >= *since)
    }

    /// The title GitLab `version` gives it.
    pub fn title_at(&self, version: Version) -> &'static str {
        match self.renamed {
            Some((since, title)) if version >= since => title,
            _ => self.title,
        }
    }
}

/// The fields of a mutation's input type at `version`: (name, required).
/// `None` when the mutation does not exist yet.
pub fn input_fields(mutation: &str, version: Version) -> Option<Vec<(&'static str, bool)>> {
    let v = version;
    // endpoint is optional from 19.0 (required only for the API provider);
    // provider came in 18.11, optional, and is required by 19.3.
    let model = |with_id: bool| {
        let mut fields = vec![
            ("name", true),
            ("model", true),
            ("endpoint", !v.at_least(19, 0)),
            ("apiToken", false),
            ("identifier", false),
        ];
        if v.at_least(18, 11) {
            fields.push(("provider", v.at_least(19, 3)));
        }
        if with_id {
            fields.insert(0, ("id", true));
        }
        fields
    };
    Some(match mutation {
        "aiSelfHostedModelCreate" if v.at_least(17, 1) => model(false),
        "aiSelfHostedModelUpdate" if v.at_least(17, 2) => model(true),
        "aiSelfHostedModelDelete" if v.at_least(17, 2) => vec![("id", true)],
        "aiSelfHostedModelConnectionCheck" if v.at_least(17, 7) => model(false),
        "aiFeatureSettingUpdate" if v.at_least(17, 4) => {
            let mut fields = vec![
                if v.at_least(17, 11) {
                    ("features", true)
                } else {
                    ("feature", true)
                },
                ("provider", true),
                ("aiSelfHostedModelId", false),
            ];
            if v.at_least(18, 4) {
                fields.push(("offeredModelRef", false));
            }
            fields
        }
        "duoSettingsUpdate" if v.at_least(17, 9) => {
            let mut fields = vec![("aiGatewayUrl", false)];
            if v.at_least(18, 4) {
                fields.push(("duoAgentPlatformServiceUrl", false));
            }
            if v.at_least(18, 7) {
                fields.push(("aiGatewayTimeoutSeconds", false));
            }
            fields
        }
        _ => return None,
    })
}

/// The GraphQL type name of a mutation's input.
pub fn input_type(mutation: &str) -> String {
    let mut chars = mutation.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase());
    format!(
        "{}{}Input",
        first.into_iter().collect::<String>(),
        chars.as_str()
    )
}

/// The fields of `duoSettings` at `version`.
pub fn duo_settings_fields(version: Version) -> Vec<&'static str> {
    let mut fields = vec!["aiGatewayUrl"];
    if version.at_least(18, 4) {
        fields.push("duoAgentPlatformServiceUrl");
    }
    if version.at_least(18, 7) {
        fields.push("aiGatewayTimeoutSeconds");
    }
    fields
}

/// Query root fields and the version that brought each.
pub fn query_since(field: &str) -> Option<Version> {
    Some(match field {
        "aiSelfHostedModels" => Version(17, 1),
        "aiFeatureSettings" => Version(17, 5),
        "duoSettings" => Version(17, 9),
        _ => return None,
    })
}

/// The fields of `AiSelfHostedModel` at `version`.
pub fn model_fields(version: Version) -> Vec<&'static str> {
    let mut fields = vec![
        "id",
        "name",
        "model",
        "endpoint",
        "identifier",
        "hasApiToken",
        "apiToken",
    ];
    if version.at_least(18, 11) {
        fields.push("provider");
    }
    fields
}

/// Values of `AiSelfHostedModelProvider` (18.11+).
pub const MODEL_PROVIDERS: &[&str] = &["API", "BEDROCK", "VERTEX_AI"];

/// Providers of `AiFeatureProviders` at `version`.
pub fn providers(version: Version) -> Vec<&'static str> {
    let mut providers = vec!["DISABLED", "VENDORED", "SELF_HOSTED"];
    if version.at_least(18, 0) {
        providers.push("UNASSIGNED");
    }
    providers
}
