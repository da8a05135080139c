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

/// Parses a command-line duration, the one grammar of every duration flag of `sinew`
/// and `sinew-proxy`: the resources' units (`30s`, `100ms`, `24h`, `1m30s`; see
/// [`parse`]) or a bare number, taken in `bare` units (seconds for the flags named
/// without a unit; milliseconds for the old `--*-ms` spellings, so `2000` keeps its
/// meaning there). Surrounding spaces are ignored; zero is allowed (callers refuse it
/// where it means nothing).
pub fn parse_flag(s: &str, bare: Duration) -> Result<Duration, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        let n: u32 = t
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: too large"))?;
        return Ok(bare * n);
    }
    parse(t).map_err(|_| {
        format!(
            "invalid duration {s:?}: expected e.g. 30s, 100ms, 24h, 1m30s, or a number of {}",
            if bare == Duration::from_millis(1) {
                "milliseconds"
            } else {
                "seconds"
            }
        )
    })
}

/// [`parse_flag`] with bare numbers in seconds: the value parser of every duration flag
/// named without a unit (`--drain-timeout 30s`, `--drain-timeout 30`).
pub fn flag_secs(s: &str) -> Result<Duration, String> {
    parse_flag(s, Duration::from_secs(1))
}

/// [`parse_flag`] with bare numbers in milliseconds: the value parser of the old
/// `--*-ms` spellings, kept as hidden aliases (`--connect-timeout-ms 500`).
pub fn flag_millis(s: &str) -> Result<Duration, String> {
    parse_flag(s, Duration::from_millis(1))
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

    #[test]
    fn flags_take_units_or_bare_numbers_in_their_old_unit() {
        assert_eq!(flag_secs("30"), Ok(Duration::from_secs(30)));
        assert_eq!(flag_secs(" 1m30s "), Ok(Duration::from_secs(90)));
        assert_eq!(flag_secs("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(flag_secs("0"), Ok(Duration::ZERO));
        assert_eq!(flag_millis("2000"), Ok(Duration::from_secs(2)));
        assert_eq!(flag_millis("2s"), Ok(Duration::from_secs(2)));
        for bad in ["", "1.5s", "-1", "10x", "99999999999"] {
            match flag_secs(bad) {
                Err(e) => assert!(e.contains(&format!("{bad:?}")), "{e}"),
                Ok(d) => panic!("{bad:?} parsed as {d:?}"),
            }
        }
    }
}
