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

/// The sum of the samples of `metric` (its exact name) whose labels include every
/// one of `labels` (each spelt `name="value"`, in any order).
pub fn sum_labelled(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            let set = l.split_once('{').map_or("", |(_, rest)| rest);
            labels.iter().all(|lb| set.contains(lb))
        })
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
        let text =
            "a_total{x=\"1\",y=\"2\"} 1\na_total{y=\"2\"} 2\na_total_more{y=\"2\"} 4\na_total 8\n";
        assert_eq!(sum_labelled(text, "a_total", &["y=\"2\""]), 3.0);
        assert_eq!(sum_labelled(text, "a_total", &["y=\"2\"", "x=\"1\""]), 1.0);
        assert_eq!(sum_labelled(text, "a_total", &[]), 11.0);
    }
}
