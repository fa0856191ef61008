//! Client-side pacing: a token bucket per call category, so that one node never drains the account's
//! EC2 budget, and jittered exponential backoff when EC2 throttles anyway.

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

struct Bucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new((capacity, per_second): (f64, f64)) -> Bucket {
        Bucket {
            capacity,
            per_second,
            tokens: capacity,
            at: Instant::now(),
        }
    }

    /// Takes a token now, or says how long until one is there.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.per_second)
            .min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second.max(1e-9),
            ))
        }
    }
}

pub struct Pacer {
    mutating: Mutex<Bucket>,
    non_mutating: Mutex<Bucket>,
    pub pacing: Pacing,
}

impl Pacer {
    pub fn new(pacing: Pacing) -> Pacer {
        Pacer {
            mutating: Mutex::new(Bucket::new(pacing.mutating)),
            non_mutating: Mutex::new(Bucket::new(pacing.non_mutating)),
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
            let wait = match bucket.lock().await.take() {
                Ok(()) => return,
                Err(wait) => wait,
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Full jitter: uniform in [0, min(cap, base × 2^attempt)].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .pacing
            .backoff_base
            .saturating_mul(1 << attempt.min(16))
            .min(self.pacing.backoff_cap);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_capacity_then_paces() {
        let mut bucket = Bucket::new((2.0, 10.0));
        assert!(bucket.take().is_ok());
        assert!(bucket.take().is_ok());
        let wait = bucket.take().unwrap_err();
        assert!(wait <= Duration::from_millis(101), "{wait:?}");
    }

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
