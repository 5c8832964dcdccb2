//! Medians and percentiles of repeated measurements (pure).

/// The median of `values` (the mean of the two middle ones for an even count); `None` if empty
/// or if any value is NaN.
pub fn median(values: &[f64]) -> Option<f64> {
    percentile(values, 0.5)
}

/// The `q` quantile (0.0 ..= 1.0) of `values`, linearly interpolated between neighbours;
/// `None` if empty or if any value is NaN.
// `pos` is within 0..=len-1 (q clamped): its floor and ceiling index `sorted`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() || values.iter().any(|v| v.is_nan()) {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = pos - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Bytes per second as GB/s (10^9 bytes: what `dd`, `fio` and the design notes quote).
pub fn gbps(bytes: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return f64::INFINITY;
    }
    bytes as f64 / seconds / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_odd_count_is_the_middle_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[5.0]), Some(5.0));
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn nothing_or_nan_has_no_median() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn percentiles_interpolate_between_neighbours() {
        let v: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), Some(99.0));
        assert_eq!(percentile(&v, 0.0), Some(0.0));
        assert_eq!(percentile(&v, 1.0), Some(100.0));
        assert_eq!(percentile(&[1.0, 2.0], 0.25), Some(1.25));
    }

    #[test]
    fn gigabytes_per_second_are_decimal() {
        assert_eq!(gbps(2_000_000_000, 2.0), 1.0);
        assert!(gbps(1, 0.0).is_infinite());
    }
}
