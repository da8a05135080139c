//! The per-service tables the demo prints.

use std::fmt::Write as _;

use crate::stats::Summary;

/// One table row: a service (or the entry point) and its numbers, if known.
pub(crate) struct Row<'a> {
    pub(crate) name: &'a str,
    pub(crate) version: &'a str,
    /// `None` when the service's stats could not be read.
    pub(crate) summary: Option<Summary>,
}

/// Column headers; every row has exactly these whitespace-separated fields.
const HEADER: [&str; 7] = [
    "SERVICE", "VERSION", "REQUESTS", "REQ/S", "SUCCESS", "P50_MS", "P99_MS",
];

/// Formats rows as an aligned table, header first, each line indented by two spaces.
pub(crate) fn table(rows: &[Row<'_>]) -> String {
    let mut out = String::new();
    let line = |out: &mut String, c: [&str; 7]| {
        let _ = writeln!(
            out,
            "  {:<12} {:<7} {:>8} {:>8} {:>8} {:>7} {:>7}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6]
        );
    };
    line(&mut out, HEADER);
    for row in rows {
        match row.summary {
            Some(s) => {
                let requests = s.requests.to_string();
                let rate = format!("{:.1}", s.rate);
                let success = s
                    .success_pct
                    .map_or_else(|| "-".to_owned(), |p| format!("{p:.2}%"));
                let p50 = ms(s.p50_ms);
                let p99 = ms(s.p99_ms);
                line(
                    &mut out,
                    [
                        row.name,
                        row.version,
                        &requests,
                        &rate,
                        &success,
                        &p50,
                        &p99,
                    ],
                );
            }
            None => line(&mut out, [row.name, row.version, "?", "?", "?", "?", "?"]),
        }
    }
    out
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_one_field_per_column() {
        let rows = [
            Row {
                name: "catalog-v2",
                version: "v2",
                summary: Some(Summary {
                    requests: 40,
                    rate: 4.0,
                    success_pct: Some(100.0),
                    p50_ms: Some(12.5),
                    p99_ms: Some(19.76),
                }),
            },
            Row {
                name: "ratings",
                version: "v1",
                summary: Some(Summary {
                    requests: 0,
                    rate: 0.0,
                    success_pct: None,
                    p50_ms: None,
                    p99_ms: None,
                }),
            },
            Row {
                name: "reviews",
                version: "v1",
                summary: None,
            },
        ];
        let text = table(&rows);
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines.len(), 4);
        assert!(lines.iter().all(|l| l.len() == 7), "{text}");
        assert_eq!(
            lines[1],
            ["catalog-v2", "v2", "40", "4.0", "100.00%", "12.5", "19.8"]
        );
        assert_eq!(lines[2], ["ratings", "v1", "0", "0.0", "-", "-", "-"]);
        assert_eq!(lines[3][0], "reviews");
    }
}
