//! The project's one token bucket and one backoff, with time and randomness passed in: EC2's
//! per-account buckets in the simulated VPC, the daemon's client-side buckets, and every retry the
//! choreography schedules use these.

use crate::time::Time;
use std::time::Duration;

/// Whether a bucket could ever give a token: configuration readers call this to name the setting
/// that is wrong.
pub fn check_bucket(capacity: f64, per_second: f64) -> Result<(), String> {
    if capacity >= 1.0 && capacity.is_finite() && per_second > 0.0 && per_second.is_finite() {
        Ok(())
    } else {
        Err(format!(
            "a token bucket needs room for one token and a positive refill, not [{capacity}, {per_second}]"
        ))
    }
}

/// A bucket of `capacity` tokens refilled at `per_second`.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    at: Time,
}

impl TokenBucket {
    /// Full at `start`. Panics on a bucket that could never give a token: that is a programming
    /// error in the caller's constants, found at start-up rather than as a hang.
    pub fn new(capacity: f64, per_second: f64, start: Time) -> TokenBucket {
        if let Err(e) = check_bucket(capacity, per_second) {
            panic!("{e}");
        }
        TokenBucket {
            capacity,
            per_second,
            tokens: capacity,
            at: start,
        }
    }

    /// Takes a token at `now`, or says how long until there is one. Time going backwards refills
    /// nothing.
    pub fn take(&mut self, now: Time) -> Result<(), Duration> {
        if now > self.at {
            self.tokens = (self.tokens + now.since(self.at).as_secs_f64() * self.per_second)
                .min(self.capacity);
            self.at = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// Exponential backoff: the `n`th retry (from 0) waits between half and all of `base × 2^n`,
/// capped at `cap`. Never less than half: a retry that comes straight back mostly meets the same
/// throttle or the same detaching ENI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Backoff {
    /// Panics unless `0 < base <= cap`, for the same reason as [`TokenBucket::new`].
    pub const fn new(base: Duration, cap: Duration) -> Backoff {
        assert!(
            !base.is_zero() && base.as_nanos() <= cap.as_nanos(),
            "backoff needs 0 < base <= cap"
        );
        Backoff { base, cap }
    }

    pub fn ceiling(&self, retry: u32) -> Duration {
        self.base.saturating_mul(1 << retry.min(30)).min(self.cap)
    }

    /// The wait before retry `retry`, with `unit` in [0, 1) choosing where in the jitter range.
    pub fn delay(&self, retry: u32, unit: f64) -> Duration {
        self.ceiling(retry)
            .mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
    }
}

/// A number in [0, 1) spread evenly from any seed, for jitter that needs no random source: the
/// simulator must be reproducible, and the choreography does no I/O.
pub fn unit_from(seed: u64) -> f64 {
    let mixed = seed
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mixed = (mixed ^ (mixed >> 31)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_capacity_then_refills_at_its_rate() {
        let mut b = TokenBucket::new(3.0, 2.0, Time::ZERO);
        assert!((0..3).all(|_| b.take(Time::ZERO).is_ok()));
        let wait = b.take(Time::ZERO).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(Time::from_millis(400)).is_err());
        assert!(b.take(Time::from_millis(500)).is_ok());
        let later = Time::from_secs(10);
        assert!(
            (0..3).all(|_| b.take(later).is_ok()),
            "refills to capacity, not beyond"
        );
        assert!(b.take(later).is_err());
        assert!(
            b.take(Time::from_secs(9)).is_err(),
            "time going back refills nothing"
        );
    }

    #[test]
    #[should_panic(expected = "positive refill")]
    fn a_bucket_that_never_refills_is_refused() {
        TokenBucket::new(5.0, 0.0, Time::ZERO);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_keeps_half() {
        let b = Backoff::new(Duration::from_millis(200), Duration::from_secs(20));
        assert_eq!(b.ceiling(0), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(1600));
        assert_eq!(b.ceiling(7), Duration::from_secs(20));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(20));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(800));
        assert_eq!(b.delay(3, 0.999_999), b.ceiling(3).mul_f64(0.999_999_5));
    }

    #[test]
    fn jitter_units_cover_the_range() {
        let units: Vec<f64> = (0..10_000).map(unit_from).collect();
        assert!(units.iter().all(|u| (0.0..1.0).contains(u)));
        for tenth in 0..10 {
            let lo = f64::from(tenth) / 10.0;
            let n = units.iter().filter(|u| (lo..lo + 0.1).contains(*u)).count();
            assert!((800..1200).contains(&n), "{n} units in [{lo}, {lo}+0.1)");
        }
    }
}
