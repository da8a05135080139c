//! Gateway API durations (GEP-2257): `1h`, `30s`, `500ms`, `1m30s`.

use std::time::Duration;

/// Parses a Gateway API duration: one to four `<number><unit>` pairs, units `h`, `m`,
/// `s`, `ms`, each number at most five digits. `0s` parses to zero, which callers treat
/// as "no timeout".
pub fn parse(s: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {s:?}: expected e.g. \"10s\", \"500ms\", \"1m30s\"");
    if s.is_empty() {
        return Err(bad());
    }
    let bytes = s.as_bytes();
    let mut total = Duration::ZERO;
    let mut i = 0;
    let mut parts = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() || digits.len() > 5 {
            return Err(bad());
        }
        let n: u64 = digits.parse().map_err(|_| bad())?;
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let d = match &s[unit_start..i] {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            _ => return Err(bad()),
        };
        total += d;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_durations() {
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_malformed_durations() {
        for bad in ["", "10", "s", "1.5s", "10x", "123456s", "1h1h1h1h1h", "-1s"] {
            assert!(parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
