//! Bounded retry with exponential backoff and jitter.

use std::time::Duration;

/// How often and how patiently a failing delivery is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delivery attempts in all, the first included. Default 5; at least 1.
    pub attempts_max: u32,
    /// Delay before the second attempt. Default 10 ms.
    pub retry_delay_ms_min: u64,
    /// Largest delay between attempts. Default 5,000 ms.
    pub retry_delay_ms_max: u64,
    /// Randomize each delay within its upper half ("equal jitter"), so that many failing
    /// subscriptions do not retry in lockstep. Delays still never shrink. Default true.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts_max: 5,
            retry_delay_ms_min: 10,
            retry_delay_ms_max: 5_000,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The delay after failed attempt `attempt` (1-based) before the next one:
    /// `min * 2^(attempt-1)`, capped at `max`; with jitter, a random point in its upper half.
    /// `random` is a uniformly random u64 (the caller's generator).
    pub fn delay_after(&self, attempt: u32, random: u64) -> Duration {
        let exp = attempt.saturating_sub(1).min(62);
        let full = self
            .retry_delay_ms_min
            .saturating_mul(1u64 << exp)
            .min(self.retry_delay_ms_max)
            .max(self.retry_delay_ms_min.min(self.retry_delay_ms_max));
        let ms = if self.jitter && full > 1 {
            let half = full / 2;
            half + random % (full - half + 1)
        } else {
            full
        };
        Duration::from_millis(ms)
    }
}

/// A small, fast generator for jitter (xorshift64*); not for anything secret.
#[derive(Debug, Clone)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_never_shrink_with_jitter() {
        let p = RetryPolicy {
            attempts_max: 10,
            retry_delay_ms_min: 10,
            retry_delay_ms_max: 100,
            jitter: false,
        };
        let d: Vec<u64> = (1..=6)
            .map(|a| p.delay_after(a, 0).as_millis() as u64)
            .collect();
        assert_eq!(d, vec![10, 20, 40, 80, 100, 100]);
        let p = RetryPolicy { jitter: true, ..p };
        let mut j = Jitter::new(7);
        for _ in 0..1000 {
            let mut last_max = 0;
            for a in 1..=6 {
                let full = d[a as usize - 1];
                let got = p.delay_after(a, j.next()).as_millis() as u64;
                assert!(
                    got >= full / 2 && got <= full,
                    "attempt {a}: {got} outside {}..={full}",
                    full / 2
                );
                assert!(got >= last_max / 2);
                last_max = full;
            }
        }
    }
}
