//! The simulator's event queue: a radix heap, which suits a discrete-event simulation because no event is
//! ever scheduled before the one being processed. Events due at the same time come out in the order they
//! were scheduled.
//!
//! Keys are (time, sequence number) packed into a u128. Bucket i holds keys whose highest bit differing
//! from the last key taken out is bit i-1 (bucket 0: equal to it). Taking the minimum out of the first
//! non-empty bucket and spreading that bucket over the lower ones moves each event a few times at most,
//! in sequential pushes, where a binary heap of tens of thousands of events misses the cache on every level.

use ipam::Time;

pub struct EventQueue<E> {
    buckets: Vec<Vec<(u128, E)>>,
    last: u128,
    seq: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            buckets: (0..=128).map(|_| Vec::new()).collect(),
            last: 0,
            seq: 0,
        }
    }
}

impl<E> EventQueue<E> {
    fn bucket(&self, key: u128) -> usize {
        (128 - (key ^ self.last).leading_zeros()) as usize
    }

    /// Schedules `event` at `at`; a time before the last event taken out counts as that time.
    pub fn push(&mut self, at: Time, event: E) {
        self.seq += 1;
        let at = at.as_nanos().max((self.last >> 64) as u64);
        let key = u128::from(at) << 64 | u128::from(self.seq);
        let b = self.bucket(key);
        self.buckets[b].push((key, event));
    }

    /// The time of the next event, moving it to the front.
    pub fn peek_time(&mut self) -> Option<Time> {
        if self.buckets[0].is_empty() {
            let i = self.buckets.iter().position(|b| !b.is_empty())?;
            let items = std::mem::take(&mut self.buckets[i]);
            self.last = items.iter().map(|(k, _)| *k).min().expect("non-empty");
            for (key, event) in items {
                let b = self.bucket(key);
                self.buckets[b].push((key, event));
            }
        }
        self.buckets[0].last().map(|(k, _)| Time((k >> 64) as u64))
    }

    pub fn pop(&mut self) -> Option<(Time, E)> {
        self.peek_time()?;
        let (key, event) = self.buckets[0].pop().expect("peek_time found one");
        Some((Time((key >> 64) as u64), event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Scheduled as the simulator does (never before the event being processed), events come out
        /// sorted by time and, at equal times, by the order they were scheduled in.
        #[test]
        fn events_come_out_in_time_then_scheduling_order(
            steps in prop::collection::vec((0u64..5, 0u64..1_000, any::<bool>()), 1..300)
        ) {
            let mut q = EventQueue::default();
            let mut scheduled: Vec<(u64, usize)> = Vec::new();
            let mut taken = Vec::new();
            let mut now = 0;
            for (pushes, delay, pop) in steps {
                for p in 0..pushes {
                    let at = now + delay * p;
                    q.push(Time(at), scheduled.len());
                    scheduled.push((at, scheduled.len()));
                }
                if pop {
                    if let Some((t, e)) = q.pop() {
                        now = t.0;
                        taken.push((t.0, e));
                    }
                }
            }
            while let Some((t, e)) = q.pop() {
                taken.push((t.0, e));
            }
            scheduled.sort();
            prop_assert_eq!(taken, scheduled);
        }
    }

    #[test]
    fn an_event_scheduled_in_the_past_runs_next_not_before_the_last() {
        let mut q = EventQueue::default();
        q.push(Time(10), "a");
        q.push(Time(20), "b");
        assert_eq!(q.pop(), Some((Time(10), "a")));
        q.push(Time(5), "late");
        q.push(Time(10), "later");
        assert_eq!(q.pop(), Some((Time(10), "late")));
        assert_eq!(q.pop(), Some((Time(10), "later")));
        assert_eq!(q.pop(), Some((Time(20), "b")));
        assert_eq!(q.pop(), None);
    }
}
