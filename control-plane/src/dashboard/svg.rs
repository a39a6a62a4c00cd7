//! A small latency chart per target, drawn on the server as inline SVG: a
//! line of the last probes' latency, with failed probes marked in red
//! below it (and counted in the title, for screen readers).

use crate::registry::LatencySample;
use maud::{Markup, html};

const WIDTH: f64 = 180.0;
const HEIGHT: f64 = 36.0;

pub fn latency_chart(samples: &[LatencySample]) -> Markup {
    if samples.is_empty() {
        return html! { span class="muted" { "no samples yet" } };
    }
    let max = samples
        .iter()
        .filter(|s| s.healthy)
        .map(|s| s.latency_ms)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let step = if samples.len() > 1 {
        WIDTH / (samples.len() - 1) as f64
    } else {
        0.0
    };
    let points: Vec<String> = samples
        .iter()
        .enumerate()
        .filter(|(_, s)| s.healthy)
        .map(|(n, s)| {
            let x = n as f64 * step;
            let y = HEIGHT - 4.0 - (s.latency_ms as f64 / max) * (HEIGHT - 8.0);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let failed = samples.iter().filter(|s| !s.healthy).count();
    let last = samples.last().map_or(0, |s| s.latency_ms);
    let title = format!(
        "{} probes: latest {last} ms, highest {max:.0} ms, {failed} failed",
        samples.len()
    );
    html! {
        svg width=(WIDTH) height=(HEIGHT) viewBox={ "0 0 " (WIDTH) " " (HEIGHT) } role="img" aria-label=(title) class="latency" {
            title { (title) }
            rect x="0" y="0" width=(WIDTH) height=(HEIGHT) fill="#f4f4f4" {}
            polyline fill="none" stroke="#2b2250" stroke-width="1.5" points=(points.join(" ")) {}
            @for (n, s) in samples.iter().enumerate() {
                @if s.healthy {
                    circle cx={ (format!("{:.1}", n as f64 * step)) } cy={ (format!("{:.1}", HEIGHT - 4.0 - (s.latency_ms as f64 / max) * (HEIGHT - 8.0))) } r="1.5" fill="#2b2250" {}
                } @else {
                    rect x={ (format!("{:.1}", n as f64 * step - 1.5)) } y=(HEIGHT - 4.0) width="3" height="4" fill="#c00" {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_draws_healthy_probes_and_marks_failures() {
        let samples: Vec<LatencySample> = (0..5)
            .map(|n| LatencySample {
                time: n,
                latency_ms: 10 * (n as u32 + 1),
                healthy: n != 3,
            })
            .collect();
        let svg = latency_chart(&samples).into_string();
        assert!(
            svg.contains("<title>5 probes: latest 50 ms, highest 50 ms, 1 failed</title>"),
            "{svg}"
        );
        assert_eq!(svg.matches("fill=\"#c00\"").count(), 1);
        assert!(svg.starts_with("<svg"));
    }
}
