//! Coordination between replicas through DynamoDB leases: one fenced leader and
//! a fixed set of shard slots.
//!
//! Safety rests on two clocks never being compared across machines:
//! - a holder counts its lease from the moment it *sent* its last successful
//!   renewal and stops acting as holder after 2/3 of the lease duration
//!   (the renew deadline);
//! - a contender takes over an item only after it has seen the item's record
//!   version unchanged for a full lease duration on its own monotonic clock,
//!   counted from when it first *received* that version, and then only with a
//!   write conditional on that version.
//!
//! The first moment a contender can take over is therefore at least one full
//! lease after the holder's last renewal was sent, and the holder stopped
//! acting a third of a lease before that. Every acquisition of the leader item
//! increments its term, the fencing token leader actions carry.

pub mod lease;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use lease::{HolderInfo, LeaseError, LeaseItem, LeaseTable};

/// How many slots exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardCount {
    /// Take the lowest free slot index; every replica holds a slot.
    Auto,
    /// Slots `0..N`; replicas beyond N are standbys.
    Fixed(u32),
}

impl std::str::FromStr for ShardCount {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let raw = raw.trim();
        if raw.eq_ignore_ascii_case("auto") {
            return Ok(ShardCount::Auto);
        }
        match raw.parse::<u32>() {
            Ok(n) if (1..=1024).contains(&n) => Ok(ShardCount::Fixed(n)),
            _ => Err("expected `auto` or a number of slots from 1 to 1024".into()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct CoordinationConfig {
    pub shard_count: ShardCount,
    pub lease: Duration,
    pub heartbeat: Duration,
    pub create_table: bool,
    pub me: HolderInfo,
    /// Counts renewals that failed (`shard_sd_lease_renewal_failures_total`).
    pub renewal_failures: prometheus_client::metrics::counter::Counter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No lease table: one replica serves everything.
    Single,
    Leader,
    Follower,
    Standby,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Single => "single",
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Standby => "standby",
        }
    }
}

/// A slot the leader sees alive.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LiveSlot {
    pub slot: u32,
    pub holder: String,
    pub addr: String,
    pub weight: f64,
}

/// What this replica knows about coordination, as `/v1/status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CoordinationView {
    pub role: Role,
    pub slot: Option<u32>,
    /// The leader's term: ours when leading, else the one last seen on the leader item.
    pub term: Option<u64>,
    pub leader_id: Option<String>,
    pub leader_addr: Option<String>,
    /// Leader only: the slots whose record versions move.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub live_slots: Option<Vec<LiveSlot>>,
    /// The last coordination error, if the last attempt failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Until when this replica may act as leader (local monotonic clock).
    #[serde(skip)]
    pub leader_until: Option<Instant>,
    /// Until when this replica may act as holder of `slot`.
    #[serde(skip)]
    pub slot_until: Option<Instant>,
    /// A slot whose lease lapsed only because this replica's own renewals failed, and
    /// that nobody else is known to hold: its last shard is still served (stale).
    pub stale_slot: Option<u32>,
}

impl CoordinationView {
    pub fn single() -> Self {
        CoordinationView {
            role: Role::Single,
            slot: None,
            term: None,
            leader_id: None,
            leader_addr: None,
            live_slots: None,
            error: None,
            leader_until: None,
            slot_until: None,
            stale_slot: None,
        }
    }

    /// The slot whose shard this replica serves: the one it holds, else the one it
    /// keeps serving after its lease lapsed (prefer duplicates over gaps).
    pub fn serving_slot(&self) -> Option<u32> {
        self.slot.or(self.stale_slot)
    }

    /// The view as of `now`: a lease whose renew deadline has passed is not held,
    /// even if the coordination loop is still blocked in a call.
    pub fn at(&self, now: Instant) -> CoordinationView {
        let mut view = self.clone();
        if view.role == Role::Single {
            return view;
        }
        if view.leader_until.is_some_and(|until| until <= now) {
            view.leader_until = None;
            view.live_slots = None;
        }
        if view.slot_until.is_some_and(|until| until <= now) {
            // Not renewed in time: nobody else is known to hold it yet.
            view.slot_until = None;
            view.stale_slot = view.slot.take().or(view.stale_slot);
        }
        view.role = match (view.leader_until.is_some(), view.slot.is_some()) {
            (true, _) => Role::Leader,
            (false, true) => Role::Follower,
            (false, false) => Role::Standby,
        };
        view
    }

    fn starting() -> Self {
        CoordinationView {
            role: Role::Standby,
            ..Self::single()
        }
    }
}

/// Wakes every reader of the view when a lease deadline in it passes, even while
/// the coordinator is blocked in a call: the view as of then (see
/// [`CoordinationView::at`]) has lost that lease, and nobody has to poll for it.
/// The view itself is left as published, so a renewal that was made but is
/// published late reads as one, not as the end of a term.
async fn notify_deadlines(view: Arc<watch::Sender<CoordinationView>>, shutdown: CancellationToken) {
    let mut published = view.subscribe();
    // The latest deadline readers were woken for: one that passed before this
    // task looked is notified at once, none twice.
    let mut notified: Option<Instant> = None;
    loop {
        let next = {
            let current = published.borrow_and_update();
            [current.leader_until, current.slot_until]
                .into_iter()
                .flatten()
                .filter(|deadline| notified.is_none_or(|n| *deadline > n))
                .min()
        };
        tokio::select! {
            changed = published.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = crate::clock::sleep_until(next) => {
                notified = next;
                view.send_modify(|_| {});
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// When each item's current record version was first received.
#[derive(Debug, Default)]
pub struct Observer {
    seen: HashMap<String, (String, Instant)>,
}

impl Observer {
    /// Records `item` as received at `at`; the clock restarts when its version moved.
    /// Returns whether a version seen before was replaced by a new one.
    pub fn observe(&mut self, item: &LeaseItem, at: Instant) -> bool {
        let previous = self.seen.get(&item.pk).map(|(rvn, _)| rvn.clone());
        if previous.as_ref() != Some(&item.rvn) {
            self.seen.insert(item.pk.clone(), (item.rvn.clone(), at));
        }
        previous.is_some_and(|rvn| rvn != item.rvn)
    }

    /// When `item` may be taken over if its version does not move: a full lease
    /// after its current version was first received.
    pub fn expires_at(&self, item: &LeaseItem, default_lease: Duration) -> Option<Instant> {
        let (rvn, since) = self.seen.get(&item.pk)?;
        let lease = if item.lease.is_zero() {
            default_lease
        } else {
            item.lease
        };
        (*rvn == item.rvn).then_some(*since + lease)
    }
}

/// What a contender may do with an item.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// Missing: acquire with `attribute_not_exists`.
    Missing,
    /// Released, expired, or left by an earlier incarnation of this holder: acquire
    /// conditional on the version seen.
    Takeable(LeaseItem),
    /// Held and alive; may be taken at the given time if its version stays put.
    Held { until: Instant },
}

/// Whether `item` was last written by this very process (same id and incarnation).
pub fn is_mine(item: &LeaseItem, me: &HolderInfo) -> bool {
    item.holder == me.id && item.incarnation == me.incarnation
}

pub fn claim(
    item: Option<&LeaseItem>,
    observer: &Observer,
    now: Instant,
    me: &HolderInfo,
    default_lease: Duration,
) -> Claim {
    let Some(item) = item else {
        return Claim::Missing;
    };
    // Another process with this REPLICA_ID is another holder: it waits like anyone.
    if item.released || item.holder.is_empty() || is_mine(item, me) {
        return Claim::Takeable(item.clone());
    }
    match observer.expires_at(item, default_lease) {
        Some(until) if until <= now => Claim::Takeable(item.clone()),
        Some(until) => Claim::Held { until },
        // Not observed yet: a full lease from now.
        None => Claim::Held {
            until: now + default_lease,
        },
    }
}

/// The result of trying to take one lease.
enum Attempt {
    /// Taken; the previous holder, if any.
    Took(Held, String),
    /// Held by someone else until at least then.
    Wait(Instant),
    /// Someone else wrote it first.
    Lost,
}

/// A lease this replica holds.
#[derive(Clone, Debug)]
struct Held {
    item: LeaseItem,
    /// When the write that last renewed (or acquired) it was sent.
    renewed_sent: Instant,
}

impl Held {
    /// Acting as holder is allowed until 2/3 of the lease after the last renewal was sent.
    fn deadline(&self) -> Instant {
        self.renewed_sent + self.item.lease * 2 / 3
    }

    fn is_valid(&self, now: Instant) -> bool {
        now < self.deadline()
    }
}

/// The coordination loop of one replica.
pub struct Coordinator {
    table: LeaseTable,
    cfg: CoordinationConfig,
    leader: Option<Held>,
    slot: Option<(u32, Held)>,
    observer: Observer,
    /// Highest slot index known to exist (auto mode reads one beyond it).
    highest_slot: u32,
    /// Shared with [`notify_deadlines`].
    view: Arc<watch::Sender<CoordinationView>>,
    last_error: Option<String>,
    last_live: Option<Vec<LiveSlot>>,
    /// The slot whose lease lapsed because renewals failed, with the item as this
    /// replica last wrote it; served until a successor is seen or the lease is
    /// regained, and released on shutdown if nobody took it.
    lapsed: Option<(u32, LeaseItem)>,
    /// The leader item as last read, kept while the table cannot be read.
    last_leader: Option<LeaseItem>,
    /// Items seen held under this REPLICA_ID by another process (reported once).
    duplicate_id: std::collections::HashSet<String>,
    /// The highest leader term this replica has seen: a new term goes above it,
    /// even if the leader item was deleted meanwhile.
    highest_term: u64,
}

impl Coordinator {
    pub fn new(table: LeaseTable, cfg: CoordinationConfig) -> Self {
        Coordinator {
            table,
            cfg,
            leader: None,
            slot: None,
            observer: Observer::default(),
            highest_slot: 0,
            view: Arc::new(watch::Sender::new(CoordinationView::starting())),
            last_error: None,
            last_live: None,
            lapsed: None,
            last_leader: None,
            duplicate_id: Default::default(),
            highest_term: 0,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<CoordinationView> {
        self.view.subscribe()
    }

    /// Runs until `shutdown`, then releases what it holds so successors need not wait a lease.
    pub async fn run(mut self, shutdown: CancellationToken) {
        tokio::spawn(notify_deadlines(self.view.clone(), shutdown.clone()));
        if self.cfg.create_table {
            if let Err(err) = self.table.create_if_missing().await {
                self.report_error(&err);
            }
        }
        loop {
            let wake = self.step().await;
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        self.release_all().await;
    }

    /// One heartbeat: enforce deadlines, renew, read, acquire, act. Returns when to wake.
    async fn step(&mut self) -> Instant {
        let started = Instant::now();
        self.enforce_deadlines(started);
        self.renew_held().await;
        // A renewal moved a deadline: readers must not see the old one pass while
        // the rest of the step (reads, acquisitions) runs.
        self.publish_view();

        let mut wake = Instant::now() + self.cfg.heartbeat;
        match self.read_items().await {
            Ok(mut items) => {
                self.clear_error();
                self.check_lapsed(&items);
                if let Some(at) = self.acquire(&mut items).await {
                    wake = wake.min(at);
                }
                self.last_leader = items.get(&self.table.leader_pk()).cloned();
                self.act_as_leader(&items);
                self.publish_view();
            }
            Err(err) => {
                self.report_error(&err);
                self.publish_view();
            }
        }
        wake
    }

    /// Drops leases whose renew deadline passed: this replica stops acting as their
    /// holder before anyone else may take them over.
    fn enforce_deadlines(&mut self, now: Instant) {
        if self.leader.as_ref().is_some_and(|h| !h.is_valid(now)) {
            let held = self.leader.take();
            tracing::warn!(
                term = held.map(|h| h.item.term),
                "leader lease not renewed within its deadline: no longer acting as leader"
            );
        }
        if self.slot.as_ref().is_some_and(|(_, h)| !h.is_valid(now)) {
            if let Some((slot, held)) = self.slot.take() {
                tracing::warn!(
                    slot,
                    "slot lease not renewed within its deadline: still serving the slot's last \
                     shard (stale) until another holder takes it or the lease is regained"
                );
                self.lapsed = Some((slot, held.item));
            }
        }
    }

    /// Ends a lapse once the slot's item shows another holder: someone else serves it now.
    fn check_lapsed(&mut self, items: &HashMap<String, LeaseItem>) {
        let Some(slot) = self.lapsed.as_ref().map(|(slot, _)| *slot) else {
            return;
        };
        let successor = items
            .get(&self.table.slot_pk(slot))
            .filter(|item| !is_mine(item, &self.cfg.me));
        if let Some(item) = successor {
            tracing::info!(
                slot,
                holder = %item.holder,
                released = item.released,
                "slot taken over by another holder: no longer serving its stale shard"
            );
            self.lapsed = None;
        }
    }

    async fn renew_held(&mut self) {
        if let Some(held) = self.leader.clone() {
            self.leader = self.renew_one(held, "leader").await;
            if self.leader.is_none() {
                self.last_live = None;
            }
            // Said at once: the slot's renewal may take a while yet.
            self.publish_view();
        }
        if let Some((slot, held)) = self.slot.clone() {
            self.slot = self
                .renew_one(held.clone(), "slot")
                .await
                .map(|h| (slot, h));
            if self.slot.is_none() {
                // A failed condition says only that the item moved: it is served
                // stale until the table shows who holds it now.
                self.lapsed = Some((slot, held.item));
            }
        }
    }

    async fn renew_one(&mut self, held: Held, what: &str) -> Option<Held> {
        let sent = Instant::now();
        // A renewal that cannot finish before the deadline is useless: give up then.
        let renewal = self.table.renew(&held.item, &self.cfg.me);
        let Ok(result) = tokio::time::timeout_at(held.deadline().into(), renewal).await else {
            self.cfg.renewal_failures.inc();
            tracing::warn!("renewing {what} lease did not finish before its renew deadline");
            return Some(held);
        };
        match result {
            Ok(item) => Some(Held {
                item,
                renewed_sent: sent,
            }),
            Err(LeaseError::Lost { pk }) => {
                self.cfg.renewal_failures.inc();
                tracing::warn!(pk = %pk, "{what} lease was changed by another writer");
                None
            }
            Err(err @ LeaseError::SameReplicaId { .. }) => {
                self.cfg.renewal_failures.inc();
                self.report_error(&err);
                None
            }
            Err(err) => {
                self.cfg.renewal_failures.inc();
                // Keep it until its deadline; the next heartbeat tries again.
                tracing::warn!("renewing {what} lease failed: {err}");
                self.report_error(&err);
                Some(held)
            }
        }
    }

    fn slot_keys(&self) -> Vec<(u32, String)> {
        let count = match self.cfg.shard_count {
            ShardCount::Fixed(n) => n,
            ShardCount::Auto => self.highest_slot + 2,
        };
        (0..count).map(|k| (k, self.table.slot_pk(k))).collect()
    }

    /// Reads the leader and slot items; in auto mode, reads further until a slot
    /// index that does not exist is found.
    async fn read_items(&mut self) -> Result<HashMap<String, LeaseItem>, LeaseError> {
        let mut pks: Vec<String> = vec![self.table.leader_pk()];
        pks.extend(self.slot_keys().into_iter().map(|(_, pk)| pk));
        let mut items = self.table.read(&pks).await?;
        if self.cfg.shard_count == ShardCount::Auto {
            // Read on until a slot index that does not exist.
            let mut last = self.highest_slot + 1;
            while items.contains_key(&self.table.slot_pk(last)) {
                let extra: Vec<String> = (last + 1..=last + 16)
                    .map(|k| self.table.slot_pk(k))
                    .collect();
                items.extend(self.table.read(&extra).await?);
                last += 16;
            }
            self.highest_slot = items
                .keys()
                .filter_map(|pk| self.table.slot_of(pk))
                .max()
                .unwrap_or(0);
        }
        let received = Instant::now();
        if let Some(leader) = items.get(&self.table.leader_pk()) {
            self.highest_term = self.highest_term.max(leader.term);
        }
        for item in items.values() {
            let moved = self.observer.observe(item, received);
            let other_process =
                item.holder == self.cfg.me.id && !item.released && !is_mine(item, &self.cfg.me);
            // Renewed by another live process under our id: say so once, never act as it.
            if moved && other_process && self.duplicate_id.insert(item.pk.clone()) {
                self.report_error(&LeaseError::SameReplicaId {
                    id: self.cfg.me.id.clone(),
                    pk: item.pk.clone(),
                });
            }
        }
        Ok(items)
    }

    /// Tries to take the leader lease and, without a slot, a slot. Returns the
    /// earliest time a lease it waits for could be taken over.
    /// Items taken are written back into `items`, so that what this step decides
    /// next (the live slots) already includes them.
    async fn acquire(&mut self, items: &mut HashMap<String, LeaseItem>) -> Option<Instant> {
        let now = Instant::now();
        let mut wake: Option<Instant> = None;
        if self.leader.is_none() {
            match self.attempt(&self.table.leader_pk(), items, now).await {
                Attempt::Took(held, previous) => {
                    tracing::info!(term = held.item.term, previous, "became leader");
                    items.insert(held.item.pk.clone(), held.item.clone());
                    self.leader = Some(held);
                }
                Attempt::Wait(until) => wake = Some(until),
                Attempt::Lost => {}
            }
        }
        if self.slot.is_none() {
            // A lapsed slot is regained or given up before any other is taken: serving
            // it stale while holding another would serve two shards' worth.
            let candidates = match &self.lapsed {
                Some((slot, _)) => vec![(*slot, self.table.slot_pk(*slot))],
                None => self.slot_keys(),
            };
            for (slot, pk) in candidates {
                match self.attempt(&pk, items, now).await {
                    Attempt::Took(held, previous) => {
                        if self.lapsed.take().is_some() {
                            tracing::info!(slot, "regained the lapsed slot");
                        } else {
                            tracing::info!(slot, previous, "took slot");
                        }
                        items.insert(held.item.pk.clone(), held.item.clone());
                        self.slot = Some((slot, held));
                        self.highest_slot = self.highest_slot.max(slot);
                        break;
                    }
                    Attempt::Wait(until) => wake = Some(wake.map_or(until, |w| w.min(until))),
                    Attempt::Lost => {}
                }
            }
        }
        // Only wait early for leases still wanted.
        (self.leader.is_none() || self.slot.is_none())
            .then_some(wake)
            .flatten()
    }

    /// Takes the item `pk` if `claim` allows it now.
    async fn attempt(
        &mut self,
        pk: &str,
        items: &HashMap<String, LeaseItem>,
        now: Instant,
    ) -> Attempt {
        match claim(
            items.get(pk),
            &self.observer,
            now,
            &self.cfg.me,
            self.cfg.lease,
        ) {
            Claim::Held { until } => Attempt::Wait(until),
            Claim::Missing => match self.try_acquire(pk, None).await {
                Some(held) => Attempt::Took(held, String::new()),
                None => Attempt::Lost,
            },
            Claim::Takeable(seen) => match self.try_acquire(pk, Some(&seen)).await {
                Some(held) => Attempt::Took(held, seen.holder),
                None => Attempt::Lost,
            },
        }
    }

    async fn try_acquire(&mut self, pk: &str, seen: Option<&LeaseItem>) -> Option<Held> {
        let sent = Instant::now();
        let after_term = if pk == self.table.leader_pk() {
            self.highest_term
        } else {
            0
        };
        match self.table.acquire(pk, seen, after_term, &self.cfg.me).await {
            Ok(item) => {
                if pk == self.table.leader_pk() {
                    self.highest_term = self.highest_term.max(item.term);
                }
                self.observer.observe(&item, sent);
                Some(Held {
                    item,
                    renewed_sent: sent,
                })
            }
            Err(LeaseError::Lost { .. }) => None,
            Err(err) => {
                self.report_error(&err);
                None
            }
        }
    }

    /// The slots alive now: held, not released, version moved within a lease.
    fn live_slots(&self, items: &HashMap<String, LeaseItem>, now: Instant) -> Vec<LiveSlot> {
        let mut live: Vec<LiveSlot> = items
            .values()
            .filter_map(|item| {
                let slot = self.table.slot_of(&item.pk)?;
                if let ShardCount::Fixed(n) = self.cfg.shard_count {
                    if slot >= n {
                        return None;
                    }
                }
                let alive = !item.released
                    && !item.holder.is_empty()
                    && self
                        .observer
                        .expires_at(item, self.cfg.lease)
                        .is_some_and(|until| until > now);
                alive.then(|| LiveSlot {
                    slot,
                    holder: item.holder.clone(),
                    addr: item.addr.clone(),
                    weight: item.weight,
                })
            })
            .collect();
        live.sort_by_key(|s| s.slot);
        live
    }

    /// The leader's work each heartbeat, fenced by its term: judge which slots live.
    fn act_as_leader(&mut self, items: &HashMap<String, LeaseItem>) {
        let now = Instant::now();
        let Some(term) = self
            .leader
            .as_ref()
            .filter(|h| h.is_valid(now))
            .map(|h| h.item.term)
        else {
            return;
        };
        let live = self.live_slots(items, now);
        tracing::debug!(target: "leader_action", term, live_slots = live.len(), "leader acting");
        if self.last_live.as_ref() != Some(&live) {
            tracing::info!(
                term,
                slots = ?live.iter().map(|s| (s.slot, s.holder.as_str())).collect::<Vec<_>>(),
                "live slots changed"
            );
            self.last_live = Some(live);
        }
    }

    fn publish_view(&mut self) {
        let now = Instant::now();
        // A deadline may have passed during this step's calls: it is a lapse now.
        self.enforce_deadlines(now);
        let leading = self.leader.as_ref().filter(|h| h.is_valid(now));
        // The item as last read names this very process only while it leads: once
        // it stopped, it is nobody's to follow until the table shows who leads.
        let leader_item = leading.map(|h| h.item.clone()).or_else(|| {
            self.last_leader
                .as_ref()
                .filter(|i| !i.released && !i.holder.is_empty() && !is_mine(i, &self.cfg.me))
                .cloned()
        });
        // A released leader item keeps its term: followers' fence must not read a
        // leader's SIGTERM as the term going down.
        let term = leading
            .map(|h| h.item.term)
            .or_else(|| self.last_leader.as_ref().map(|i| i.term));
        let slot = self.slot.as_ref().filter(|(_, h)| h.is_valid(now));
        let view = CoordinationView {
            // Derived from the deadlines by `at`.
            role: Role::Standby,
            slot: slot.map(|(k, _)| *k),
            term,
            leader_id: leader_item.as_ref().map(|i| i.holder.clone()),
            leader_addr: leader_item.as_ref().map(|i| i.addr.clone()),
            live_slots: leading.and(self.last_live.clone()),
            error: self.last_error.clone(),
            leader_until: leading.map(Held::deadline),
            slot_until: slot.map(|(_, h)| h.deadline()),
            stale_slot: self.lapsed.as_ref().map(|(slot, _)| *slot),
        }
        .at(now);
        self.view.send_if_modified(|current| {
            let changed = *current != view;
            *current = view;
            changed
        });
    }

    fn report_error(&mut self, err: &LeaseError) {
        let msg = err.to_string();
        if self.last_error.as_deref() != Some(&msg) {
            if err.is_configuration() {
                tracing::error!("{msg}");
            } else {
                tracing::warn!("{msg}");
            }
        }
        self.last_error = Some(msg);
    }

    fn clear_error(&mut self) {
        if self.last_error.take().is_some() {
            tracing::info!("DynamoDB lease table reachable again");
        }
    }

    /// Conditional releases on shutdown (SIGTERM), so successors take over at once.
    /// Every item still written as ours is released, whether its renew deadline
    /// passed or not (a lapsed slot nobody took included): the write is
    /// conditional on the version this replica wrote, so it fails harmlessly if
    /// someone else took the item meanwhile.
    async fn release_all(&mut self) {
        let slot = self.slot.take().map(|(slot, held)| (slot, held.item));
        for (slot, item) in slot.into_iter().chain(self.lapsed.take()) {
            match self.table.release(&item, &self.cfg.me).await {
                Ok(_) => tracing::info!(slot, "released slot"),
                Err(err) => tracing::info!(slot, "slot not released: {err}"),
            }
        }
        if let Some(held) = self.leader.take() {
            match self.table.release(&held.item, &self.cfg.me).await {
                Ok(_) => tracing::info!(term = held.item.term, "released leadership"),
                Err(err) => tracing::info!("leadership not released: {err}"),
            }
        }
        self.view.send_replace(CoordinationView::starting());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_are_woken_when_a_lease_deadline_passes_without_a_publication() {
        let view = Arc::new(watch::Sender::new(CoordinationView::starting()));
        let stop = CancellationToken::new();
        tokio::spawn(notify_deadlines(view.clone(), stop.clone()));
        let mut reader = view.subscribe();
        let until = Instant::now() + Duration::from_millis(150);
        view.send_replace(CoordinationView {
            slot: Some(2),
            slot_until: Some(until),
            ..CoordinationView::starting()
        });
        reader.borrow_and_update();
        assert_eq!(reader.borrow().at(Instant::now()).slot, Some(2));
        // Nothing is published again: the deadline alone wakes the reader.
        tokio::time::timeout(Duration::from_secs(2), reader.changed())
            .await
            .expect("woken at the deadline")
            .expect("open");
        assert!(Instant::now() >= until);
        let now = reader.borrow().at(Instant::now());
        assert_eq!((now.slot, now.stale_slot), (None, Some(2)));
        // The view itself is left as published: a late renewal reads as one.
        assert_eq!(reader.borrow().slot_until, Some(until));
        // Once passed, a deadline wakes nobody again.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), reader.changed())
                .await
                .is_err()
        );
        stop.cancel();
    }

    fn item(pk: &str, holder: &str, rvn: &str) -> LeaseItem {
        LeaseItem {
            pk: pk.into(),
            holder: holder.into(),
            addr: "127.0.0.1:9001".into(),
            weight: 1.0,
            rvn: rvn.into(),
            lease: Duration::from_secs(10),
            term: 3,
            released: false,
            renewed_at_ms: 0,
            incarnation: format!("i-{holder}"),
        }
    }

    fn me(id: &str) -> HolderInfo {
        HolderInfo {
            id: id.into(),
            incarnation: format!("i-{id}"),
            addr: "127.0.0.1:9002".into(),
            weight: 1.0,
            lease: LEASE,
        }
    }

    const LEASE: Duration = Duration::from_secs(10);

    #[test]
    fn shard_count_parsing() {
        assert_eq!("auto".parse(), Ok(ShardCount::Auto));
        assert_eq!(" AUTO ".parse(), Ok(ShardCount::Auto));
        assert_eq!("3".parse(), Ok(ShardCount::Fixed(3)));
        assert!("0".parse::<ShardCount>().is_err());
        assert!("many".parse::<ShardCount>().is_err());
    }

    #[test]
    fn a_live_lease_is_taken_only_after_a_full_unchanged_lease() {
        let t0 = Instant::now();
        let mut obs = Observer::default();
        let a = item("c#leader", "a", "v1");
        obs.observe(&a, t0);
        assert_eq!(
            claim(Some(&a), &obs, t0 + LEASE / 2, &me("b"), LEASE),
            Claim::Held { until: t0 + LEASE }
        );
        // The holder renews: the clock restarts from when the new version was seen.
        let a2 = item("c#leader", "a", "v2");
        obs.observe(&a2, t0 + LEASE / 2);
        assert_eq!(
            claim(Some(&a2), &obs, t0 + LEASE, &me("b"), LEASE),
            Claim::Held {
                until: t0 + LEASE / 2 + LEASE
            }
        );
        // Seeing the same version again does not restart it.
        obs.observe(&a2, t0 + LEASE);
        assert_eq!(
            claim(Some(&a2), &obs, t0 + LEASE / 2 + LEASE, &me("b"), LEASE),
            Claim::Takeable(a2.clone())
        );
    }

    #[test]
    fn missing_released_and_own_items_are_takeable_at_once() {
        let obs = Observer::default();
        let now = Instant::now();
        assert_eq!(claim(None, &obs, now, &me("b"), LEASE), Claim::Missing);
        let mut released = item("c#slot#0", "a", "v1");
        released.released = true;
        assert_eq!(
            claim(Some(&released), &obs, now, &me("b"), LEASE),
            Claim::Takeable(released.clone())
        );
        let own = item("c#slot#0", "b", "v1");
        assert_eq!(
            claim(Some(&own), &obs, now, &me("b"), LEASE),
            Claim::Takeable(own.clone())
        );
        // The same REPLICA_ID in another process is another holder.
        let mut twin = own.clone();
        twin.incarnation = "i-other".into();
        assert_eq!(
            claim(Some(&twin), &obs, now, &me("b"), LEASE),
            Claim::Held { until: now + LEASE }
        );
        // Never observed before: wait a full lease from now.
        let other = item("c#slot#0", "a", "v1");
        assert_eq!(
            claim(Some(&other), &obs, now, &me("b"), LEASE),
            Claim::Held { until: now + LEASE }
        );
    }

    #[test]
    fn the_holder_stops_a_third_of_a_lease_before_anyone_may_take_over() {
        let sent = Instant::now();
        let held = Held {
            item: item("c#leader", "a", "v1"),
            renewed_sent: sent,
        };
        assert!(held.is_valid(sent + LEASE / 2));
        assert!(!held.is_valid(sent + LEASE * 2 / 3));
        // The earliest takeover: the contender first receives the version no earlier than it was sent.
        let mut obs = Observer::default();
        obs.observe(&held.item, sent);
        let Claim::Held { until } = claim(Some(&held.item), &obs, sent, &me("b"), LEASE) else {
            panic!("held lease must not be takeable");
        };
        assert!(until >= held.deadline() + LEASE / 3);
    }

    #[test]
    fn the_view_demotes_expired_leases_when_read() {
        let now = Instant::now();
        let view = CoordinationView {
            role: Role::Leader,
            slot: Some(2),
            term: Some(7),
            leader_until: Some(now + LEASE),
            slot_until: Some(now + LEASE / 2),
            live_slots: Some(vec![]),
            ..CoordinationView::single()
        };
        assert_eq!(view.at(now).role, Role::Leader);
        let later = view.at(now + LEASE * 3 / 4);
        assert_eq!((later.role, later.slot), (Role::Leader, None));
        let after = view.at(now + LEASE);
        assert_eq!(
            (after.role, after.slot, after.live_slots),
            (Role::Standby, None, None)
        );
        assert_eq!(after.term, Some(7), "the last known term stays visible");
        assert_eq!(
            CoordinationView::single().at(now + LEASE).role,
            Role::Single
        );
    }

    #[test]
    fn a_slot_not_renewed_in_time_stays_served_as_stale() {
        let now = Instant::now();
        let view = CoordinationView {
            role: Role::Follower,
            slot: Some(1),
            term: Some(4),
            slot_until: Some(now + LEASE / 2),
            ..CoordinationView::single()
        };
        assert_eq!(view.at(now).serving_slot(), Some(1));
        let lapsed = view.at(now + LEASE);
        assert_eq!(
            (lapsed.role, lapsed.slot, lapsed.stale_slot),
            (Role::Standby, None, Some(1))
        );
        assert_eq!(lapsed.serving_slot(), Some(1));
    }

    #[test]
    fn observing_reports_a_moved_version_only() {
        let t0 = Instant::now();
        let mut obs = Observer::default();
        assert!(!obs.observe(&item("c#slot#0", "a", "v1"), t0));
        assert!(!obs.observe(&item("c#slot#0", "a", "v1"), t0));
        assert!(obs.observe(&item("c#slot#0", "a", "v2"), t0));
    }

    /// A coordinator that never calls DynamoDB (its client points nowhere).
    fn offline_coordinator() -> Coordinator {
        let conf = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .build();
        let table = LeaseTable::new(
            aws_sdk_dynamodb::Client::from_conf(conf),
            "leases".into(),
            "c".into(),
            crate::clock::WallClock::default(),
        );
        Coordinator::new(
            table,
            CoordinationConfig {
                shard_count: ShardCount::Fixed(3),
                lease: LEASE,
                heartbeat: LEASE / 5,
                create_table: false,
                me: me("b"),
                renewal_failures: Default::default(),
            },
        )
    }

    #[test]
    fn a_released_leader_item_keeps_its_term_in_the_view() {
        let mut c = offline_coordinator();
        let view = c.subscribe();
        c.last_leader = Some(item("c#leader", "a", "v1"));
        c.publish_view();
        assert_eq!(view.borrow().term, Some(3));
        assert_eq!(view.borrow().leader_id.as_deref(), Some("a"));
        // The leader stopped (SIGTERM) and released: no leader, the term stays.
        let mut released = item("c#leader", "a", "v2");
        released.released = true;
        c.last_leader = Some(released);
        c.publish_view();
        assert_eq!(view.borrow().term, Some(3));
        assert_eq!(view.borrow().leader_id, None);
        assert_eq!(view.borrow().leader_addr, None);
    }

    #[test]
    fn item_lease_duration_wins_over_the_observers() {
        let t0 = Instant::now();
        let mut obs = Observer::default();
        let mut long = item("c#leader", "a", "v1");
        long.lease = Duration::from_secs(30);
        obs.observe(&long, t0);
        assert_eq!(
            obs.expires_at(&long, LEASE),
            Some(t0 + Duration::from_secs(30))
        );
    }
}
