//! Settings read from `TPRUN_*` environment variables, each checked against the range it
//! accepts, so a typo or an absurd value is one clear error naming the variable, the value and
//! the range, never a panic later (`Duration::from_secs_f64` panics on overflow, `Instant + d`
//! on a huge `d`).

use std::ops::RangeInclusive;
use std::time::Duration;

/// The value of `var`, `None` when unset; an error when it is not Unicode.
pub(crate) fn var(var: &str) -> Result<Option<String>, String> {
    match std::env::var(var) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(e) => Err(format!("{var}: {e}")),
    }
}

fn out_of_range(var: &str, value: &str, want: &str, range: &str) -> String {
    format!("{var}={value} is not {want} in {range}")
}

/// Seconds (a decimal number) in `range`, which must lie inside (0, u64::MAX) seconds.
pub(crate) fn parse_secs(
    var: &str,
    value: &str,
    range: RangeInclusive<f64>,
) -> Result<Duration, String> {
    let shown = format!("{} to {} seconds", range.start(), range.end());
    let s: f64 = value
        .trim()
        .parse()
        .map_err(|_| out_of_range(var, value, "a number of seconds", &shown))?;
    // NaN fails `contains`, so only finite values in range get through.
    if !range.contains(&s) || s <= 0.0 {
        return Err(out_of_range(var, value, "a number of seconds", &shown));
    }
    Ok(Duration::from_secs_f64(s))
}

/// A whole number in `range`.
pub(crate) fn parse_count(
    var: &str,
    value: &str,
    what: &str,
    range: RangeInclusive<u64>,
) -> Result<u64, String> {
    let shown = format!("{}..={}", range.start(), range.end());
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|n| range.contains(n))
        .ok_or_else(|| out_of_range(var, value, what, &shown))
}

/// A size (`64K`, `1M`, see [`crate::units::parse_size`]) in `range` bytes.
pub(crate) fn parse_bytes(
    var: &str,
    value: &str,
    range: RangeInclusive<u64>,
) -> Result<u64, String> {
    let shown = format!("{}..={} bytes", range.start(), range.end());
    match crate::units::parse_size(value) {
        Ok(n) if range.contains(&n) => Ok(n),
        Ok(_) => Err(out_of_range(var, value, "a size", &shown)),
        Err(e) => Err(format!(
            "{} ({e})",
            out_of_range(var, value, "a size", &shown)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_out_of_range_are_errors_not_panics() {
        for bad in [
            "1e19", "1e20", "inf", "-inf", "nan", "NaN", "-1", "0", "", "5s", "x",
        ] {
            let e = parse_secs("TPRUN_X_S", bad, 0.001..=1e6).unwrap_err();
            assert!(e.contains("TPRUN_X_S=") && e.contains(bad), "{e}");
            assert!(e.contains("0.001 to 1000000 seconds"), "{e}");
        }
        assert_eq!(
            parse_secs("V", " 2.5 ", 0.001..=1e6),
            Ok(Duration::from_millis(2500))
        );
    }

    #[test]
    fn counts_out_of_range_are_errors() {
        for bad in ["1e19", "-1", "18446744073709551616", "nan", "1000001", "x"] {
            let e = parse_count("TPRUN_N", bad, "a count", 0..=1_000_000).unwrap_err();
            assert!(
                e.contains(&format!("TPRUN_N={bad}")) && e.contains("0..=1000000"),
                "{e}"
            );
        }
        assert_eq!(parse_count("V", "7", "a count", 0..=10), Ok(7));
    }

    #[test]
    fn sizes_out_of_range_are_errors() {
        for bad in ["1e19", "99999999999G", "-1", "inf", "0", "2G"] {
            let e = parse_bytes("TPRUN_B", bad, 1..=1 << 30).unwrap_err();
            assert!(
                e.contains(&format!("TPRUN_B={bad}")) && e.contains("1..=1073741824 bytes"),
                "{e}"
            );
        }
        assert_eq!(parse_bytes("V", "64K", 1..=1 << 30), Ok(65536));
    }
}
