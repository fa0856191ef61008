//! The warm-pool policy: a pure function of (pool, settings, now, demand) that returns the EC2 actions to
//! take. Same targets as upstream (upstream-ipamd.md §2.3 to §2.5), with three differences:
//! * addresses cooling down count toward the warm targets (as upstream), but ADDs waiting now are covered
//!   only by addresses free now;
//! * ADDs waiting for an address count as demand, so the pool grows at once and by as much as they need;
//! * everything needed is asked for in one pass, in as few EC2 calls as possible (an ENI is created with
//!   its addresses; one call fills each ENI), where upstream takes one step every 5 s.
//!
//! Under prefix delegation, when the subnet has no free aligned /28 the pool grows with /32s for a while,
//! then tries prefixes again; /32s left over once prefixes come back are released when not needed.

use crate::action::{Action, AddressKind, Failure, Outcome, SubnetTarget};
use crate::pacing::Backoff;
use crate::pool::{Pool, PoolStats, MIN_ENI_AGE};
use crate::settings::PoolSettings;
use crate::time::Time;
use std::time::Duration;

/// Upstream shrinks at most this often.
pub const SHRINK_INTERVAL: Duration = Duration::from_secs(30);

/// Why the pool is not growing although it is short.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stall {
    MaxPodsReached,
    /// Cordoned, and AWS_MANAGE_ENIS_NON_SCHEDULABLE=false: neither growth nor shrink.
    NodeUnschedulable,
    NoRoomForEni,
    NoEniConfig,
    SubnetFullUntil(Time),
    BackingOffUntil(Time),
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub actions: Vec<Action>,
    /// When to decide again if nothing else happens first (cooldowns ending, ENIs old enough to free,
    /// holds ending). None: only a new event can change the decision.
    pub wake_at: Option<Time>,
    pub stalls: Vec<Stall>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    /// ADDs waiting for an address right now.
    pub pending_adds: u32,
}

/// What the policy remembers between passes.
#[derive(Clone, Debug, Default)]
pub struct PolicyMemory {
    /// No growth until then: the subnet ran out of addresses (upstream's 120 s hold).
    pub grow_hold_until: Option<Time>,
    /// Prefix delegation grows with /32s until then: the subnet had no free aligned /28.
    pub prefix_fallback_until: Option<Time>,
    /// No new ENI until then: EC2 refused an attachment.
    pub eni_hold_until: Option<Time>,
    /// No growth until then after an unclassified failure (exponential backoff).
    pub retry_after: Option<Time>,
    pub consecutive_failures: u32,
    pub last_shrink: Option<Time>,
    /// No new trunk until then, after its creation failed (its own backoff: a trunk that cannot be
    /// made must not hold back the pods' addresses).
    pub trunk_retry_after: Option<Time>,
    pub trunk_failures: u32,
}

/// Holds after a failure, as upstream: a subnet out of addresses, a refused attachment.
const HOLD: Duration = Duration::from_secs(120);
/// No growth for 2, 4, ... 64 s after the first, second, ... unclassified failure in a row.
const FAILURE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(64));

impl PolicyMemory {
    /// An action was sent: a release starts the shrink pacing.
    pub fn began(&mut self, action: &Action, now: Time) {
        if let Action::ReleaseAddresses { .. } = action {
            self.last_shrink = Some(now);
        }
    }

    /// The policy's reaction to how an action ended: a 120 s hold after an exhausted subnet (or /32s
    /// instead of prefixes for as long, when it had no free /28) or a refused attachment, and
    /// exponential backoff after a failure nobody classified. A success of growth ends the backoff.
    pub fn learn(&mut self, action: &Action, outcome: &Outcome, now: Time) {
        if let Action::CreateTrunk { .. } = action {
            if let Outcome::Failed(_) = outcome {
                self.trunk_failures += 1;
                self.trunk_retry_after = Some(now + FAILURE_BACKOFF.ceiling(self.trunk_failures));
            } else {
                self.trunk_failures = 0;
                self.trunk_retry_after = None;
            }
            return;
        }
        match outcome {
            Outcome::Failed(Failure::InsufficientCidr)
                if action.kind() == Some(AddressKind::Prefix) =>
            {
                self.prefix_fallback_until = Some(now + HOLD);
            }
            Outcome::Failed(Failure::InsufficientCidr | Failure::InsufficientAddresses) => {
                self.grow_hold_until = Some(now + HOLD);
            }
            Outcome::Failed(Failure::AttachmentLimitExceeded) => {
                self.eni_hold_until = Some(now + HOLD)
            }
            // The pool reads the ENI back; nothing for the policy to hold.
            Outcome::Failed(Failure::AddressLimitExceeded | Failure::EniNotFound) => {}
            Outcome::Failed(Failure::Other) => {
                self.consecutive_failures += 1;
                self.retry_after = Some(now + FAILURE_BACKOFF.ceiling(self.consecutive_failures));
            }
            _ if matches!(
                action,
                Action::AssignAddresses { .. } | Action::CreateEni { .. }
            ) =>
            {
                self.consecutive_failures = 0;
                self.retry_after = None;
            }
            _ => {}
        }
    }
}

fn earliest(a: Option<Time>, b: Option<Time>) -> Option<Time> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, y) => x.or(y),
    }
}

fn round_up(n: u32, unit: u32) -> u32 {
    n.div_ceil(unit) * unit
}

fn active(until: Option<Time>, now: Time) -> Option<Time> {
    until.filter(|t| *t > now)
}

/// Everything the passes share.
struct Ctx<'a> {
    pool: &'a Pool,
    memory: &'a PolicyMemory,
    s: &'a PoolSettings,
    now: Time,
    stats: PoolStats,
    /// Prefix delegation in force on this node (the instance supports prefixes).
    pd: bool,
    /// The kind of address the pool grows with now.
    grow_kind: AddressKind,
}

pub fn decide(
    pool: &Pool,
    memory: &PolicyMemory,
    s: &PoolSettings,
    now: Time,
    demand: &Demand,
) -> Decision {
    let pd = s.prefix_delegation && pool.node.supports_prefixes;
    let fallback = pd && active(memory.prefix_fallback_until, now).is_some();
    let ctx = Ctx {
        pool,
        memory,
        s,
        now,
        stats: pool.stats(),
        pd,
        grow_kind: if pd && !fallback {
            AddressKind::Prefix
        } else {
            AddressKind::Ip
        },
    };
    let mut d = Decision {
        wake_at: pool.next_cooldown_end(s.ip_cooldown),
        ..Decision::default()
    };
    if fallback {
        d.wake_at = earliest(d.wake_at, memory.prefix_fallback_until);
    }
    for eni in pool
        .enis()
        .iter()
        .filter(|e| e.needs_resync && !e.resyncing && !e.address_calls_in_flight())
    {
        d.actions.push(Action::ResyncEni {
            eni: eni.info.id.clone(),
        });
    }
    if pool.node.unschedulable && !s.manage_enis_non_schedulable {
        d.stalls.push(Stall::NodeUnschedulable);
        return d;
    }
    trunk(&ctx, &mut d);
    grow(&ctx, demand, &mut d);
    let growing = pool.inflight.addresses > 0 || d.actions.iter().any(|a| a.kind().is_some());
    if !growing && demand.pending_adds == 0 {
        shrink(&ctx, &mut d);
        free_eni(&ctx, &mut d);
    }
    d
}

/// Addresses the pool is short of, in units of the growth kind's slots, and whether to fill whole ENIs.
///
/// Addresses cooling down count toward the warm targets, as upstream counts them: they are free
/// again in seconds, and not counting them made a 2-pod rolling update on a half-full node create
/// an ENI and free it a minute later. They are never assigned before their cooldown ends, so ADDs
/// waiting right now are covered by free addresses only.
fn slots_short(ctx: &Ctx, demand: &Demand) -> (u32, bool) {
    let (s, st) = (ctx.s, &ctx.stats);
    let inflight = ctx.pool.inflight.addresses;
    let free = st.available + inflight;
    let counted = free + st.cooling;
    let total = st.total + inflight;
    let unit = ctx.grow_kind.size();
    let pending = demand.pending_adds;
    let for_waiting = pending.saturating_sub(free);
    if s.ip_targets_defined() {
        let short = (s.warm_ip_target + pending)
            .saturating_sub(counted)
            .max(s.minimum_ip_target.saturating_sub(total))
            .max(for_waiting);
        return (short.div_ceil(unit), false);
    }
    if ctx.pd {
        let wanted = 16 * s.warm_prefix_target + pending;
        let low = counted < wanted || (s.warm_prefix_target == 0 && free == 0) || for_waiting > 0;
        if !low {
            return (0, false);
        }
        let deficit = wanted.saturating_sub(counted).max(for_waiting).max(1);
        if ctx.grow_kind == AddressKind::Ip {
            return (deficit, false);
        }
        let inflight_prefixes = inflight / 16;
        let missing_free = s
            .warm_prefix_target
            .saturating_sub(st.free_prefixes + inflight_prefixes);
        return (missing_free.max(1).max(deficit.div_ceil(16)), false);
    }
    let wanted = s.warm_eni_target * ctx.pool.node.slots_per_eni + pending;
    let low = counted < wanted || (s.warm_eni_target == 0 && free == 0) || for_waiting > 0;
    (
        (if low {
            wanted.saturating_sub(counted).max(for_waiting).max(1)
        } else {
            0
        }),
        true,
    )
}

fn grow(ctx: &Ctx, demand: &Demand, d: &mut Decision) {
    let (pool, s, now) = (ctx.pool, ctx.s, ctx.now);
    let (mut remaining, whole_enis) = slots_short(ctx, demand);
    if remaining == 0 {
        return;
    }
    let unit = ctx.grow_kind.size();
    let total = ctx.stats.total + pool.inflight.addresses;
    if total >= pool.node.max_pods {
        d.stalls.push(Stall::MaxPodsReached);
        return;
    }
    if !whole_enis {
        remaining = remaining.min((pool.node.max_pods - total).div_ceil(unit));
    }
    let holds = [
        active(ctx.memory.grow_hold_until, now),
        active(ctx.memory.retry_after, now),
    ];
    if let Some(t) = holds.into_iter().flatten().next() {
        d.stalls.push(if Some(t) == ctx.memory.grow_hold_until {
            Stall::SubnetFullUntil(t)
        } else {
            Stall::BackingOffUntil(t)
        });
        d.wake_at = earliest(d.wake_at, Some(t));
        return;
    }
    let slots = pool.node.slots_per_eni;
    for eni in pool
        .enis()
        .iter()
        .filter(|e| pool.gives_pod_addresses(e) && !e.needs_resync && !e.resyncing)
    {
        let room = slots.saturating_sub(eni.slots_used() + eni.inflight_slots);
        if room == 0 {
            continue;
        }
        let count = if whole_enis {
            room
        } else {
            room.min(remaining)
        };
        d.actions.push(Action::AssignAddresses {
            eni: eni.info.id.clone(),
            kind: ctx.grow_kind,
            count,
        });
        remaining = remaining.saturating_sub(count);
        if remaining == 0 {
            return;
        }
    }
    // ENIs on their way will take more addresses once attached: wait for them rather than create another.
    let room_coming = (pool.inflight.enis * slots).saturating_sub(pool.inflight.eni_slots);
    remaining = remaining.saturating_sub(room_coming);
    if remaining == 0 {
        return;
    }
    let (subnet, security_groups) = match (&pool.node.eni_config, s.custom_networking) {
        (Some(cfg), true) => (
            SubnetTarget::Subnet(cfg.subnet.clone()),
            if cfg.security_groups.is_empty() {
                pool.node.security_groups.clone()
            } else {
                cfg.security_groups.clone()
            },
        ),
        (None, true) => {
            d.stalls.push(Stall::NoEniConfig);
            return;
        }
        (_, false) if s.subnet_discovery => (
            SubnetTarget::Discover {
                primary: pool.node.primary_subnet.clone(),
            },
            pool.node.security_groups.clone(),
        ),
        (_, false) => (
            SubnetTarget::Subnet(pool.node.primary_subnet.clone()),
            pool.node.security_groups.clone(),
        ),
    };
    if let Some(t) = active(ctx.memory.eni_hold_until, now) {
        d.stalls.push(Stall::NoRoomForEni);
        d.wake_at = earliest(d.wake_at, Some(t));
        return;
    }
    let mut room_for = eni_room(pool, s);
    while remaining > 0 && room_for > 0 {
        let count = if whole_enis {
            slots
        } else {
            remaining.min(slots)
        };
        d.actions.push(Action::CreateEni {
            subnet: subnet.clone(),
            security_groups: security_groups.clone(),
            kind: ctx.grow_kind,
            count,
        });
        remaining = remaining.saturating_sub(count);
        room_for -= 1;
    }
    if remaining > 0 {
        d.stalls.push(Stall::NoRoomForEni);
    }
}

/// Whether a trunk ENI is wanted and neither there nor on its way: security groups for pods on an
/// instance type that can carry branches (on one that cannot, no slot is given up for nothing).
fn trunk_missing(pool: &Pool, s: &PoolSettings) -> bool {
    s.pod_eni
        && crate::limits::branch_interfaces(&pool.node.instance_type) > 0
        && !pool.inflight.trunk
        && !pool.enis().iter().any(|e| e.info.is_trunk)
}

/// Standalone security groups for pods: the node makes its trunk in its primary subnet, with its
/// own groups, as soon as a slot allows.
fn trunk(ctx: &Ctx, d: &mut Decision) {
    let (pool, s) = (ctx.pool, ctx.s);
    if !s.create_trunk || !trunk_missing(pool, s) {
        return;
    }
    if let Some(t) = active(ctx.memory.trunk_retry_after, ctx.now) {
        d.wake_at = earliest(d.wake_at, Some(t));
        return;
    }
    // The slot eni_room keeps free is this one.
    if enis_used(pool) < eni_limit(pool, s) {
        d.actions.push(Action::CreateTrunk {
            subnet: pool.node.primary_subnet.clone(),
            security_groups: pool.node.security_groups.clone(),
        });
    }
}

fn eni_limit(pool: &Pool, s: &PoolSettings) -> u32 {
    s.max_eni
        .map_or(pool.node.max_enis, |m| m.min(pool.node.max_enis))
}

fn enis_used(pool: &Pool) -> u32 {
    pool.enis().len() as u32 + pool.inflight.enis + pool.node.unmanaged_enis
}

/// How many more ENIs may be attached: MAX_ENI, unmanaged ENIs and a slot kept for the SGP trunk.
fn eni_room(pool: &Pool, s: &PoolSettings) -> u32 {
    let trunk_reserve = u32::from(trunk_missing(pool, s));
    eni_limit(pool, s).saturating_sub(enis_used(pool) + trunk_reserve)
}

/// Releases idle addresses beyond the targets, and idle addresses of the kind the pool does not grow with
/// when the targets hold without them.
fn shrink(ctx: &Ctx, d: &mut Decision) {
    let (pool, s, st) = (ctx.pool, ctx.s, &ctx.stats);
    if let Some(last) = ctx.memory.last_shrink {
        if ctx.now.since(last) < SHRINK_INTERVAL {
            d.wake_at = earliest(d.wake_at, Some(last + SHRINK_INTERVAL));
            return;
        }
    }
    // How many addresses (and prefixes) may go while the targets still hold.
    let (mut spare, mut spare_prefixes) = if s.ip_targets_defined() {
        let by_warm = st.available.saturating_sub(s.warm_ip_target);
        let by_min = st.total.saturating_sub(s.minimum_ip_target);
        let spare = by_warm.min(by_min);
        let prefixes = if ctx.pd {
            let keep_for_warm = (st.assigned + st.cooling + s.warm_ip_target).div_ceil(16);
            let keep_for_min = s.minimum_ip_target.div_ceil(16);
            st.free_prefixes
                .min(st.prefixes.saturating_sub(keep_for_warm.max(keep_for_min)))
        } else {
            0
        };
        (spare, prefixes)
    } else if ctx.pd {
        let spare = st.available.saturating_sub(16 * s.warm_prefix_target);
        (spare, st.free_prefixes.saturating_sub(s.warm_prefix_target))
    } else {
        // WARM_ENI_TARGET mode gives back whole ENIs only (free_eni), never single addresses.
        (
            st.available
                .saturating_sub(s.warm_eni_target * pool.node.slots_per_eni),
            0,
        )
    };
    let plain_warm_eni = !ctx.pd && !s.ip_targets_defined();
    let mut releases: Vec<Action> = Vec::new();
    // Highest device numbers first, so that secondary ENIs empty out and can be freed.
    for eni in pool.enis().iter().rev() {
        // A read-back of the ENI is due or under way: a release answered before the read's reply
        // would be undone by it.
        if eni.needs_resync || eni.resyncing {
            continue;
        }
        let excluded = eni.info.excluded;
        // Nothing here could go: no idle block, or no room under the targets.
        // (WARM_ENI_TARGET alone gives back only prefixes, leftovers of prefix delegation.)
        if !excluded
            && (!pool.gives_pod_addresses(eni)
                || eni.available() == 0
                || spare == 0
                || (plain_warm_eni && eni.prefix_count() == 0))
        {
            continue;
        }
        let mut cidrs = Vec::new();
        // A block already being released is not released again (its call may be retrying for longer
        // than the shrink interval).
        for b in eni
            .blocks()
            .iter()
            .filter(|b| b.is_idle() && !b.is_releasing())
        {
            if excluded {
                // Addresses on an excluded ENI are never used: give them all back.
                cidrs.push(b.cidr);
                continue;
            }
            let off_mode = b.kind() != ctx.grow_kind;
            let fits = spare >= b.size();
            let take = match (b.kind(), ctx.pd) {
                (AddressKind::Prefix, true) => spare_prefixes > 0 && fits,
                (AddressKind::Ip, false) => fits && !plain_warm_eni,
                // Leftovers of the other mode (or of the /32 fallback) go when the pool is fine without them.
                _ => off_mode && fits,
            };
            if take {
                spare -= b.size();
                if b.is_prefix() {
                    spare_prefixes = spare_prefixes.saturating_sub(1);
                }
                cidrs.push(b.cidr);
            }
        }
        if !cidrs.is_empty() {
            releases.push(Action::ReleaseAddresses {
                eni: eni.info.id.clone(),
                cidrs,
            });
        }
    }
    d.actions.extend(releases);
}

/// Frees at most one ENI per pass, with upstream's eligibility rules (upstream-ipamd.md §2.5 tryFreeENI).
fn free_eni(ctx: &Ctx, d: &mut Decision) {
    let (pool, s, st, now) = (ctx.pool, ctx.s, &ctx.stats, ctx.now);
    if d.actions
        .iter()
        .any(|a| matches!(a, Action::ReleaseAddresses { .. }))
    {
        return;
    }
    let slots = pool.node.slots_per_eni;
    let worth_trying = if s.ip_targets_defined() {
        true
    } else if ctx.pd {
        st.available >= (s.warm_prefix_target + 1) * slots * 16
            || pool
                .enis()
                .iter()
                .any(|e| !e.info.is_primary && !e.info.is_trunk && e.assigned() == 0)
    } else {
        st.available >= (s.warm_eni_target + 1) * slots
    };
    if !worth_trying {
        return;
    }
    let unit = if ctx.pd { 16 } else { 1 };
    for eni in pool.enis().iter().rev() {
        let info = &eni.info;
        if info.is_primary || info.is_trunk || info.is_efa || eni.freeing || eni.inflight_slots > 0
        {
            continue;
        }
        if eni.assigned() > 0 || eni.has_cooling() {
            continue;
        }
        if now.since(eni.added_at) < MIN_ENI_AGE {
            d.wake_at = earliest(d.wake_at, Some(eni.added_at + MIN_ENI_AGE));
            continue;
        }
        if !info.excluded && pool.gives_pod_addresses(eni) {
            let total_here: u32 = eni.blocks().iter().map(|b| b.size()).sum();
            let prefixes_here = eni.blocks().iter().filter(|b| b.is_prefix()).count() as u32;
            let others_free = st.available.saturating_sub(total_here);
            let others_total = st.total.saturating_sub(total_here);
            let others_free_prefixes = st.free_prefixes.saturating_sub(prefixes_here);
            if s.ip_targets_defined() {
                if others_free < round_up(s.warm_ip_target, unit)
                    || others_total < round_up(s.minimum_ip_target, unit)
                {
                    continue;
                }
            } else if ctx.pd && others_free_prefixes < s.warm_prefix_target {
                continue;
            }
        }
        d.actions.push(Action::FreeEni {
            eni: info.id.clone(),
        });
        return;
    }
}
