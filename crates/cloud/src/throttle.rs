//! Client-side pacing: a token bucket per call category, so that one node never drains the account's
//! EC2 budget, and jittered exponential backoff when EC2 throttles anyway.

use ipam::pacing::{Backoff, TokenBucket};
use ipam::Time;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    NonMutating,
    Mutating,
}

/// Capacity and refill per second of each bucket.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    pub mutating: (f64, f64),
    pub non_mutating: (f64, f64),
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl Default for Pacing {
    /// A node's share: an account allows a few hundred calls in a burst; a thousand nodes starting
    /// together must not each take that.
    fn default() -> Self {
        Pacing {
            mutating: (10.0, 2.0),
            non_mutating: (20.0, 5.0),
            max_retries: 10,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(20),
        }
    }
}

pub struct Pacer {
    mutating: Mutex<TokenBucket>,
    non_mutating: Mutex<TokenBucket>,
    /// The buckets' clock: time since the pacer was made.
    start: Instant,
    backoff: Backoff,
    pub pacing: Pacing,
}

impl Pacer {
    pub fn new(pacing: Pacing) -> Pacer {
        let bucket =
            |(capacity, per_second)| Mutex::new(TokenBucket::new(capacity, per_second, Time::ZERO));
        Pacer {
            mutating: bucket(pacing.mutating),
            non_mutating: bucket(pacing.non_mutating),
            start: Instant::now(),
            backoff: Backoff::new(pacing.backoff_base, pacing.backoff_cap),
            pacing,
        }
    }

    /// Waits until the category's bucket has a token, and takes it.
    pub async fn acquire(&self, category: Category) {
        let bucket = match category {
            Category::Mutating => &self.mutating,
            Category::NonMutating => &self.non_mutating,
        };
        loop {
            let now = Time::ZERO + self.start.elapsed();
            let wait = match bucket.lock().await.take(now) {
                Ok(()) => return,
                Err(wait) => wait,
            };
            tokio::time::sleep(wait).await;
        }
    }

    pub fn backoff(&self, attempt: u32) -> Duration {
        self.backoff.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let pacer = Pacer::new(Pacing::default());
        for attempt in 0..30 {
            assert!(pacer.backoff(attempt) <= Pacing::default().backoff_cap);
        }
        let ceiling_at_3 = Pacing::default().backoff_base * 8;
        assert!((0..50).all(|_| pacer.backoff(3) <= ceiling_at_3));
    }
}
