//! A fixed-bucket latency histogram recorded with relaxed atomics (HDR-style: each power of two
//! split into [`SUB_BUCKETS`] linear sub-buckets, so a reported percentile is within 25% of
//! the true value, and usually much closer). Recording is one `fetch_add` and, when a new
//! maximum is seen, one `fetch_max`: no lock, no allocation, nothing on the request path that
//! another thread waits for. Readers take a [`HistogramSnapshot`] at any time; counts read
//! while others record are each exact, only not taken at one instant.

use std::sync::atomic::{AtomicU64, Ordering};

/// Linear sub-buckets per power of two (2 bits).
pub const SUB_BUCKETS: usize = 4;
const SUB_BITS: u32 = 2;
/// Values at or above `2^MAX_EXP` ns (about 18 minutes) go to the last bucket.
const MAX_EXP: u32 = 40;
/// Number of buckets: values 0..4 get one each, then 4 per power of two from 4 up to
/// `2^MAX_EXP`.
pub const BUCKETS: usize = (MAX_EXP as usize - 1) * SUB_BUCKETS;

/// The bucket of `v`.
fn index(v: u64) -> usize {
    let v = v.min((1u64 << MAX_EXP) - 1);
    if v < (1 << SUB_BITS) {
        // 0..4: exact.
        return usize::try_from(v).unwrap_or(0);
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let sub = (v >> (exp - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (exp as usize - 1) * SUB_BUCKETS + usize::try_from(sub).unwrap_or(0)
}

/// The largest value of bucket `i`.
fn upper(i: usize) -> u64 {
    if i < SUB_BUCKETS {
        return i as u64;
    }
    let exp = u32::try_from(i / SUB_BUCKETS + 1).unwrap_or(MAX_EXP);
    let sub = (i % SUB_BUCKETS) as u64;
    let width = 1u64 << (exp - SUB_BITS);
    ((SUB_BUCKETS as u64 + sub) << (exp - SUB_BITS)) + width - 1
}

/// Latencies in nanoseconds.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
    max: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            max: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records one latency of `ns` nanoseconds.
    pub fn record(&self, ns: u64) {
        self.buckets[index(ns)].fetch_add(1, Ordering::Relaxed);
        if ns > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(ns, Ordering::Relaxed);
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            max: self.max.load(Ordering::Relaxed),
            buckets,
        }
    }
}

/// What a [`LatencyHistogram`] held when read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Values recorded.
    pub count: u64,
    /// The largest value recorded (exact).
    pub max: u64,
    /// Count per bucket.
    pub buckets: Vec<u64>,
}

impl HistogramSnapshot {
    /// The `p`-th percentile (0 < p <= 100): the upper end of the bucket holding the value of
    /// rank `ceil(p% of count)`, never above [`HistogramSnapshot::max`]; 0 when empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a rank within the count"
        )]
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * self.count as f64).ceil() as u64;
        let rank = rank.max(1);
        let mut seen = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper(i).min(self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_a_bucket_whose_upper_end_is_within_25_percent() {
        for v in (0..10_000u64).chain([1 << 20, (1 << 20) + 12_345, 1 << 39, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS, "{v}");
            let v = v.min((1 << MAX_EXP) - 1);
            assert!(upper(i) >= v, "{v}: upper {}", upper(i));
            assert!(upper(i) - v <= v / 4, "{v}: upper {}", upper(i));
            if i > 0 {
                assert!(upper(i - 1) < v, "{v} belongs to an earlier bucket");
            }
        }
    }

    #[test]
    fn percentiles_come_from_the_recorded_values_and_max_is_exact() {
        let h = LatencyHistogram::default();
        for _ in 0..98 {
            h.record(1_000);
        }
        h.record(50_000);
        h.record(1_234_567);

        let s = h.snapshot();

        assert_eq!(s.count, 100);
        assert_eq!(s.max, 1_234_567);
        let p50 = s.percentile(50.0);
        assert!((1_000..=1_250).contains(&p50), "{p50}");
        let p99 = s.percentile(99.0);
        assert!((50_000..=62_500).contains(&p99), "{p99}");
        assert_eq!(s.percentile(100.0), 1_234_567);
    }

    #[test]
    fn an_empty_histogram_reports_zero() {
        let s = LatencyHistogram::default().snapshot();
        assert_eq!((s.count, s.max, s.percentile(50.0)), (0, 0, 0));
    }
}
