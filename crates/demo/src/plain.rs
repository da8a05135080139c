//! The live view as plain lines, for a standard output that is not a terminal (a log,
//! a pipe, CI): act headings, events as they happen, and one compact line of every
//! service's numbers at most every few seconds. Nothing is ever redrawn.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use tokio::sync::watch;

use crate::frame::{Frame, Row};

/// Draws frames as plain lines until the sender is dropped. A service line is printed
/// at most every `every`; act changes and events at once.
pub(crate) async fn run(mut rx: watch::Receiver<Frame>, every: Duration) {
    let mut state = Plain::default();
    let mut last_line: Option<tokio::time::Instant> = None;
    while rx.changed().await.is_ok() {
        let frame = rx.borrow_and_update().clone();
        let now = tokio::time::Instant::now();
        let line_due = last_line.is_none_or(|t| now >= t + every);
        let text = state.render(&frame, line_due);
        if line_due && !frame.rows.is_empty() {
            last_line = Some(now);
        }
        if !text.is_empty() {
            let mut out = std::io::stdout().lock();
            // A closed standard output (the reader left) is not the demo's failure.
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    }
}

/// What has been printed already.
#[derive(Debug, Default)]
struct Plain {
    act: String,
    events: Vec<String>,
    tried: bool,
}

impl Plain {
    /// The text to print for this frame: what is new since the last one, and the
    /// service line when `line_due`.
    fn render(&mut self, frame: &Frame, line_due: bool) -> String {
        let mut out = String::new();
        if !self.tried && !frame.try_next.is_empty() {
            self.tried = true;
            out.push_str("Try from a second shell:\n");
            for command in &frame.try_next {
                let _ = writeln!(out, "  {command}");
            }
        }
        if frame.act != self.act {
            self.act.clone_from(&frame.act);
            if !frame.act.is_empty() {
                let _ = writeln!(out, "== {}", frame.act);
                if !frame.caption.is_empty() {
                    let _ = writeln!(out, "   {}", frame.caption);
                }
            }
        }
        for event in new_events(&self.events, &frame.events) {
            let mut lines = event.lines();
            if let Some(first) = lines.next() {
                let _ = writeln!(out, "   * {first}");
            }
            for line in lines {
                let _ = writeln!(out, "       {line}");
            }
        }
        self.events.clone_from(&frame.events);
        if line_due && !frame.rows.is_empty() {
            let _ = writeln!(out, "{}", service_line(frame));
        }
        out
    }
}

/// The events of `now` that `before` did not end with: `now` is a sliding window, so
/// the longest suffix of `before` that starts `now` was printed already.
fn new_events<'a>(before: &[String], now: &'a [String]) -> &'a [String] {
    for start in 0..before.len() {
        let tail = &before[start..];
        if now.starts_with(tail) {
            return &now[tail.len()..];
        }
    }
    now
}

/// A header line `-- 12s`, then one aligned line per service:
/// `   catalog      36.0/s  100.00%  p99 31.8ms  mTLS 100%  v1 71% · v2 29%`.
fn service_line(frame: &Frame) -> String {
    let width = frame
        .rows
        .iter()
        .map(|r| r.service.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "-- {}s: every service as its sidecars report it (the last 10-20 s)",
        frame.elapsed_secs
    );
    for r in &frame.rows {
        let _ = write!(out, "\n   {:<width$}  {}", r.service, cell(r));
    }
    out
}

fn cell(r: &Row) -> String {
    let mut c = format!("{:>6.1}/s", r.rps);
    let _ = write!(
        c,
        "  {:>7}",
        r.success
            .map_or_else(|| "-".to_owned(), |s| format!("{:.2}%", s * 100.0))
    );
    let _ = write!(
        c,
        "  p99 {:>7}",
        r.p99_ms
            .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}ms"))
    );
    let _ = write!(
        c,
        "  mTLS {:>4}",
        r.mtls
            .map_or_else(|| "-".to_owned(), |m| format!("{:.0}%", m * 100.0))
    );
    if !r.split.is_empty() {
        let _ = write!(c, "  {}", r.split);
    }
    c.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn only_new_events_and_act_changes_are_printed() {
        let mut p = Plain::default();
        let mut frame = Frame {
            elapsed_secs: 3,
            act: "1/6 canary: 90/10".into(),
            caption: "watch the split".into(),
            rows: vec![Row {
                service: "catalog".into(),
                namespace: "demo".into(),
                rps: 50.0,
                success: Some(1.0),
                p99_ms: Some(9.5),
                mtls: Some(1.0),
                split: "v1 90% · v2 10%".into(),
                ..Row::default()
            }],
            events: strings(&["a", "b\nline two"]),
            try_next: strings(&["eval \"$(sinew demo env)\"", "sinew stat"]),
        };
        let text = p.render(&frame, true);
        assert!(
            text.starts_with("Try from a second shell:\n  eval"),
            "{text}"
        );
        assert!(
            text.contains("== 1/6 canary: 90/10\n   watch the split\n"),
            "{text}"
        );
        assert!(text.contains("   * a\n   * b\n       line two\n"), "{text}");
        assert!(text.contains("-- 3s: every service"), "{text}");
        assert!(
            text.contains(
                "\n   catalog    50.0/s  100.00%  p99   9.5ms  mTLS 100%  v1 90% · v2 10%\n"
            ),
            "{text}"
        );
        // The same frame again, no line due: nothing.
        assert_eq!(p.render(&frame, false), "");
        // The window slid: only the new event.
        frame.events = strings(&["b\nline two", "c"]);
        assert_eq!(p.render(&frame, false), "   * c\n");
        assert_eq!(
            new_events(&strings(&["x"]), &strings(&["y"])),
            strings(&["y"])
        );
    }
}
