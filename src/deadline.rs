//! Deadlines from caller-given timeouts.
//!
//! `Instant + Duration` panics on overflow, and a caller may well pass `Duration::MAX` (or
//! a timeout option of `u64::MAX` ms) to mean "wait as long as it takes". Every deadline
//! built from a timeout that came from outside goes through [`deadline_after`], so no wait
//! can panic on its length.

use std::time::{Duration, Instant};

/// The farthest deadline handed out: far beyond any real wait, near enough that every
/// platform's `Instant` can represent it.
const DEADLINE_FAR_AWAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// `from + timeout`, or a deadline about a century away when that does not fit in an
/// `Instant`.
pub(crate) fn deadline_after(from: Instant, timeout: Duration) -> Instant {
    from.checked_add(timeout)
        .or_else(|| from.checked_add(DEADLINE_FAR_AWAY))
        .unwrap_or(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_too_long_for_an_instant_gives_a_far_deadline_instead_of_a_panic() {
        let now = Instant::now();
        assert_eq!(
            deadline_after(now, Duration::from_millis(5)),
            now + Duration::from_millis(5)
        );
        let far = deadline_after(now, Duration::MAX);
        assert!(far >= now + Duration::from_secs(365 * 24 * 3600), "{far:?}");
        let far = deadline_after(now, Duration::from_millis(u64::MAX));
        assert!(far > now);
    }
}
