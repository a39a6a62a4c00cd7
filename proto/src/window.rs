//! Maintenance windows (`ReconfigureWindow`): when host changes may run.
//! One definition for the control plane (validation, rollout gates) and
//! the agent (which holds back gitlab.rb changes and reconfigures).
//!
//! A window opens on each listed day (every day when none are listed) at
//! `start`, local time in `time_zone`, and stays open until `end`: an end
//! before the start spans midnight, an end equal to the start means 24
//! hours. Across a daylight-saving change the opening keeps its local
//! start time (a start inside a skipped hour moves to after it).

use crate::v1::ReconfigureWindow;
use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

/// A window that does not parse: the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct WindowError {
    pub field: &'static str,
    pub rule: String,
}

/// A parsed window.
#[derive(Debug, Clone)]
pub struct Window {
    days: Vec<Weekday>,
    start: (i8, i8),
    length: SignedDuration,
    zone: TimeZone,
}

fn minutes(field: &'static str, text: &str, allow_24: bool) -> Result<(i8, i8), WindowError> {
    let bad = || WindowError {
        field,
        rule: format!("{text:?} is not a time of day as HH:MM (24 h), e.g. \"02:30\""),
    };
    let (h, m) = text.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (i8, i8) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if (0..24).contains(&h) && (0..60).contains(&m) || (allow_24 && h == 24 && m == 0) {
        Ok((h, m))
    } else {
        Err(bad())
    }
}

impl Window {
    pub fn parse(window: &ReconfigureWindow) -> Result<Window, WindowError> {
        let mut days = Vec::new();
        for day in &window.days {
            let found = DAYS
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(day))
                .ok_or_else(|| WindowError {
                    field: "reconfigure_window.days",
                    rule: format!("{day:?} is not a day; use mon, tue, wed, thu, fri, sat, sun"),
                })?;
            if days.contains(&found.1) {
                return Err(WindowError {
                    field: "reconfigure_window.days",
                    rule: format!("{day:?} is listed twice"),
                });
            }
            days.push(found.1);
        }
        if days.is_empty() {
            days = DAYS.iter().map(|(_, d)| *d).collect();
        }
        let start = minutes("reconfigure_window.start", &window.start, false)?;
        let end = minutes("reconfigure_window.end", &window.end, true)?;
        let (s, e) = (
            start.0 as i64 * 60 + start.1 as i64,
            end.0 as i64 * 60 + end.1 as i64,
        );
        let length = match (e - s).rem_euclid(1440) {
            0 => 1440,
            n => n,
        };
        let zone = match window.time_zone.as_str() {
            "" | "UTC" => TimeZone::UTC,
            name => TimeZone::get(name).map_err(|_| WindowError {
                field: "reconfigure_window.time_zone",
                rule: format!(
                    "{name:?} is not a known IANA time zone (e.g. \"Europe/Berlin\", \"America/New_York\", or empty for UTC)"
                ),
            })?,
        };
        Ok(Window {
            days,
            start,
            length: SignedDuration::from_mins(length),
            zone,
        })
    }

    /// When the opening of `date` (local) begins, if the window opens that day.
    fn opening(&self, date: Date) -> Option<Timestamp> {
        if !self.days.contains(&date.weekday()) {
            return None;
        }
        let local = date.at(self.start.0, self.start.1, 0, 0);
        Some(local.to_zoned(self.zone.clone()).ok()?.timestamp())
    }

    fn local_date(&self, at: Timestamp) -> Date {
        at.to_zoned(self.zone.clone()).date()
    }

    /// Whether host changes may run at `at`.
    pub fn contains(&self, at: Timestamp) -> bool {
        let today = self.local_date(at);
        [today.yesterday().ok(), Some(today)]
            .into_iter()
            .flatten()
            .filter_map(|d| self.opening(d))
            .any(|open| open <= at && at < open.checked_add(self.length).unwrap_or(open))
    }

    /// `at` when the window is open then; otherwise when it opens next.
    pub fn next_open(&self, at: Timestamp) -> Timestamp {
        if self.contains(at) {
            return at;
        }
        let mut day = self.local_date(at);
        for _ in 0..9 {
            if let Some(open) = self.opening(day)
                && open > at
            {
                return open;
            }
            match day.tomorrow() {
                Ok(next) => day = next,
                Err(_) => break,
            }
        }
        at
    }

    /// When the opening that contains `at` closes (`at` when closed).
    pub fn closes(&self, at: Timestamp) -> Timestamp {
        let today = self.local_date(at);
        [today.yesterday().ok(), Some(today)]
            .into_iter()
            .flatten()
            .filter_map(|d| self.opening(d))
            .map(|open| (open, open.checked_add(self.length).unwrap_or(open)))
            .filter(|(open, close)| *open <= at && at < *close)
            .map(|(_, close)| close)
            .max()
            .unwrap_or(at)
    }
}

/// "sat,sun 02:00-05:00 Europe/Berlin"; "every day 22:00-02:00 UTC".
pub fn describe(window: &ReconfigureWindow) -> String {
    let days = if window.days.is_empty() {
        "every day".to_string()
    } else {
        window.days.join(",")
    };
    let zone = if window.time_zone.is_empty() {
        "UTC"
    } else {
        &window.time_zone
    };
    format!("{days} {}-{} {zone}", window.start, window.end)
}

/// A prost timestamp as jiff's.
pub fn timestamp(ts: &prost_types::Timestamp) -> Timestamp {
    Timestamp::new(ts.seconds, ts.nanos.clamp(0, 999_999_999)).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// jiff's timestamp as prost's.
pub fn to_proto(ts: Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ts.as_second(),
        nanos: ts.subsec_nanosecond(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(days: &[&str], start: &str, end: &str, zone: &str) -> Window {
        Window::parse(&ReconfigureWindow {
            days: days.iter().map(|d| d.to_string()).collect(),
            start: start.into(),
            end: end.into(),
            time_zone: zone.into(),
        })
        .unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn weekend_nights_in_berlin() {
        // 2026-11-28 is a Saturday; Berlin is UTC+1 in November.
        let w = window(&["sat", "sun"], "02:00", "05:00", "Europe/Berlin");
        assert!(!w.contains(at("2026-11-27T23:00:00Z")));
        assert!(w.contains(at("2026-11-28T01:00:00Z")));
        assert!(!w.contains(at("2026-11-28T04:00:00Z")));
        assert_eq!(
            w.next_open(at("2026-11-26T12:00:00Z")),
            at("2026-11-28T01:00:00Z")
        );
        assert_eq!(
            w.next_open(at("2026-11-29T04:30:00Z")),
            at("2026-12-05T01:00:00Z")
        );
        assert_eq!(
            w.closes(at("2026-11-28T02:00:00Z")),
            at("2026-11-28T04:00:00Z")
        );
    }

    #[test]
    fn overnight_and_whole_day_windows() {
        let w = window(&["fri"], "22:00", "02:00", "");
        // Friday 2026-11-27, 23:00 and Saturday 01:00 are inside.
        assert!(w.contains(at("2026-11-27T23:00:00Z")));
        assert!(w.contains(at("2026-11-28T01:59:00Z")));
        assert!(!w.contains(at("2026-11-28T02:00:00Z")));
        let always = window(&[], "00:00", "00:00", "UTC");
        assert!(always.contains(at("2026-11-26T13:37:00Z")));
        let until_midnight = window(&[], "20:00", "24:00", "UTC");
        assert!(until_midnight.contains(at("2026-11-26T23:59:00Z")));
        assert!(!until_midnight.contains(at("2026-11-26T00:30:00Z")));
    }

    #[test]
    fn bad_windows_name_the_field() {
        let bad = |days: &[&str], start: &str, end: &str, zone: &str| {
            Window::parse(&ReconfigureWindow {
                days: days.iter().map(|d| d.to_string()).collect(),
                start: start.into(),
                end: end.into(),
                time_zone: zone.into(),
            })
            .unwrap_err()
            .to_string()
        };
        assert!(bad(&["someday"], "02:00", "03:00", "").starts_with("reconfigure_window.days:"));
        assert!(bad(&["mon", "mon"], "02:00", "03:00", "").contains("listed twice"));
        assert!(bad(&[], "2:00", "03:00", "").starts_with("reconfigure_window.start:"));
        assert!(bad(&[], "02:00", "24:30", "").starts_with("reconfigure_window.end:"));
        assert!(
            bad(&[], "02:00", "03:00", "Mars/Olympus").starts_with("reconfigure_window.time_zone:")
        );
    }
}
