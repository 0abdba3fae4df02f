//! Sizes and offsets on the command line, with qemu-img's suffixes (k, M, G, T, P, E: powers
//! of 1024; b or none: bytes).

use anyhow::{bail, Context, Result};

/// Parses `64k`, `1M`, `1073741824`, `2G`... into bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        other => bail!("Invalid size suffix '{other}' in '{text}' (use k, M, G, T, P or E)"),
    };
    if number.contains('.') {
        let value: f64 = number
            .parse()
            .with_context(|| format!("Invalid size '{text}'"))?;
        let bytes = value * (1u64 << shift) as f64;
        if !(0.0..1.8e19).contains(&bytes) {
            bail!("Size '{text}' out of range");
        }
        return Ok(bytes as u64);
    }
    let value: u64 = number
        .parse()
        .with_context(|| format!("Invalid size '{text}'"))?;
    value
        .checked_mul(1u64 << shift)
        .with_context(|| format!("Size '{text}' out of range"))
}

/// A human size like qemu-img prints it: "4 MiB", "1.5 GiB", "512 B".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        let text = format!("{value:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        format!("{text} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_binary_suffixes_like_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999E").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn human_sizes_read_like_qemu_img() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(4 << 20), "4 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }
}
