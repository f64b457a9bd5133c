//! Latency samples and their summary.

use std::time::Duration;

/// A set of latency samples in nanoseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    ns: Vec<u64>,
    sorted: bool,
}

impl Samples {
    /// Room for `n` samples, so that recording never allocates inside a measured loop.
    pub fn with_capacity(n: usize) -> Self {
        Self {
            ns: Vec::with_capacity(n),
            sorted: false,
        }
    }

    /// Records one sample.
    pub fn push(&mut self, d: Duration) {
        self.ns
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.sorted = false;
    }

    fn sort(&mut self) {
        if !self.sorted {
            self.ns.sort_unstable();
            self.sorted = true;
        }
    }

    /// The `p`-th percentile (0..=100), nearest-rank; 0 when empty.
    pub fn percentile(&mut self, p: f64) -> u64 {
        self.sort();
        if self.ns.is_empty() {
            return 0;
        }
        let last = self.ns.len() - 1;
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a rank within the sample count"
        )]
        let rank = ((p / 100.0) * last as f64).round() as usize;
        self.ns[rank.min(last)]
    }

    /// The sorted samples (for plots).
    pub fn sorted(&mut self) -> &[u64] {
        self.sort();
        &self.ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::with_capacity(101);
        for i in (0..=100u64).rev() {
            s.push(Duration::from_nanos(i));
        }
        assert_eq!(s.percentile(50.0), 50);
        assert_eq!(s.percentile(99.0), 99);
        assert_eq!(s.percentile(0.0), 0);
        assert_eq!(s.percentile(100.0), 100);
    }

    #[test]
    fn empty_percentile_is_zero() {
        assert_eq!(Samples::default().percentile(50.0), 0);
    }
}
