pub use ipam::pacing::TokenBucket;

/// EC2 throttles per account and region with a token bucket per category of call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    /// Describe* calls: bucket 100, refill 20/s.
    NonMutating,
    /// Create/Attach/Assign/Unassign/Detach/Delete/Modify/CreateTags: bucket 50, refill 5/s.
    Mutating,
}
