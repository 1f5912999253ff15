//! Parsing of the human durations ("250ms", "10s", "1.5m") and sizes ("64KiB") used in config.

use std::time::Duration;

/// Parses "250ms", "10s", "1.5s", "2m", "1h", "500us"; a bare number is refused
/// because "10" is ambiguous between seconds and milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split =
        t.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(|| format!("duration {text:?} has no unit (use ms, s, m or h, e.g. \"250ms\")"))?;
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("duration {text:?} does not start with a number"));
    }
    let n: f64 = num.parse().map_err(|_| format!("duration {text:?} has a bad number {num:?}"))?;
    let micros_per: u64 = match unit.trim() {
        "us" | "µs" => 1,
        "ms" => 1_000,
        "s" | "sec" => 1_000_000,
        "m" | "min" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        other => return Err(format!("duration {text:?} has an unknown unit {other:?} (use us, ms, s, m, h or d)")),
    };
    let secs = n * micros_per as f64 / 1e6;
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("duration {text:?} is too large"));
    }
    // A whole number is counted exactly (a float would make "99999999999ms" 99999999998.999 ms).
    if let Ok(whole) = num.parse::<u64>() {
        return Ok(Duration::from_micros(whole * micros_per));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Shows a duration the way config writes it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses byte sizes: "1024", "64KiB", "64KB" (both 1024-based), "10MiB", "1GiB".
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("size {text:?} does not start with a whole number"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("size {text:?} has an unknown unit {other:?} (use B, KiB, MiB or GiB)")),
    };
    n.checked_mul(scale).ok_or_else(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration(" 1h ").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10 parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("1.2.3s").is_err());
        assert!(parse_duration("99999999999h").is_err());
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
    }

    /// Found by the units fuzz target: whole numbers went through a float multiplication, so
    /// "99999999999ms" read as 99999999998.999 ms and a duration did not read back as written.
    #[test]
    fn whole_numbers_are_exact() {
        assert_eq!(parse_duration("99999999999ms").unwrap(), Duration::from_millis(99_999_999_999));
        assert_eq!(parse_duration("999999999999999us").unwrap(), Duration::from_micros(999_999_999_999_999));
        assert_eq!(parse_duration("11574d").unwrap(), Duration::from_secs(11_574 * 86_400));
        assert!(parse_duration("11575d").unwrap_err().contains("too large"), "the limit stays 1e9 s");
        for ms in [1u64, 999, 1001, 86_399_999, 99_999_999_999] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d, "{ms}ms");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1 MiB").unwrap(), 1 << 20);
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("3 bananas").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }
}
