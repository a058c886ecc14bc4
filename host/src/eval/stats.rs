//! Interval estimates: the mean with a 95% percentile bootstrap interval, and the paired
//! bootstrap of a difference of means, which tells whether adapter B really beats A.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::store::Estimate;

/// Resamples per estimate. 1,000 keeps the interval's ends stable to about ±0.5% of the
/// spread, and costs microseconds per metric.
pub const RESAMPLES: usize = 1000;
/// Fixed so a report is reproducible run to run.
const SEED: u64 = 0x5eed_ada9;

/// The mean of `values` with a 95% percentile-bootstrap interval. Empty input gives NaNs.
pub fn bootstrap_mean(values: &[f64]) -> Estimate {
    bootstrap_means(&[values])[0]
}

/// [`bootstrap_mean`] of each of several columns of the same length, in one pass. The seed is
/// fixed, so every column's resamples pick the same indices; drawing them once for all the
/// columns (the scores of one run) gives the same intervals for a fraction of the draws.
pub fn bootstrap_means(columns: &[&[f64]]) -> Vec<Estimate> {
    let Some(n) = columns.first().map(|c| c.len()) else {
        return Vec::new();
    };
    assert!(
        columns.iter().all(|c| c.len() == n),
        "bootstrap columns of different lengths"
    );
    if n == 0 {
        let nan = Estimate {
            mean: f64::NAN,
            low: f64::NAN,
            high: f64::NAN,
        };
        return vec![nan; columns.len()];
    }
    // Finite scores can still overflow a sum (50 scores of 4e306). Such columns are summed
    // as x / n instead: never larger in magnitude than the largest score. Ordinary columns
    // keep the plain sum, which is what every other tool computes, to the bit.
    let scaled: Vec<bool> = columns.iter().map(|c| may_overflow(c)).collect();
    let columns: Vec<std::borrow::Cow<'_, [f64]>> = columns
        .iter()
        .zip(&scaled)
        .map(|(c, scaled)| {
            if *scaled {
                std::borrow::Cow::Owned(c.iter().map(|x| x / n as f64).collect())
            } else {
                std::borrow::Cow::Borrowed(*c)
            }
        })
        .collect();
    let divisor = |scaled: bool| if scaled { 1.0 } else { n as f64 };
    let means: Vec<f64> = columns
        .iter()
        .zip(&scaled)
        .map(|(c, s)| c.iter().sum::<f64>() / divisor(*s))
        .collect();
    if n == 1 {
        return means
            .into_iter()
            .map(|mean| Estimate {
                mean,
                low: mean,
                high: mean,
            })
            .collect();
    }
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut resampled: Vec<Vec<f64>> = vec![Vec::with_capacity(RESAMPLES); columns.len()];
    let mut sums = vec![0.0; columns.len()];
    for _ in 0..RESAMPLES {
        // `Iterator::sum` of floats starts from -0.0; so do these sums, to stay bit-identical.
        sums.fill(-0.0);
        for _ in 0..n {
            let i = rng.random_range(0..n);
            for (sum, column) in sums.iter_mut().zip(&columns) {
                *sum += column[i];
            }
        }
        for ((means, sum), s) in resampled.iter_mut().zip(&sums).zip(&scaled) {
            means.push(sum / divisor(*s));
        }
    }
    means
        .into_iter()
        .zip(resampled)
        .map(|(mean, mut resampled)| {
            let (low, high) = percentile_interval(&mut resampled);
            Estimate { mean, low, high }
        })
        .collect()
}

/// Whether summing `values` could leave the finite range.
fn may_overflow(values: &[f64]) -> bool {
    let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    largest > f64::MAX / values.len().max(1) as f64
}

/// `candidate[i] - baseline[i]` over paired samples: its mean and a 95% paired-bootstrap
/// interval (resampling pairs, so per-sample difficulty cancels out).
pub fn paired_difference(baseline: &[f64], candidate: &[f64]) -> Estimate {
    let diffs: Vec<f64> = baseline.iter().zip(candidate).map(|(a, b)| b - a).collect();
    if diffs.iter().all(|d| d.is_finite()) {
        return bootstrap_mean(&diffs);
    }
    // A difference of two finite scores can overflow (1e308 - -1e308); halved, it cannot.
    let halves: Vec<f64> = baseline
        .iter()
        .zip(candidate)
        .map(|(a, b)| b / 2.0 - a / 2.0)
        .collect();
    let half = bootstrap_mean(&halves);
    Estimate {
        mean: half.mean * 2.0,
        low: half.low * 2.0,
        high: half.high * 2.0,
    }
}

/// Whether every field is a finite number: what the store and JSON can represent.
pub fn is_representable(e: &Estimate) -> bool {
    e.mean.is_finite() && e.low.is_finite() && e.high.is_finite()
}

/// Significant at 95% when the interval excludes zero.
pub fn is_significant(e: &Estimate) -> bool {
    e.low > 0.0 || e.high < 0.0
}

fn percentile_interval(samples: &mut [f64]) -> (f64, f64) {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| {
        let pos = q * (samples.len() - 1) as f64;
        let lo = pos.floor() as usize;
        let hi = pos.ceil() as usize;
        samples[lo] + (samples[hi] - samples[lo]) * (pos - lo as f64)
    };
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_brackets_the_mean_and_shrinks_with_n() {
        let small: Vec<f64> = (0..20).map(|i| (i % 5) as f64).collect();
        let large: Vec<f64> = (0..2000).map(|i| (i % 5) as f64).collect();
        let a = bootstrap_mean(&small);
        let b = bootstrap_mean(&large);
        assert!((a.mean - 2.0).abs() < 1e-12 && (b.mean - 2.0).abs() < 1e-12);
        assert!(a.low < 2.0 && a.high > 2.0);
        assert!(b.high - b.low < (a.high - a.low) / 5.0);
    }

    /// `bootstrap_mean` as it was before `bootstrap_means`: one draw of indices per column.
    fn bootstrap_mean_alone(values: &[f64]) -> Estimate {
        let n = values.len();
        let mean = values.iter().sum::<f64>() / n as f64;
        let mut rng = StdRng::seed_from_u64(SEED);
        let mut means: Vec<f64> = (0..RESAMPLES)
            .map(|_| (0..n).map(|_| values[rng.random_range(0..n)]).sum::<f64>() / n as f64)
            .collect();
        let (low, high) = percentile_interval(&mut means);
        Estimate { mean, low, high }
    }

    #[test]
    fn columns_together_give_the_intervals_each_gives_alone() {
        let a: Vec<f64> = (0..300).map(|i| ((i * 37) % 101) as f64 / 101.0).collect();
        let b: Vec<f64> = (0..300).map(|i| ((i * i) % 17) as f64 * 6.25).collect();
        let c = vec![-0.0; 300];
        let together = bootstrap_means(&[&a, &b, &c]);
        for (column, estimate) in [&a, &b, &c].into_iter().zip(together) {
            let alone = bootstrap_mean_alone(column);
            for (x, y) in [
                (estimate.mean, alone.mean),
                (estimate.low, alone.low),
                (estimate.high, alone.high),
            ] {
                assert_eq!(x.to_bits(), y.to_bits(), "{estimate:?} vs {alone:?}");
            }
        }
    }

    #[test]
    fn huge_finite_scores_do_not_overflow_the_mean() {
        let values = vec![4e306; 50];
        let e = bootstrap_mean(&values);
        assert!(is_representable(&e), "{e:?}");
        assert!((e.mean / 4e306 - 1.0).abs() < 1e-12, "{e:?}");
        let d = paired_difference(&[-1e308; 3], &[1e308; 3]);
        assert!(d.mean.is_infinite(), "2e308 is not representable: {d:?}");
        let d = paired_difference(&[-6e307; 3], &[6e307; 3]);
        assert!(
            is_representable(&d) && (d.mean / 1.2e308 - 1.0).abs() < 1e-12,
            "{d:?}"
        );
    }

    #[test]
    fn constant_values_have_a_point_interval() {
        let e = bootstrap_mean(&[0.5; 10]);
        assert_eq!((e.low, e.high), (0.5, 0.5));
    }

    #[test]
    fn paired_difference_detects_a_consistent_gain() {
        let base: Vec<f64> = (0..100).map(|i| (i % 7) as f64 / 7.0).collect();
        let better: Vec<f64> = base.iter().map(|v| v + 0.05).collect();
        let d = paired_difference(&base, &better);
        assert!((d.mean - 0.05).abs() < 1e-12);
        assert!(is_significant(&d));
        let same = paired_difference(&base, &base);
        assert!(!is_significant(&same));
    }
}
