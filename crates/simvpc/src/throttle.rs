use ipam::Time;

/// EC2 throttles per account and region with a token bucket per category of call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Describe* calls: bucket 100, refill 20/s.
    NonMutating,
    /// Create/Attach/Assign/Unassign/Detach/Delete/Modify/CreateTags: bucket 50, refill 5/s.
    Mutating,
}

#[derive(Clone, Debug)]
pub struct TokenBucket {
    pub capacity: f64,
    pub refill_per_sec: f64,
    tokens: f64,
    last: Time,
}

impl TokenBucket {
    pub fn new(capacity: f64, refill_per_sec: f64) -> TokenBucket {
        TokenBucket {
            capacity,
            refill_per_sec,
            tokens: capacity,
            last: Time::ZERO,
        }
    }

    /// Takes a token if one is there at `now`.
    pub fn try_take(&mut self, now: Time) -> bool {
        if now > self.last {
            self.tokens = (self.tokens + now.since(self.last).as_secs_f64() * self.refill_per_sec)
                .min(self.capacity);
            self.last = now;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empties_then_refills_at_its_rate() {
        let mut b = TokenBucket::new(3.0, 2.0);
        assert!((0..3).all(|_| b.try_take(Time::ZERO)));
        assert!(!b.try_take(Time::ZERO));
        assert!(!b.try_take(Time::from_millis(400)));
        assert!(b.try_take(Time::from_millis(500)));
        assert!(
            b.try_take(Time::from_secs(10))
                && b.try_take(Time::from_secs(10))
                && b.try_take(Time::from_secs(10))
        );
        assert!(!b.try_take(Time::from_secs(10)));
    }
}
