//! Parsers for the simulator's command line: byte sizes (`64M`), guest regions
//! (`SIZE[@OFFSET][:PAGESIZE]`) and page amounts (`200`, `0.25`, `25%`).

use std::fmt;
use std::str::FromStr;

use uffdpager::firecracker::{PAGE_2M, PAGE_4K};

use super::guest::GuestRegionSpec;

/// Why a size, region or amount did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("empty value")]
    Empty,
    #[error("{0:?} is not a number")]
    NotANumber(String),
    #[error("{0:?} has an unknown size suffix (use K, M, G or T)")]
    UnknownSuffix(String),
    #[error("{0:?} does not fit in 64 bits")]
    Overflow(String),
    #[error("page size {0:?} is neither 4K nor 2M")]
    BadPageSize(String),
    #[error("{0:?} is not a page count nor a fraction between 0 and 1")]
    BadAmount(String),
}

/// Parses a byte size: a decimal number with an optional binary suffix `K`, `M`, `G` or `T`
/// (case-insensitive, optionally followed by `iB` or `B`): `4096`, `64K`, `2MiB`, `1G`.
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(ParseError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    if digits.is_empty() {
        return Err(ParseError::NotANumber(text.to_owned()));
    }
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(ParseError::UnknownSuffix(text.to_owned())),
    };
    let n: u64 = digits.parse().map_err(|_| ParseError::Overflow(text.to_owned()))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| ParseError::Overflow(text.to_owned()))
}

/// Parses a decimal number (no suffix).
pub fn parse_number<T: FromStr>(text: &str) -> Result<T, ParseError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(ParseError::Empty);
    }
    s.parse().map_err(|_| ParseError::NotANumber(text.to_owned()))
}

impl FromStr for GuestRegionSpec {
    type Err = ParseError;

    /// `SIZE[@OFFSET][:PAGESIZE]`, e.g. `64M`, `32M@64M`, `64M@0:2M`. The page size is `4K`
    /// (default) or `2M`; alignment is checked when the VM is restored.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (rest, page_size) = match text.split_once(':') {
            Some((rest, ps)) => {
                let page_size = parse_size(ps)?;
                if page_size != PAGE_4K && page_size != PAGE_2M {
                    return Err(ParseError::BadPageSize(ps.to_owned()));
                }
                (rest, page_size)
            }
            None => (text, PAGE_4K),
        };
        let (size, offset) = match rest.split_once('@') {
            Some((size, offset)) => (parse_size(size)?, parse_size(offset)?),
            None => (parse_size(rest)?, 0),
        };
        Ok(GuestRegionSpec { size, page_size, offset })
    }
}

/// A byte size with the largest binary suffix that divides it exactly (`16M`, `4K`, `4097`):
/// what [`parse_size`] reads back.
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

impl fmt::Display for GuestRegionSpec {
    /// `SIZE@OFFSET:PAGESIZE`, e.g. `16M@20M:2M`: the `--region` argument that parses back to
    /// this region.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (size, offset, page) =
            (format_size(self.size), format_size(self.offset), format_size(self.page_size));
        write!(f, "{size}@{offset}:{page}")
    }
}

/// How many pages a random workload touches.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Amount {
    /// This many pages.
    Pages(u64),
    /// This share of all guest pages (0.0 ..= 1.0).
    Fraction(f64),
}

impl Amount {
    /// The number of pages this amount means in a guest of `total` pages.
    // The fraction is within 0..=1 (checked when parsed): the product is in 0..=total.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn pages_of(self, total: u64) -> u64 {
        match self {
            Amount::Pages(n) => n,
            // Rounded to the nearest page; the fraction is within 0..=1, so this stays <= total.
            Amount::Fraction(f) => ((total as f64) * f).round() as u64,
        }
    }
}

impl FromStr for Amount {
    type Err = ParseError;

    /// `200` (pages), `0.25` or `25%` (a share of all pages).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        if s.is_empty() {
            return Err(ParseError::Empty);
        }
        if let Ok(n) = s.parse::<u64>() {
            return Ok(Amount::Pages(n));
        }
        let fraction = match s.strip_suffix('%') {
            Some(pct) => pct.trim().parse::<f64>().map(|p| p / 100.0),
            None => s.parse::<f64>(),
        }
        .map_err(|_| ParseError::BadAmount(text.to_owned()))?;
        if !(0.0..=1.0).contains(&fraction) {
            return Err(ParseError::BadAmount(text.to_owned()));
        }
        Ok(Amount::Fraction(fraction))
    }
}

#[cfg(test)]
// Test values are small and known: plain `as` casts.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_possible_wrap)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_suffixes_in_any_case() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size(" 3gb "), Ok(3 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn sizes_refuse_garbage_without_panicking() {
        assert_eq!(parse_size(""), Err(ParseError::Empty));
        assert!(matches!(parse_size("M"), Err(ParseError::NotANumber(_))));
        assert!(matches!(parse_size("-1"), Err(ParseError::NotANumber(_))));
        assert!(matches!(parse_size("1.5G"), Err(ParseError::UnknownSuffix(_))));
        assert!(matches!(parse_size("12X"), Err(ParseError::UnknownSuffix(_))));
        assert!(matches!(parse_size("99999999999999999999"), Err(ParseError::Overflow(_))));
        assert!(matches!(parse_size("16777216T"), Err(ParseError::Overflow(_))));
    }

    #[test]
    fn regions_parse_size_offset_and_page_size() {
        let r: GuestRegionSpec = "64M".parse().unwrap();
        assert_eq!(r, GuestRegionSpec { size: 64 << 20, page_size: 4096, offset: 0 });
        let r: GuestRegionSpec = "32M@64M".parse().unwrap();
        assert_eq!(r, GuestRegionSpec { size: 32 << 20, page_size: 4096, offset: 64 << 20 });
        let r: GuestRegionSpec = "4M@2M:2M".parse().unwrap();
        assert_eq!(r, GuestRegionSpec { size: 4 << 20, page_size: 2 << 20, offset: 2 << 20 });
        let r: GuestRegionSpec = "8K:4K".parse().unwrap();
        assert_eq!(r.page_size, 4096);
    }

    #[test]
    fn regions_print_as_the_argument_that_parses_back_to_them() {
        for text in ["16M@20M:2M", "8K@0:4K", "3G@1T:4K", "12K@4100K:4K"] {
            let r: GuestRegionSpec = text.parse().unwrap();
            assert_eq!(r.to_string(), text);
        }
        assert_eq!(format_size(4097), "4097");
        assert_eq!(format_size(0), "0");
    }

    #[test]
    fn regions_refuse_other_page_sizes_and_bad_numbers() {
        assert!(matches!("4M:1M".parse::<GuestRegionSpec>(), Err(ParseError::BadPageSize(_))));
        assert!(matches!("4M@x".parse::<GuestRegionSpec>(), Err(ParseError::NotANumber(_))));
        assert!("".parse::<GuestRegionSpec>().is_err());
    }

    #[test]
    fn amounts_are_pages_or_fractions() {
        assert_eq!("200".parse(), Ok(Amount::Pages(200)));
        assert_eq!("0.25".parse(), Ok(Amount::Fraction(0.25)));
        assert_eq!("25%".parse(), Ok(Amount::Fraction(0.25)));
        assert!(matches!("1.5".parse::<Amount>(), Err(ParseError::BadAmount(_))));
        assert!(matches!("-3".parse::<Amount>(), Err(ParseError::BadAmount(_))));
        assert!(matches!("NaN".parse::<Amount>(), Err(ParseError::BadAmount(_))));
        assert_eq!(Amount::Fraction(0.25).pages_of(1000), 250);
        assert_eq!(Amount::Fraction(1.0).pages_of(7), 7);
        assert_eq!(Amount::Pages(3).pages_of(1), 3);
    }
}
