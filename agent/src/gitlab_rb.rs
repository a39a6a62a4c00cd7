//! Editing `AI_GATEWAY_URL` in gitlab.rb the way a careful administrator
//! would: only that entry changes, every other byte stays.
//!
//! gitlab.rb is Ruby and belongs to the administrator, so the file is read
//! with a real Ruby parser (lib-ruby-parser, Ruby 3.1's grammar), and the
//! edit replaces exactly the byte ranges the parser reports:
//!
//! - the last top-level `gitlab_rails['env'] = { ... }` wins in Ruby, so that
//!   is the one edited: its `'AI_GATEWAY_URL' => '...'` value literal is
//!   replaced, or the entry is added as the hash's first entry;
//! - without one, a marked block is appended;
//! - a file that does not parse is left alone;
//! - an env built in a way that cannot be edited safely (`.merge`, a
//!   variable, `gitlab_rails['env']['AI_GATEWAY_URL'] = ...`, `||=`,
//!   string interpolation in the value, a symbol key) is refused with what
//!   to change;
//! - a small scanner that knows comments, `=begin`/`=end` and quoted
//!   strings finds every mention of `gitlab_rails['env']`: one the parser
//!   does not see as a top-level statement (inside a heredoc or another
//!   string, a conditional, a loop, a method or a block) is refused with
//!   its line, since Ruby may never run it.

pub const KEY: &str = "AI_GATEWAY_URL";
pub const BEGIN_MARK: &str = "# BEGIN duofleet managed";
pub const END_MARK: &str = "# END duofleet managed";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("gitlab.rb line {line}: {problem}; {fix}")]
pub struct Unsafe {
    pub line: usize,
    pub problem: String,
    pub fix: &'static str,
}

const FIX: &str = "write gitlab_rails['env'] as a literal hash, e.g. gitlab_rails['env'] = { 'AI_GATEWAY_URL' => 'https://...' }, so duofleet can manage the entry";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Code,
    Comment,
    Str,
}

#[derive(Debug, Clone)]
struct StrLit {
    /// Byte range including the quotes.
    start: usize,
    end: usize,
}

impl StrLit {
    /// Between the quotes; empty for an unterminated string that ends
    /// inside a character.
    fn raw<'a>(&self, text: &'a str) -> &'a str {
        text.get(self.start + 1..self.end - 1).unwrap_or_default()
    }
}

struct Scan<'a> {
    text: &'a str,
    class: Vec<Class>,
    strings: Vec<StrLit>,
}

fn scan(text: &str) -> Scan<'_> {
    let bytes = text.as_bytes();
    let mut class = vec![Class::Code; bytes.len()];
    let mut strings = Vec::new();
    let mut i = 0;
    let at_line_start = |i: usize| i == 0 || bytes[i - 1] == b'\n';
    while i < bytes.len() {
        match bytes[i] {
            b'=' if at_line_start(i) && text[i..].starts_with("=begin") => {
                let end =
                    find_line_starting(text, i, "=end").map_or(bytes.len(), |e| line_end(text, e));
                class[i..end].fill(Class::Comment);
                i = end;
            }
            b'#' => {
                let end = line_end(text, i);
                class[i..end].fill(Class::Comment);
                i = end;
            }
            quote @ (b'\'' | b'"') => {
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != quote {
                    if bytes[j] == b'\\' {
                        j += 1;
                    }
                    j += 1;
                }
                let end = (j + 1).min(bytes.len());
                class[i..end].fill(Class::Str);
                strings.push(StrLit { start: i, end });
                i = end;
            }
            _ => i += 1,
        }
    }
    Scan {
        text,
        class,
        strings,
    }
}

fn line_end(text: &str, from: usize) -> usize {
    text[from..].find('\n').map_or(text.len(), |n| from + n)
}

fn find_line_starting(text: &str, from: usize, prefix: &str) -> Option<usize> {
    let mut pos = line_end(text, from);
    while pos < text.len() {
        let start = pos + 1;
        if text[start..].starts_with(prefix) {
            return Some(start);
        }
        pos = line_end(text, start);
    }
    None
}

/// The line of byte `pos`; the parser may point inside a character.
fn line_of(text: &str, pos: usize) -> usize {
    let bytes = text.as_bytes();
    bytes[..pos.min(bytes.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

/// A `gitlab_rails['env'] = { ... }` the scanner found.
#[derive(Debug)]
struct Assignment {
    /// Where `gitlab_rails` starts.
    start: usize,
}

impl Scan<'_> {
    fn is_code(&self, pos: usize) -> bool {
        self.class.get(pos) == Some(&Class::Code)
    }

    fn skip_space(&self, mut pos: usize, newlines: bool) -> usize {
        let bytes = self.text.as_bytes();
        while pos < bytes.len()
            && (bytes[pos] == b' '
                || bytes[pos] == b'\t'
                || (newlines && (bytes[pos] == b'\n' || bytes[pos] == b'\r')))
        {
            pos += 1;
        }
        pos
    }

    fn string_at(&self, pos: usize) -> Option<&StrLit> {
        self.strings.iter().find(|s| s.start == pos)
    }

    /// Finds every active use of `gitlab_rails['env']` and sorts them into
    /// literal-hash assignments, or refuses the file.
    fn assignments(&self) -> Result<Vec<Assignment>, Unsafe> {
        let text = self.text;
        let bytes = text.as_bytes();
        let mut found = Vec::new();
        let mut from = 0;
        while let Some(offset) = text[from..].find("gitlab_rails") {
            let start = from + offset;
            from = start + "gitlab_rails".len();
            let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
            if !self.is_code(start) || (start > 0 && ident(bytes[start - 1])) {
                continue;
            }
            let mut pos = self.skip_space(from, false);
            if bytes.get(pos) != Some(&b'[') {
                continue;
            }
            pos = self.skip_space(pos + 1, false);
            let Some(key) = self.string_at(pos) else {
                continue;
            };
            if key.raw(text) != "env" {
                continue;
            }
            pos = self.skip_space(key.end, false);
            if bytes.get(pos) != Some(&b']') {
                continue;
            }
            pos = self.skip_space(pos + 1, false);
            let line = line_of(text, start);
            let refuse = |problem: String| Unsafe {
                line,
                problem,
                fix: FIX,
            };
            match bytes.get(pos) {
                Some(b'=') if !matches!(bytes.get(pos + 1), Some(b'=' | b'~' | b'>')) => {
                    let rhs = self.skip_space(pos + 1, true);
                    if bytes.get(rhs) != Some(&b'{') {
                        return Err(refuse("gitlab_rails['env'] is assigned something other than a literal hash (a variable or method call)".into()));
                    }
                    let close = self
                        .matching_brace(rhs)
                        .ok_or_else(|| refuse("the env hash has no closing brace".into()))?;
                    let after = self.skip_space(close + 1, false);
                    if after < bytes.len()
                        && bytes[after] != b'\n'
                        && bytes[after] != b'\r'
                        && self.is_code(after)
                    {
                        return Err(refuse(
                            "the env hash is followed by more code (e.g. .merge)".into(),
                        ));
                    }
                    found.push(Assignment { start });
                    from = close + 1;
                }
                Some(b'[') => {
                    let key_pos = self.skip_space(pos + 1, false);
                    if self.string_at(key_pos).is_some_and(|k| k.raw(text) == KEY) {
                        return Err(refuse(format!(
                            "{KEY} is set with gitlab_rails['env']['{KEY}'] = ..."
                        )));
                    }
                }
                Some(b'.') => {
                    return Err(refuse(
                        "gitlab_rails['env'] is changed by a method call (e.g. .merge!)".into(),
                    ));
                }
                Some(b'|' | b'+') => {
                    return Err(refuse(
                        "gitlab_rails['env'] is assigned with ||= or +=".into(),
                    ));
                }
                _ => {}
            }
        }
        Ok(found)
    }

    fn matching_brace(&self, open: usize) -> Option<usize> {
        let bytes = self.text.as_bytes();
        let mut depth = 0usize;
        for (pos, &b) in bytes.iter().enumerate().skip(open) {
            if !self.is_code(pos) {
                continue;
            }
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(pos);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// One top-level `gitlab_rails['env'] = { ... }`, as Ruby's grammar sees it:
/// every position here comes from the parser.
#[derive(Debug)]
struct EnvHash {
    /// Where the statement starts (`gitlab_rails`).
    start: usize,
    /// The hash's `{` and `}`.
    open: usize,
    close: usize,
    /// Its `AI_GATEWAY_URL` values in order: the literal's byte range
    /// (quotes included) and the string Ruby reads from it.
    entries: Vec<(std::ops::Range<usize>, String)>,
}

/// The env hashes Ruby runs, in order (the last one wins). The scanner
/// refuses the forms duofleet cannot edit safely; the parser then finds
/// the top-level assignments and everything the edit touches, and any
/// assignment the scanner saw that is not among them (inside a string or
/// heredoc, a conditional, a loop, a method or a block) is refused.
fn active_env(text: &str) -> Result<(Scan<'_>, Vec<EnvHash>), Unsafe> {
    let scan = scan(text);
    let scanned = scan.assignments()?;
    let parsed = parse_env(text)?;
    for assignment in &scanned {
        if !parsed.iter().any(|hash| hash.start == assignment.start) {
            return Err(Unsafe {
                line: line_of(text, assignment.start),
                problem: "this gitlab_rails['env'] is not a top-level statement (it is inside a string or heredoc, a conditional, a loop, a method or a block), so Ruby may never run it".into(),
                fix: "move the env hash to the top level of gitlab.rb, outside any string, if/unless/case, loop, def or block",
            });
        }
    }
    Ok((scan, parsed))
}

/// The top-level `gitlab_rails['env'] = { ... }` statements of a file that
/// parses (Ruby 3.1's grammar), with their `AI_GATEWAY_URL` entries.
fn parse_env(text: &str) -> Result<Vec<EnvHash>, Unsafe> {
    use lib_ruby_parser::{ErrorLevel, Node, Parser, ParserOptions};
    // The parser has inputs it does not expect and panics on (a heredoc
    // in a position its builder has no case for): that is a file it cannot
    // read, never a crash of the agent.
    let parsed = std::panic::catch_unwind(|| {
        Parser::new(text.as_bytes().to_vec(), ParserOptions::default()).do_parse()
    });
    let Ok(result) = parsed else {
        return Err(Unsafe {
            line: 1,
            problem: "gitlab.rb holds Ruby that the agent's parser cannot read (its Ruby 3.1 grammar gave up on it)".into(),
            fix: "check the file with `ruby -c /etc/gitlab/gitlab.rb`, and simplify the unusual construct (often a heredoc inside an expression); duofleet does not edit a file it cannot read",
        });
    };
    if let Some(error) = result
        .diagnostics
        .iter()
        .find(|d| d.level == ErrorLevel::Error)
    {
        return Err(Unsafe {
            line: line_of(text, error.loc.begin.min(text.len())),
            problem: format!("gitlab.rb is not valid Ruby ({})", error.message.render()),
            fix: "fix the file first (`ruby -c /etc/gitlab/gitlab.rb` shows the error); duofleet does not edit a file Ruby cannot read",
        });
    }
    let Some(ast) = result.ast else {
        return Ok(Vec::new());
    };
    let statements: Vec<&Node> = match &*ast {
        Node::Begin(begin) => begin.statements.iter().collect(),
        single => vec![single],
    };
    let mut hashes = Vec::new();
    for statement in statements {
        let Node::IndexAsgn(assign) = statement else {
            continue;
        };
        let receiver_is_gitlab_rails = matches!(
            &*assign.recv,
            Node::Send(send) if send.recv.is_none() && send.method_name == "gitlab_rails"
        );
        let index_is_env = matches!(
            assign.indexes.as_slice(),
            [Node::Str(key)] if key.value.raw == b"env"
        );
        if !(receiver_is_gitlab_rails && index_is_env) {
            continue;
        }
        let start = assign.expression_l.begin;
        let refuse = |at: usize, problem: String| Unsafe {
            line: line_of(text, at),
            problem,
            fix: FIX,
        };
        let hash = match assign.value.as_deref() {
            Some(Node::Hash(hash)) => hash,
            _ => {
                return Err(refuse(
                    start,
                    "gitlab_rails['env'] is assigned something other than a literal hash (a variable or method call)".into(),
                ));
            }
        };
        let (Some(open), Some(close)) = (&hash.begin_l, &hash.end_l) else {
            return Err(refuse(start, "the env hash has no braces".into()));
        };
        let mut entries = Vec::new();
        for pair in &hash.pairs {
            let Node::Pair(pair) = pair else { continue };
            match &*pair.key {
                Node::Str(key) if key.value.raw == KEY.as_bytes() => {}
                Node::Sym(key) if key.name.raw == KEY.as_bytes() => {
                    return Err(refuse(
                        pair.expression_l.begin,
                        format!("{KEY} is written as a symbol key"),
                    ));
                }
                _ => continue,
            }
            match &*pair.value {
                Node::Str(value) => entries.push((
                    value.expression_l.to_range(),
                    String::from_utf8_lossy(&value.value.raw).into_owned(),
                )),
                Node::Dstr(_) => {
                    return Err(refuse(
                        pair.expression_l.begin,
                        format!("the {KEY} value uses string interpolation or concatenation"),
                    ));
                }
                _ => {
                    return Err(refuse(
                        pair.expression_l.begin,
                        format!("the {KEY} value is not a quoted string"),
                    ));
                }
            }
        }
        hashes.push(EnvHash {
            start,
            open: open.begin,
            close: close.begin,
            entries,
        });
    }
    Ok(hashes)
}

/// The AI_GATEWAY_URL that gitlab.rb sets (the last active assignment wins),
/// or `None` when it sets none.
pub fn read_gateway_url(text: &str) -> Result<Option<String>, Unsafe> {
    let (_, hashes) = active_env(text)?;
    Ok(hashes
        .last()
        .and_then(|hash| hash.entries.last())
        .map(|(_, value)| value.clone()))
}

/// Returns gitlab.rb with AI_GATEWAY_URL set to `url`, every other byte
/// kept: the edit replaces the byte ranges the parser reported.
pub fn set_gateway_url(text: &str, url: &str) -> Result<String, Unsafe> {
    let edited = edit(text, url)?;
    // The edit must read back as exactly this URL: Ruby's grammar can join
    // what was appended to an unfinished last line (e.g. an endless range
    // `x..`), and then the new hash is not a statement of its own.
    match read_gateway_url(&edited) {
        Ok(Some(found)) if found == url => Ok(edited),
        _ => Err(Unsafe {
            line: text.lines().count().max(1),
            problem: "the edited file would not set AI_GATEWAY_URL as a statement of its own (the file's end joins what is added to it)".into(),
            fix: "end gitlab.rb with a complete statement, or add gitlab_rails['env'] = { 'AI_GATEWAY_URL' => '...' } yourself",
        }),
    }
}

fn edit(text: &str, url: &str) -> Result<String, Unsafe> {
    let (scan, hashes) = active_env(text)?;
    let literal = ruby_string(url);
    let Some(last) = hashes.last() else {
        let mut out = text.to_string();
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!(
            "\n{BEGIN_MARK}\n# Written by duofleet-agent. Edit the profile in duofleet, not this block.\ngitlab_rails['env'] = {{\n  '{KEY}' => {literal}\n}}\n{END_MARK}\n"
        ));
        return Ok(out);
    };
    let mut out = text.to_string();
    if last.entries.is_empty() {
        let after_brace = last.open + 1;
        let rest_of_line = &text[after_brace..line_end(text, after_brace)];
        let inline = scan.class[after_brace..after_brace + rest_of_line.len()]
            .iter()
            .zip(rest_of_line.bytes())
            .any(|(class, b)| *class != Class::Comment && !b.is_ascii_whitespace());
        if inline {
            out.insert_str(after_brace, &format!(" '{KEY}' => {literal},"));
        } else {
            let indent = entry_indent(text, last);
            let at = line_end(text, after_brace) + 1;
            out.insert_str(
                at.min(out.len()),
                &format!("{indent}'{KEY}' => {literal},\n"),
            );
        }
        return Ok(out);
    }
    // Replace from the end so earlier offsets stay valid.
    for (range, _) in last.entries.iter().rev() {
        out.replace_range(range.clone(), &literal);
    }
    Ok(out)
}

/// The indentation of the hash's first entry line, or the assignment's plus two.
fn entry_indent(text: &str, hash: &EnvHash) -> String {
    let body_start = line_end(text, hash.open) + 1;
    if body_start < hash.close {
        for line in text[body_start..hash.close].lines() {
            let trimmed = line.trim_start();
            if !trimmed.is_empty() && !trimmed.starts_with('#') && !trimmed.starts_with('}') {
                return line[..line.len() - trimmed.len()].to_string();
            }
        }
    }
    let line_start = text[..hash.start].rfind('\n').map_or(0, |n| n + 1);
    let own = &text[line_start..hash.start];
    format!("{}  ", &own[..own.len() - own.trim_start().len()])
}

/// A Ruby single-quoted string literal.
pub fn ruby_string(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
#[path = "gitlab_rb_tests.rs"]
mod tests;
