//! `?wait=`: how long a request asks to be held open (a long poll of the change feed, a
//! read-your-writes lookup). The time limits of every route add it, so a long poll is never cut
//! short by them.

use std::time::Duration;

/// The longest wait any route accepts.
pub const MAX: Duration = Duration::from_secs(60);

/// A wait as the query gives it: seconds (`30`, `30s`, `1.5s`) or milliseconds (`500ms`).
pub fn parse(raw: &str) -> Option<Duration> {
    let raw = raw.trim();
    let (number, scale) = if let Some(ms) = raw.strip_suffix("ms") {
        (ms, 0.001)
    } else {
        (raw.strip_suffix('s').unwrap_or(raw), 1.0)
    };
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let seconds: f64 = number.parse().ok()?;
    // Any number of digits is a wait; a huge one is simply long (every route caps it).
    let seconds = (seconds * scale).min(1.0e9);
    seconds
        .is_finite()
        .then(|| Duration::from_secs_f64(seconds))
}

/// The wait a query string asks for (zero if none or unreadable), at most [`MAX`]: what the time
/// limits add to their own.
pub fn requested(query: Option<&str>) -> Duration {
    query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("wait="))
        .and_then(parse)
        .unwrap_or_default()
        .min(MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_read_as_seconds_or_milliseconds() {
        let cases = [
            ("30", Some(Duration::from_secs(30))),
            ("30s", Some(Duration::from_secs(30))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("500ms", Some(Duration::from_millis(500))),
            ("0", Some(Duration::ZERO)),
            ("", None),
            ("s", None),
            ("-1", None),
            ("1e3", None),
            ("ten", None),
            ("1h", None),
            (
                "320603698140142709963460",
                Some(Duration::from_secs(1_000_000_000)),
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(parse(raw), expected, "{raw}");
        }
        assert_eq!(requested(Some("after=3&wait=90s")), MAX);
        assert_eq!(requested(Some("wait=2s")), Duration::from_secs(2));
        assert_eq!(requested(Some("await=2s")), Duration::ZERO);
        assert_eq!(requested(None), Duration::ZERO);
        assert_eq!(cases.len(), 12);
    }
}
