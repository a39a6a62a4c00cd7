//! What the agent sends stays within duofleetd's limits, so that nothing it
//! reports is refused: long texts (a reconfigure's output, GitLab's
//! messages) are cut at a character boundary with a marker, lists are cut
//! with a last entry that says how many were left out.

use duofleet_proto::v1::{Ack, HealthReport, SyncItem, SyncItemState};

/// duofleetd's limits (control-plane/src/agent_input.rs), kept a little
/// lower so that the marker fits.
const ERROR_MAX: usize = 16 * 1024 - 64;
const DETAIL_MAX: usize = 2048 - 64;
const LIST_MAX: usize = 256;

/// `text` cut to at most `max` bytes, with a marker when cut.
pub fn cut(text: &mut String, max: usize) {
    if text.len() <= max {
        return;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let dropped = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" [... {dropped} more bytes]"));
}

pub fn ack(mut ack: Ack) -> Ack {
    cut(&mut ack.error, ERROR_MAX);
    if let Some(host) = &mut ack.host_sync {
        cut(&mut host.error, ERROR_MAX);
        cut(&mut host.detail, DETAIL_MAX);
    }
    if let Some(sync) = &mut ack.gitlab_sync {
        cut(&mut sync.detail, DETAIL_MAX);
        if sync.unmanaged_models.len() > LIST_MAX {
            sync.unmanaged_models.truncate(LIST_MAX);
        }
        if sync.items.len() > LIST_MAX {
            let left_out = sync.items.len() - (LIST_MAX - 1);
            sync.items.truncate(LIST_MAX - 1);
            sync.items.push(SyncItem {
                kind: "note".into(),
                key: "items".into(),
                state: SyncItemState::Unspecified as i32,
                detail: format!("{left_out} more items left out"),
            });
        }
        for item in &mut sync.items {
            cut(&mut item.detail, DETAIL_MAX);
        }
    }
    ack
}

pub fn health(mut report: HealthReport) -> HealthReport {
    report.results.truncate(LIST_MAX);
    for result in &mut report.results {
        cut(&mut result.error, DETAIL_MAX);
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_at_a_character_boundary() {
        let mut text = "é".repeat(10);
        cut(&mut text, 5);
        assert_eq!(text, "éé [... 16 more bytes]");
        let mut short = "ok".to_string();
        cut(&mut short, 5);
        assert_eq!(short, "ok");
        let long = Ack {
            error: "x".repeat(100_000),
            ..Default::default()
        };
        assert!(ack(long).error.len() <= 16 * 1024);
    }
}
