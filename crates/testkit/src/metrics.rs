//! Reading samples out of a Prometheus text exposition (a proxy's or the control
//! plane's `/metrics`).

/// The value of the first sample whose line starts with `prefix` (the metric's name,
/// and as many of its labels as the caller spells).
pub fn value(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The sum of every sample whose line starts with `prefix` (0 when none does).
pub fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_prefix() {
        let text = "# HELP x help\nx_total{a=\"1\"} 2\nx_total{a=\"2\"} 3.5\ny 7\n";
        assert_eq!(value(text, "x_total{a=\"2\"}"), Some(3.5));
        assert_eq!(value(text, "z"), None);
        assert_eq!(sum(text, "x_total{"), 5.5);
        assert_eq!(sum(text, "z"), 0.0);
    }
}
