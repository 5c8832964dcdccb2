//! The one duration grammar of every service's flags and config files: humantime's
//! (`10m`, `90s`, `1h 30m`, `1h30m`, `250ms`, `2d`), plus a bare `0`, at most a year.

use std::time::Duration;

/// The longest duration any setting takes.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses a duration as operators write them; the error says what was expected.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| format!("{text:?} is not a duration like \"10m\" or \"90s\": {e}"))?;
    if d > MAX_DURATION {
        return Err(format!("{text:?} is longer than 365 days"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_operators_write_them() {
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 1h30m "), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn a_duration_needs_a_number_a_unit_and_a_sign_it_may_not_have() {
        for bad in ["", "10", "h", "5 lightyears", "-5s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
        assert!(parse_duration("400d").unwrap_err().contains("365 days"));
    }
}
