//! Exponential backoff for what the operator tries again on its own: a reconcile that failed
//! (the controller's error policy) and a gang the namespace's ResourceQuota refused.

use std::time::Duration;

/// The first delay.
pub const FIRST: Duration = Duration::from_secs(5);

/// The longest delay.
pub const MAX: Duration = Duration::from_secs(300);

/// How long to wait after the `failures`-th failure in a row: [`FIRST`], doubling with every
/// failure, at most [`MAX`] (5 s, 10 s, 20 s, ... 160 s, then 300 s).
pub fn delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST.saturating_mul(1 << doublings).min(MAX)
}

/// The failures in a row of one thing (one job's reconciles, say), and the delay they call for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// Counts one more failure and returns how long to wait before the next try.
    pub fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        delay(self.failures)
    }

    /// Forgets the failures: the next one waits [`FIRST`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_from_five_seconds_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|n| delay(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(delay(u32::MAX), MAX, "no overflow");
    }

    #[test]
    fn failures_in_a_row_back_off_and_a_success_starts_again() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..4).map(|_| b.fail().as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40]);
        assert_eq!(b.failures(), 4);
        b.reset();
        assert_eq!(b.fail(), FIRST);
        // Each job has a count of its own.
        let mut other = Backoff::default();
        assert_eq!(other.fail(), FIRST);
        assert_eq!(b.fail().as_secs(), 10);
    }
}
