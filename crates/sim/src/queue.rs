//! The simulator's event queue: a radix heap, which suits a discrete-event simulation because no event is
//! ever scheduled before the one being processed. Events due at the same time come out in the order they
//! were scheduled.
//!
//! Bucket i (1 to 64) holds events whose time's highest bit differing from the last time taken out is
//! bit i-1; events due at that last time wait in `due`, first in first out. Taking the minimum out of the
//! first non-empty bucket and spreading that bucket over the lower ones moves each event a few times at
//! most, in sequential pushes, where a binary heap of tens of thousands of events misses the cache on
//! every level. Within a bucket events stay in scheduling order: a bucket is only ever spread over buckets
//! that are empty, in order, and later pushes append. So the order among equal times needs no sequence
//! number in the key, and `due` holds every event of one instant instead of one at a time.

use ipam::Time;
use std::collections::VecDeque;

pub struct EventQueue<E> {
    due: VecDeque<E>,
    buckets: Vec<Vec<(u64, E)>>,
    /// Bit i-1 set when bucket i holds events, so the first non-empty bucket is one instruction away.
    occupied: u64,
    last: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            due: VecDeque::new(),
            buckets: (0..=64).map(|_| Vec::new()).collect(),
            occupied: 0,
            last: 0,
        }
    }
}

impl<E> EventQueue<E> {
    fn place(&mut self, at: u64, event: E) {
        if at == self.last {
            self.due.push_back(event);
        } else {
            let b = (64 - (at ^ self.last).leading_zeros()) as usize;
            self.buckets[b].push((at, event));
            self.occupied |= 1 << (b - 1);
        }
    }

    /// Schedules `event` at `at`; a time before the last event taken out counts as that time.
    pub fn push(&mut self, at: Time, event: E) {
        self.place(at.as_nanos().max(self.last), event);
    }

    /// The time of the next event, moving the events due then to the front.
    pub fn peek_time(&mut self) -> Option<Time> {
        if self.due.is_empty() {
            if self.occupied == 0 {
                return None;
            }
            let i = self.occupied.trailing_zeros() as usize + 1;
            self.occupied &= !(1 << (i - 1));
            let mut items = std::mem::take(&mut self.buckets[i]);
            self.last = items.iter().map(|(at, _)| *at).min().expect("occupied");
            for (at, event) in items.drain(..) {
                self.place(at, event);
            }
            // The emptied bucket keeps its allocation for the events that will land in it again.
            self.buckets[i] = items;
        }
        Some(Time(self.last))
    }

    /// The next event's time, leaving the queue as it is (so events before it may still be
    /// pushed); slower than [`EventQueue::peek_time`], which moves on to it.
    pub fn next_time(&self) -> Option<Time> {
        if !self.due.is_empty() {
            return Some(Time(self.last));
        }
        if self.occupied == 0 {
            return None;
        }
        let i = self.occupied.trailing_zeros() as usize + 1;
        self.buckets[i].iter().map(|(at, _)| Time(*at)).min()
    }

    pub fn pop(&mut self) -> Option<(Time, E)> {
        let at = self.peek_time()?;
        Some((at, self.due.pop_front().expect("peek_time found one")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn looking_at_the_next_time_leaves_room_for_earlier_events() {
        let mut q = EventQueue::default();
        q.push(Time(10), 'a');
        q.push(Time(120), 'b');
        assert_eq!(q.pop(), Some((Time(10), 'a')));
        assert_eq!(q.next_time(), Some(Time(120)));
        q.push(Time(60), 'c');
        assert_eq!(q.pop(), Some((Time(60), 'c')), "not held back to 120");
        assert_eq!(q.pop(), Some((Time(120), 'b')));
        assert_eq!(q.next_time(), None);
    }

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
