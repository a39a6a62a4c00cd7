//! The editor against a corpus of realistic gitlab.rb files, checked with
//! the real Ruby interpreter: the edited file must evaluate to the expected
//! env hash, and every other line must be byte-identical.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::io::Write;

const URL: &str = "https://aigw.example.com:5052";

/// Evaluates a gitlab.rb with Ruby (unknown settings become nested hashes)
/// and returns `gitlab_rails['env']` as JSON, or `null` when unset.
fn ruby_env(text: &str) -> serde_json::Value {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    let script = r#"
        require 'json'
        class Anything
          def method_missing(*) = self
          def respond_to_missing?(*) = true
        end
        $settings = Hash.new { |h, k| h[k] = Hash.new { |h2, k2| h2[k2] = Anything.new } }
        def method_missing(name, *args)
          args.empty? ? $settings[name] : nil
        end
        eval(File.read(ARGV[0]), binding, ARGV[0])
        env = $settings.key?(:gitlab_rails) && $settings[:gitlab_rails].key?('env') ? $settings[:gitlab_rails]['env'] : nil
        puts JSON.generate(env)
    "#;
    let output = std::process::Command::new("ruby")
        .args(["-W0", "-e", script])
        .arg(file.path())
        .output()
        .expect("ruby is required for these tests (Debian package ruby; .ci/run installs it)");
    assert!(
        output.status.success(),
        "ruby could not evaluate:\n{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn env(pairs: &[(&str, &str)]) -> serde_json::Value {
    serde_json::to_value(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
    )
    .unwrap()
}

/// Lines of `after` that are not in `before`, and the other way round.
fn changed_lines(before: &str, after: &str) -> (Vec<String>, Vec<String>) {
    let b: Vec<&str> = before.lines().collect();
    let a: Vec<&str> = after.lines().collect();
    let added = a
        .iter()
        .filter(|l| !b.contains(l))
        .map(|l| l.to_string())
        .collect();
    let removed = b
        .iter()
        .filter(|l| !a.contains(l))
        .map(|l| l.to_string())
        .collect();
    (added, removed)
}

const STOCK_TEMPLATE: &str = r#"## GitLab configuration settings
##! This file is generated during initial installation and **is not** modified
##! during upgrades.
external_url 'https://gitlab.example.com'

### Environment variables
# gitlab_rails['env'] = {
#   'BUNDLE_GEMFILE' => "/opt/gitlab/embedded/service/gitlab-rails/Gemfile",
#   'PATH' => "/opt/gitlab/bin:/opt/gitlab/embedded/bin:/bin:/usr/bin"
# }

# gitlab_rails['rack_attack_git_basic_auth'] = {
#   'enabled' => false,
# }
gitlab_rails['time_zone'] = 'UTC'
"#;

const MULTI_KEY: &str = r#"external_url "https://gitlab.corp.example"
gitlab_rails['env'] = {
  'http_proxy' => 'http://proxy.corp:3128',
  # 'https_proxy' => 'http://old-proxy:3128',
  "https_proxy" => "http://proxy.corp:3128",
  'no_proxy' => 'localhost,127.0.0.1,.corp', # keep the internal hosts direct
  'AI_GATEWAY_URL' => 'http://old-gateway:5052',
  'GITLAB_LICENSE_MODE' => 'test',
  'MALLOC_CONF' => 'dirty_decay_ms:1000,muzzy_decay_ms:1000',
}
nginx['enable'] = true
"#;

#[test]
fn stock_template_gets_a_marked_block_and_stays_otherwise_identical() {
    assert_eq!(read_gateway_url(STOCK_TEMPLATE).unwrap(), None);
    let edited = set_gateway_url(STOCK_TEMPLATE, URL).unwrap();
    assert!(
        edited.starts_with(STOCK_TEMPLATE),
        "the original text must stay a prefix"
    );
    assert!(edited.contains(BEGIN_MARK) && edited.contains(END_MARK));
    assert_eq!(ruby_env(&edited), env(&[("AI_GATEWAY_URL", URL)]));
    assert_eq!(read_gateway_url(&edited).unwrap().as_deref(), Some(URL));
    // A second edit changes the block in place instead of adding another.
    let again = set_gateway_url(&edited, "https://other:5052").unwrap();
    assert_eq!(again.matches(BEGIN_MARK).count(), 1);
    assert_eq!(
        ruby_env(&again),
        env(&[("AI_GATEWAY_URL", "https://other:5052")])
    );
}

#[test]
fn existing_entry_is_replaced_and_nothing_else_changes() {
    assert_eq!(
        read_gateway_url(MULTI_KEY).unwrap().as_deref(),
        Some("http://old-gateway:5052")
    );
    let edited = set_gateway_url(MULTI_KEY, URL).unwrap();
    let (added, removed) = changed_lines(MULTI_KEY, &edited);
    assert_eq!(added, [format!("  'AI_GATEWAY_URL' => '{URL}',")]);
    assert_eq!(
        removed,
        ["  'AI_GATEWAY_URL' => 'http://old-gateway:5052',"]
    );
    assert_eq!(
        ruby_env(&edited),
        env(&[
            ("http_proxy", "http://proxy.corp:3128"),
            ("https_proxy", "http://proxy.corp:3128"),
            ("no_proxy", "localhost,127.0.0.1,.corp"),
            ("AI_GATEWAY_URL", URL),
            ("GITLAB_LICENSE_MODE", "test"),
            ("MALLOC_CONF", "dirty_decay_ms:1000,muzzy_decay_ms:1000"),
        ])
    );
}

#[test]
fn missing_entry_is_added_with_the_hash_indentation() {
    let text = "gitlab_rails['env'] = {\n    \"http_proxy\" => \"http://proxy:3128\"\n}\n";
    let edited = set_gateway_url(text, URL).unwrap();
    assert_eq!(
        edited,
        format!(
            "gitlab_rails['env'] = {{\n    'AI_GATEWAY_URL' => '{URL}',\n    \"http_proxy\" => \"http://proxy:3128\"\n}}\n"
        )
    );
    assert_eq!(
        ruby_env(&edited),
        env(&[("http_proxy", "http://proxy:3128"), ("AI_GATEWAY_URL", URL)])
    );
}

#[test]
fn one_line_and_empty_hashes() {
    for (text, others) in [
        (
            "gitlab_rails['env'] = { 'MALLOC_CONF' => 'x' } # tuned\n",
            vec![("MALLOC_CONF", "x")],
        ),
        ("gitlab_rails['env'] = {}\n", vec![]),
        ("gitlab_rails[\"env\"]={\n}\n", vec![]),
    ] {
        let edited = set_gateway_url(text, URL).unwrap();
        let mut expected = others.clone();
        expected.push(("AI_GATEWAY_URL", URL));
        assert_eq!(ruby_env(&edited), env(&expected), "{edited}");
        assert_eq!(read_gateway_url(&edited).unwrap().as_deref(), Some(URL));
    }
}

#[test]
fn the_last_of_several_assignments_is_edited() {
    let text = "gitlab_rails['env'] = { 'AI_GATEWAY_URL' => 'http://first' }\n\ngitlab_rails['env'] = {\n  'CUSTOMER_PORTAL_URL' => 'https://portal'\n}\n";
    let edited = set_gateway_url(text, URL).unwrap();
    assert!(edited.starts_with("gitlab_rails['env'] = { 'AI_GATEWAY_URL' => 'http://first' }\n"));
    assert_eq!(
        ruby_env(&edited),
        env(&[
            ("AI_GATEWAY_URL", URL),
            ("CUSTOMER_PORTAL_URL", "https://portal")
        ])
    );
}

#[test]
fn double_quotes_comments_and_begin_end_blocks_are_respected() {
    let text = r#"=begin
gitlab_rails['env'] = { 'AI_GATEWAY_URL' => 'http://in-a-block-comment' }
=end
gitlab_rails['env'] = {
  # "AI_GATEWAY_URL" => "http://commented-out",
  "CLOUD_CONNECTOR_BASE_URL" => "https://cc.example # not a comment } not a brace",
  "AI_GATEWAY_URL" => "http://old"
}
"#;
    assert_eq!(
        read_gateway_url(text).unwrap().as_deref(),
        Some("http://old")
    );
    let edited = set_gateway_url(text, URL).unwrap();
    let (added, removed) = changed_lines(text, &edited);
    assert_eq!(added, [format!("  \"AI_GATEWAY_URL\" => '{URL}'")]);
    assert_eq!(removed, ["  \"AI_GATEWAY_URL\" => \"http://old\""]);
    assert_eq!(
        ruby_env(&edited),
        env(&[
            (
                "CLOUD_CONNECTOR_BASE_URL",
                "https://cc.example # not a comment } not a brace"
            ),
            ("AI_GATEWAY_URL", URL)
        ])
    );
}

#[test]
fn unsafe_forms_are_refused_with_what_to_change() {
    for (text, problem) in [
        (
            "base = {}\ngitlab_rails['env'] = base\n",
            "assigned something other than a literal hash",
        ),
        (
            "gitlab_rails['env'] = { 'A' => 'b' }.merge(extra)\n",
            "followed by more code",
        ),
        (
            "gitlab_rails['env'] = {}\ngitlab_rails['env']['AI_GATEWAY_URL'] = 'http://x'\n",
            "is set with gitlab_rails['env']['AI_GATEWAY_URL']",
        ),
        (
            "gitlab_rails['env'].merge!('A' => 'b')\n",
            "changed by a method call",
        ),
        (
            "host = 'gw'\ngitlab_rails['env'] = { 'AI_GATEWAY_URL' => \"http://#{host}:5052\" }\n",
            "uses string interpolation",
        ),
        (
            "gitlab_rails['env'] = { 'AI_GATEWAY_URL' => ENV['GW'] }\n",
            "is not a quoted string",
        ),
        (
            "gitlab_rails['env'] = { AI_GATEWAY_URL: 'http://x' }\n",
            "written as a symbol key",
        ),
    ] {
        let err = set_gateway_url(text, URL).unwrap_err();
        assert!(err.to_string().contains(problem), "{text}: {err}");
        assert!(
            err.to_string()
                .contains("write gitlab_rails['env'] as a literal hash"),
            "{err}"
        );
    }
    let err = set_gateway_url("a = 1\nbase = {}\ngitlab_rails['env'] = base\n", URL).unwrap_err();
    assert_eq!(err.line, 3);
}

#[test]
fn values_are_escaped_as_ruby_strings() {
    let odd = "https://gw.example/it's\\path";
    let edited = set_gateway_url(MULTI_KEY, odd).unwrap();
    assert_eq!(ruby_env(&edited)["AI_GATEWAY_URL"], odd);
    assert_eq!(read_gateway_url(&edited).unwrap().as_deref(), Some(odd));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any edit changes at most the one entry line (or adds one line or the
    /// block), and Ruby reads back exactly the URL that was set, with every
    /// other key intact.
    #[test]
    fn any_edit_changes_only_the_entry(
        host in "[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,6}){0,2}",
        port in 1u16..65535,
        path in "(/[A-Za-z0-9._'~-]{1,8}){0,3}",
        other_keys in proptest::collection::btree_map("[A-Z][A-Z_]{0,10}", "[a-z0-9:/.,_-]{0,20}", 0..4),
        existing in proptest::option::of("http://[a-z]{1,10}:[0-9]{2,4}"),
        indent in "( {1,4}|\t)",
        trailing_comma in any::<bool>(),
    ) {
        let url = format!("https://{host}:{port}{path}");
        let mut entries: Vec<String> = other_keys
            .iter()
            .filter(|(k, _)| k.as_str() != KEY)
            .map(|(k, v)| format!("{indent}'{k}' => '{v}'"))
            .collect();
        if let Some(old) = &existing {
            entries.push(format!("{indent}'{KEY}' => '{old}'"));
        }
        let body = entries.join(",\n");
        let comma = if trailing_comma && !entries.is_empty() { "," } else { "" };
        let text = format!("external_url 'https://gitlab'\n# a comment\ngitlab_rails['env'] = {{\n{body}{comma}\n}}\nnginx['enable'] = true\n");
        let edited = set_gateway_url(&text, &url).unwrap();
        let (added, removed) = changed_lines(&text, &edited);
        prop_assert_eq!(added.len(), 1, "{}", edited);
        prop_assert!(removed.len() <= 1);
        prop_assert_eq!(read_gateway_url(&edited).unwrap(), Some(url.clone()));
        let mut expected: BTreeMap<String, String> = other_keys.into_iter().filter(|(k, _)| k.as_str() != KEY).collect();
        expected.insert(KEY.to_string(), url);
        prop_assert_eq!(ruby_env(&edited), serde_json::to_value(expected).unwrap());
    }
}

/// Code Ruby may never run is not the active env: the parser finds it, and
/// the edit is refused with the line and what to change. The same files
/// with the hash at the top level are edited, and Ruby agrees.
#[test]
fn assignments_ruby_may_not_run_are_refused_with_their_line() {
    for (text, line) in [
        (
            "external_url 'x'\nnotes = <<~EOS\n  gitlab_rails['env'] = { 'A' => 'b' }\nEOS\n",
            3,
        ),
        ("if false\n  gitlab_rails['env'] = { 'A' => 'b' }\nend\n", 2),
        (
            "def setup\n  gitlab_rails['env'] = { 'A' => 'b' }\nend\n",
            2,
        ),
        ("while ENV['X']\n  gitlab_rails['env'] = {}\nend\n", 2),
        ("[1].each do\n  gitlab_rails['env'] = {}\nend\n", 2),
    ] {
        let err = set_gateway_url(text, URL).unwrap_err();
        assert_eq!(err.line, line, "{text}: {err}");
        assert!(
            err.to_string().contains("is not a top-level statement")
                && err
                    .to_string()
                    .contains("move the env hash to the top level"),
            "{text}: {err}"
        );
        assert!(read_gateway_url(text).is_err());
    }
    // A modifier `if` is refused too (as code after the hash).
    assert!(set_gateway_url("gitlab_rails['env'] = { 'A' => 'b' } if ENV['X']\n", URL).is_err());
    // The plain top-level form is edited, and Ruby agrees.
    let text = "gitlab_rails['env'] = {\n  'http_proxy' => 'http://p:3128',\n}\n";
    let edited = set_gateway_url(text, URL).unwrap();
    assert_eq!(
        ruby_env(&edited),
        env(&[("http_proxy", "http://p:3128"), ("AI_GATEWAY_URL", URL)])
    );
}

#[test]
fn a_file_ruby_cannot_read_is_left_alone() {
    let text = "external_url 'x'\ngitlab_rails['time_zone'] = 'UTC\n";
    let err = set_gateway_url(text, URL).unwrap_err();
    assert!(
        err.to_string().contains("gitlab.rb is not valid Ruby"),
        "{err}"
    );
    assert!(err.to_string().contains("ruby -c"), "{err}");
}

/// Positions come from the parser: other string forms, escapes and
/// multi-byte text before the entry are read and replaced exactly.
#[test]
fn the_parser_reads_every_string_form_and_byte_ranges_hold() {
    for (value, reads) in [
        ("%q(http://old)", "http://old"),
        (r#""http://o\"ld""#, "http://o\"ld"),
        (r"'http://o\'ld'", "http://o'ld"),
    ] {
        let text = format!(
            "# Zürich ✓ — gitlab.rb\ngitlab_rails['env'] = {{\n  'AI_GATEWAY_URL' => {value}, 'X' => 'ü'\n}}\n"
        );
        assert_eq!(
            read_gateway_url(&text).unwrap().as_deref(),
            Some(reads),
            "{text}"
        );
        let edited = set_gateway_url(&text, URL).unwrap();
        assert_eq!(
            edited,
            text.replace(value, &format!("'{URL}'")),
            "only the value literal changes"
        );
        assert_eq!(
            ruby_env(&edited),
            env(&[("AI_GATEWAY_URL", URL), ("X", "ü")])
        );
    }
    // Adjacent literals are one concatenated string: refused, not half-edited.
    let text = "gitlab_rails['env'] = { 'AI_GATEWAY_URL' => 'http://a' 'b' }\n";
    let err = set_gateway_url(text, URL).unwrap_err();
    assert!(err.to_string().contains("concatenation"), "{err}");
}

fn ruby_fragments() -> impl Strategy<Value = String> {
    let fragment = proptest::sample::select(vec![
        "gitlab_rails",
        "['env']",
        "[\"env\"]",
        " = ",
        "=",
        "{",
        "}",
        "{}",
        "'AI_GATEWAY_URL'",
        "\"AI_GATEWAY_URL\"",
        "AI_GATEWAY_URL: ",
        " => ",
        "'x'",
        "\"y\"",
        "'",
        "\"",
        "# ",
        "\n",
        "=begin\n",
        "=end\n",
        "<<~EOS\n",
        "EOS\n",
        "if true\n",
        "end\n",
        "ü",
        "%q(",
        ")",
        ",",
        "\\",
        "#{",
        ".merge!(a)",
        " ||= ",
        "def f\n",
        "[1].each do\n",
        "nginx['x'] = 1\n",
        "\t",
    ]);
    proptest::collection::vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Whatever the file holds, the editor never panics, and an edit it
    /// makes always reads back as the URL that was set.
    #[test]
    fn no_input_panics_and_every_edit_reads_back(
        text in prop_oneof![ruby_fragments(), any::<String>()],
    ) {
        let _ = read_gateway_url(&text);
        if let Ok(edited) = set_gateway_url(&text, URL) {
            prop_assert_eq!(read_gateway_url(&edited), Ok(Some(URL.to_string())), "{:?} -> {:?}", text, edited);
        }
    }
}

/// Found by the property test: a heredoc where lib-ruby-parser's builder
/// has no case for it panics inside the parser. The agent refuses the
/// file, names the problem and carries on.
#[test]
fn a_file_the_parser_gives_up_on_is_refused_not_a_crash() {
    let text = "if true\n,<<~EOS\nEOS\n{# \n'";
    let refused = set_gateway_url(text, URL).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("the agent's parser cannot read"),
        "{refused}"
    );
    assert!(read_gateway_url(text).is_err());
}

/// Found by the property test: a parse error the parser locates inside a
/// multi-byte character, and an unterminated string that ends in one.
#[test]
fn positions_inside_characters_do_not_panic() {
    for text in ["*𑤖#𐖻g^ଂxg]=j𐎓&`<ৗ", "gitlab_rails['envü", "x = 'ৗ"] {
        assert!(
            set_gateway_url(text, URL).is_err() || read_gateway_url(text).is_ok(),
            "{text}"
        );
        let _ = read_gateway_url(text);
    }
}
