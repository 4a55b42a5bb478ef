//! Human sizes: `30MB` (10⁶), `20MiB` (2²⁰), plain bytes.

use crate::OrderError;

/// Parses a size: plain bytes (`123456`), or a number (decimals allowed) followed by a unit:
/// `B`, `kB`/`KB`/`K`, `MB`/`M`, `GB`/`G`, `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB`
/// (powers of 1024). Units are case-insensitive; spaces between number and unit are allowed.
///
/// ```
/// assert_eq!(bitstack_order::parse_size("30MB").unwrap(), 30_000_000);
/// assert_eq!(bitstack_order::parse_size("1.5 KiB").unwrap(), 1536);
/// assert!(bitstack_order::parse_size("lots").is_err());
/// ```
pub fn parse_size(input: &str) -> Result<u64, OrderError> {
    let bad = |reason| OrderError::BadSize {
        input: input.to_string(),
        reason,
    };
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(bad("it does not start with a number"));
    }
    let value: f64 = number.parse().map_err(|_| bad("the number is malformed"))?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad("unknown unit (use B, kB, MB, GB, KiB, MiB or GiB)")),
    };
    let bytes = (value * multiplier).floor();
    if !bytes.is_finite() || bytes > u64::MAX as f64 {
        return Err(bad("the size is too large"));
    }
    Ok(bytes as u64)
}

/// Formats a byte count for people: `20.56 MB (19.61 MiB)`-style, decimal units first.
pub fn format_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("123456").unwrap(), 123_456);
        assert_eq!(parse_size("30MB").unwrap(), 30_000_000);
        assert_eq!(parse_size("30 mb").unwrap(), 30_000_000);
        assert_eq!(parse_size("2kB").unwrap(), 2000);
        assert_eq!(parse_size("2KiB").unwrap(), 2048);
        assert_eq!(parse_size("1.5GiB").unwrap(), 1_610_612_736);
        assert_eq!(parse_size("20MiB").unwrap(), 20 * 1024 * 1024);
        assert_eq!(parse_size("7B").unwrap(), 7);
    }

    #[test]
    fn errors_name_the_input() {
        for bad in [
            "",
            "MB",
            "12XB",
            "1.2.3MB",
            "-5MB",
            "99999999999999999999TB",
        ] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn format() {
        assert_eq!(format_size(20_562_944), "20.56 MB");
        assert_eq!(format_size(512), "512 B");
    }
}
