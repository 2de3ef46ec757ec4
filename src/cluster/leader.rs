//! What the elected leader does, and only while its lease is valid: runs the
//! discovery loop (the only replica calling SSM and Cloud Map), assigns the
//! targets to the live slots, and publishes the versioned assignment that
//! followers long-poll. Membership changes are debounced so a slot released
//! during a rolling replacement and taken by a standby moves nothing.
//!
//! The work is scoped to one term: it ends when the lease lapses or the term
//! changes (even if this replica re-took the lease itself), and the next term
//! starts afresh from the assignment it inherits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::assignment::{Assigner, Change, SlotSummary, Snapshot};
use super::mirror::Mirror;
use crate::aws::AwsClients;
use crate::coordination::{CoordinationView, LiveSlot, Role};
use crate::discovery::guard::DropGuard;
use crate::discovery::publish::DiscoverySettings;
use crate::discovery::publish::{discovery_loop, Publisher, Sink};
use crate::discovery::Discoverer;
use crate::sharding::{Params, ShardBy, Slot};
use crate::state::Shared;
use crate::targets::{Body, Target};

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub shard_by: ShardBy,
    pub params: Params,
    pub handoff_grace: Duration,
    /// How long a slot that stopped being live still counts as a member.
    pub membership_grace: Duration,
    /// How recently a mirrored assignment must have been known current for a new
    /// leader to start from it.
    pub seed_max_age: Duration,
}

/// The leader's assignment for one term, shared with the HTTP handlers that serve
/// it. It ends with its term: handlers waiting on it (long-polls) answer at once
/// instead of waiting on a term nobody publishes in any more.
pub struct LeaderHandle {
    /// The term of this assignment, readable without waiting for the assigner.
    term: u64,
    /// Held by the leader's work only: peer routes read `snapshot` and `summary`,
    /// and queue confirmations, so none of them waits for a recomputation.
    assigner: Mutex<Assigner>,
    snapshot: watch::Sender<Option<Arc<Snapshot>>>,
    summary: std::sync::RwLock<Arc<Vec<SlotSummary>>>,
    confirmations: Mutex<Vec<Confirmation>>,
    confirmed: tokio::sync::Notify,
    ended: CancellationToken,
}

/// A holder's confirmation, queued for the leader's work.
#[derive(Debug)]
struct Confirmation {
    slot: u32,
    holder: String,
    generation: u64,
}

/// Most confirmations queued between two rounds of the leader's work (a holder
/// confirms about once per change; more is somebody with the token flooding).
const MAX_QUEUED_CONFIRMATIONS: usize = 4096;

impl std::fmt::Debug for LeaderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderHandle")
            .field("term", &self.term())
            .finish()
    }
}

impl LeaderHandle {
    pub fn new(cfg: &LeaderConfig, term: u64) -> Self {
        LeaderHandle {
            term,
            assigner: Mutex::new(Assigner::new(
                cfg.shard_by,
                cfg.params,
                cfg.handoff_grace,
                term,
            )),
            snapshot: watch::Sender::new(None),
            summary: Default::default(),
            confirmations: Mutex::new(Vec::new()),
            confirmed: tokio::sync::Notify::new(),
            ended: CancellationToken::new(),
        }
    }

    /// Whether the term of this assignment is over.
    pub fn has_ended(&self) -> bool {
        self.ended.is_cancelled()
    }

    /// Completes when the term of this assignment is over.
    pub async fn ended(&self) {
        self.ended.cancelled().await
    }

    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.snapshot.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshot.subscribe()
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    /// Per slot, its shard and what its holder confirmed, as of the last change.
    pub fn summary(&self) -> Arc<Vec<SlotSummary>> {
        self.summary
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Assigner> {
        self.assigner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a change and republishes when the assignment changed. A change
    /// may re-render shards: it runs as CPU-bound work.
    fn apply(&self, f: impl FnOnce(&mut Assigner) -> Change) -> Change {
        crate::cpu_bound(|| self.apply_now(f))
    }

    fn apply_now(&self, f: impl FnOnce(&mut Assigner) -> Change) -> Change {
        let mut assigner = self.lock();
        let before = assigner.generation();
        let change = f(&mut assigner);
        *self.summary.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(assigner.summary());
        if assigner.generation() != before || self.snapshot.borrow().is_none() {
            if let Some(snap) = assigner.snapshot() {
                tracing::debug!(target: "leader_action", term = snap.term, generation = snap.generation, "leader acting");
                self.snapshot.send_replace(Some(Arc::new(snap)));
            }
            drop(assigner);
            // Shards were rendered: their transient buffers are free now.
            crate::release_free_memory();
        }
        change
    }

    /// `holder`, which the caller checked holds `slot`, has received `generation`
    /// of `term`: queued for the leader's work, which applies it at once.
    pub fn confirm(&self, slot: u32, holder: &str, term: u64, generation: u64) {
        if term != self.term() {
            return;
        }
        tracing::debug!(target: "handoff", slot, holder, term, generation, "confirmed");
        let mut queued = self.confirmations.lock().unwrap_or_else(|e| e.into_inner());
        if queued.len() < MAX_QUEUED_CONFIRMATIONS {
            queued.push(Confirmation {
                slot,
                holder: holder.to_owned(),
                generation,
            });
        }
        drop(queued);
        self.confirmed.notify_one();
    }

    /// Applies the confirmations queued since the last call.
    fn apply_confirmations(&self) {
        let queued =
            std::mem::take(&mut *self.confirmations.lock().unwrap_or_else(|e| e.into_inner()));
        for c in queued {
            self.apply(|a| a.confirm(c.slot, &c.holder, c.generation, Instant::now()));
        }
    }

    /// The assignment as it stands, for the next term to start from.
    fn inherited(&self) -> Option<Mirror> {
        let assigner = self.lock();
        let inherited = assigner.inherited()?;
        let heads = assigner
            .snapshot()?
            .heads()
            .into_iter()
            .map(|h| (h.slot, h))
            .collect();
        Some(Mirror::own(
            assigner.term(),
            assigner.generation(),
            inherited,
            heads,
        ))
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.lock().next_deadline()
    }
}

/// Slots that are live, or were within the grace.
struct Membership {
    grace: Duration,
    seen: BTreeMap<u32, (Slot, Instant)>,
}

impl Membership {
    /// Members of the inherited assignment count as seen now: a dead slot of the
    /// previous term that a standby takes over within the grace moves nothing.
    fn seed(&mut self, slots: &[Slot], now: Instant) {
        for slot in slots {
            self.seen.insert(slot.id, (*slot, now));
        }
    }

    fn update(&mut self, live: &[LiveSlot], now: Instant) -> Vec<Slot> {
        for l in live {
            self.seen.insert(
                l.slot,
                (
                    Slot {
                        id: l.slot,
                        weight: l.weight,
                    },
                    now,
                ),
            );
        }
        let grace = self.grace;
        self.seen
            .retain(|_, (_, at)| now.duration_since(*at) < grace);
        self.seen.values().map(|(s, _)| *s).collect()
    }

    /// When a slot not seen live since will drop out.
    fn next_expiry(&self, live: &[LiveSlot]) -> Option<Instant> {
        self.seen
            .iter()
            .filter(|(id, _)| !live.iter().any(|l| l.slot == **id))
            .map(|(_, (_, at))| *at + self.grace)
            .min()
    }
}

/// The term this replica leads in now, if any.
pub fn leading_term(view: &CoordinationView) -> Option<u64> {
    (view.role == Role::Leader).then_some(view.term).flatten()
}

/// Where the lease of one term stands, for the work bound to it.
enum TermLease {
    /// Held, and within its renew deadline: the view as of now.
    Valid(CoordinationView),
    /// Held as last published, but its deadline has passed on the local clock:
    /// nothing may be done in the term's name. The coordinator publishes either a
    /// renewal it made (a slow step publishes it late) or the end of the term.
    Fenced,
    /// The coordinator no longer holds the term: it lapsed, was lost, or was
    /// re-taken as a new term.
    Over,
}

fn term_lease(view: &watch::Receiver<CoordinationView>, term: u64) -> TermLease {
    let published = view.borrow();
    if published.term != Some(term) || published.leader_until.is_none() {
        return TermLease::Over;
    }
    let now = Instant::now();
    let current = published.at(now);
    match leading_term(&current) == Some(term) {
        true => TermLease::Valid(current),
        false => TermLease::Fenced,
    }
}

/// The assignment a leader of `term` may start from: the last one this replica
/// knew of an earlier term (mirrored from its leader, or its own), if that copy
/// was known to be current within `max_age`, never an older one, which could be
/// days out of date. A term in between that nobody led (an acquisition whose
/// answer was lost) does not make a current copy stale.
pub fn seed_for(term: u64, mirror: Option<Arc<Mirror>>, max_age: Duration) -> Option<Arc<Mirror>> {
    let mirror = mirror?;
    let age = mirror.age();
    if mirror.term < term && age <= max_age {
        Some(mirror)
    } else {
        tracing::info!(
            term,
            mirror_term = mirror.term,
            mirror_age_ms = age.as_millis() as u64,
            "the mirrored assignment is not known to be current: waiting for discovery"
        );
        None
    }
}

/// Runs the leader's work for `term` until that term ends (the coordinator no
/// longer holds it: the lease lapsed, was lost, or was re-taken as a new term) or
/// `cancel` fires. Past the renew deadline on the local clock the work is fenced,
/// not ended: it acts on nothing until the coordinator publishes either the
/// renewal it made or the end of the term, so one term is one run of this work
/// and its generations only grow. `targets` carries each complete discovery
/// result from the discovery loop; `seed`, the inherited assignment, is served
/// until the first one arrives. Returns `seed` if it was never started from.
pub async fn run(
    cfg: LeaderConfig,
    term: u64,
    shared: Arc<Shared>,
    mut view: watch::Receiver<CoordinationView>,
    mut targets: watch::Receiver<Option<Arc<Vec<Target>>>>,
    seed: Option<Arc<Mirror>>,
    cancel: CancellationToken,
) -> Option<Arc<Mirror>> {
    // Only a term already over is left at once: a fenced one may be renewed yet
    // (a slow step publishes late), and the caller never starts a term twice.
    if matches!(term_lease(&view, term), TermLease::Over) {
        return seed;
    }
    let handle = Arc::new(LeaderHandle::new(&cfg, term));
    shared.set_leader(Some(handle.clone()));
    tracing::info!(term, "leading: discovering and assigning");
    let mut work = TermWork {
        term,
        handle: handle.clone(),
        shared: shared.clone(),
        membership: Membership {
            grace: cfg.membership_grace,
            seen: BTreeMap::new(),
        },
        seed,
    };
    if let Some(mirror) = &work.seed {
        work.membership.seed(&mirror.slots, Instant::now());
    }
    // A result may already be waiting.
    let mut targets_pending = true;
    let mut targets_open = true;
    // When the lease of this term was last seen valid: what it leaves behind is
    // known current as of then, not as of when the work ends.
    let mut last_valid = Instant::now();
    // A confirmation from a peer route may change the assignment: the own slot's
    // shard follows it.
    let mut published = handle.subscribe();
    loop {
        // Fenced: act only while the lease of this very term is valid.
        let current = match term_lease(&view, term) {
            TermLease::Valid(current) => {
                last_valid = Instant::now();
                current
            }
            TermLease::Over => break,
            TermLease::Fenced => {
                tokio::select! {
                    changed = view.changed() => {
                        if changed.is_err() {
                            break; // the coordinator is gone
                        }
                    }
                    _ = cancel.cancelled() => break,
                }
                continue;
            }
        };
        let wake = work.round(&current, &mut targets, std::mem::take(&mut targets_pending));
        // Besides the timer, the coordinator's view wakes the work (its deadlines
        // included), and so does a discovery result, a new assignment or a
        // confirmation.
        published.borrow_and_update();
        tokio::select! {
            changed = view.changed() => {
                if changed.is_err() {
                    break; // the coordinator is gone
                }
            }
            changed = targets.changed(), if targets_open => {
                targets_pending = changed.is_ok();
                // The discovery loop ended: keep the last result, stop listening.
                targets_open = changed.is_ok();
            }
            _ = crate::clock::sleep_until(wake) => {}
            _ = published.changed() => {}
            _ = handle.confirmed.notified() => {}
            _ = cancel.cancelled() => break,
        }
    }
    // What this term leaves behind is where the next one starts, if it follows at once.
    if let Some(own) = handle.inherited() {
        own.set_current_at(last_valid);
        shared.set_mirror(Some(own));
    }
    handle.ended.cancel();
    shared.set_leader(None);
    tracing::info!(term, "no longer leading");
    work.seed
}

/// What one term's work carries from round to round.
struct TermWork {
    term: u64,
    handle: Arc<LeaderHandle>,
    shared: Arc<Shared>,
    membership: Membership,
    /// The inherited assignment, until it is started from (or a discovery result
    /// came first).
    seed: Option<Arc<Mirror>>,
}

impl TermWork {
    /// One round, while the lease of the term is valid: membership, the inherited
    /// assignment (once), a new discovery result, queued confirmations, drains
    /// that ended, the own slot. Returns when the next timed change is due.
    fn round(
        &mut self,
        current: &CoordinationView,
        targets: &mut watch::Receiver<Option<Arc<Vec<Target>>>>,
        targets_pending: bool,
    ) -> Option<Instant> {
        let now = Instant::now();
        let live = current.live_slots.clone().unwrap_or_default();
        let slots = self.membership.update(&live, now);
        let change = self.handle.apply(|a| a.set_slots(&slots));
        log_change("slots changed", &change, &self.handle, &self.shared);
        if targets.borrow().is_none() {
            self.start_from_seed(slots.len());
        }
        self.seed = None;
        let (handle, shared) = (&self.handle, &self.shared);
        if targets_pending {
            if let Some(list) = targets.borrow_and_update().clone() {
                let change = handle.apply(|a| a.set_targets(list));
                log_change("targets changed", &change, handle, shared);
            }
        }
        handle.apply_confirmations();
        handle.apply(|a| a.tick(now));
        serve_own_slot(handle, current, shared);
        [self.membership.next_expiry(&live), handle.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Starts from the inherited assignment, if there is one to start from.
    fn start_from_seed(&mut self, slots: usize) {
        let Some(mirror) = self.seed.take() else {
            return;
        };
        let Some(contents) = crate::cpu_bound(|| mirror.contents().cloned()) else {
            return;
        };
        tracing::info!(
            term = self.term,
            previous_term = mirror.term,
            previous_generation = mirror.generation,
            targets = contents.targets.len(),
            slots,
            "starting from the previous leader's assignment"
        );
        let change = self
            .handle
            .apply(|a| a.seed(contents.targets.clone(), &contents.owners));
        log_change("mirrored targets", &change, &self.handle, &self.shared);
    }
}

/// Whenever this replica becomes leader: runs discovery (fresh caches) and the
/// leader's assignment work for that one term, until the term ends. A re-taken
/// lease is a new term: the work restarts from the assignment the last one left.
/// Each term is worked once: a term is never started again, nor one older than
/// a term already worked.
pub async fn lead_when_elected(
    cfg: LeaderConfig,
    aws: AwsClients,
    discovery: DiscoverySettings,
    guard: DropGuard,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut view = shared.coordination_receiver();
    let mut last_term = 0;
    loop {
        let term = loop {
            if let Some(term) = leading_term(&shared.coordination()) {
                if term > last_term {
                    break term;
                }
            }
            tokio::select! {
                changed = view.changed() => {
                    if changed.is_err() {
                        return; // the coordinator is gone
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        };
        last_term = term;
        // Taken, not kept: while leading, this replica holds its own assignment only.
        let mirror = shared.take_mirror();
        let seed = seed_for(term, mirror.clone(), cfg.seed_max_age);
        let leading = shutdown.child_token();
        let (targets_tx, targets_rx) = watch::channel(None);
        // The guard's baseline until the first publication: what followers serve,
        // the inherited assignment, or, without one, the last mirrored copy.
        let inherited = crate::cpu_bound(|| {
            mirror
                .as_ref()
                .and_then(|m| m.contents())
                .map(|c| c.targets.clone())
        });
        drop(mirror);
        let discovering = tokio::spawn(discovery_loop(
            Discoverer::new(aws.clone(), discovery.options.clone()),
            shared.clone(),
            discovery.interval,
            leading.clone(),
            Publisher::new(Sink::Leader(targets_tx), guard.clone(), inherited),
            // The leader alone reads the events queue, for its term only.
            discovery.events.clone(),
        ));
        let unused = run(
            cfg.clone(),
            term,
            shared.clone(),
            view.clone(),
            targets_rx,
            seed,
            leading.clone(),
        )
        .await;
        // A term that left no assignment of its own (over before it worked)
        // gives back the copy it was to start from.
        if let (None, Some(copy)) = (shared.mirror(), unused) {
            shared.restore_mirror(copy);
        }
        leading.cancel();
        let _ = discovering.await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

fn log_change(what: &str, change: &Change, handle: &LeaderHandle, shared: &Shared) {
    shared.metrics.targets_moved.inc_by(change.moved as u64);
    if change.shards_changed > 0 || change.moved > 0 {
        let snap = handle.snapshot();
        tracing::info!(
            term = snap.as_ref().map(|s| s.term),
            generation = snap.as_ref().map(|s| s.generation),
            moved = change.moved,
            shards_changed = change.shards_changed,
            "{what}: new assignment"
        );
    }
}

/// The leader serves its own slot's shard directly and confirms it at once.
fn serve_own_slot(handle: &LeaderHandle, view: &CoordinationView, shared: &Shared) {
    let Some(snap) = handle.snapshot() else {
        return;
    };
    match (view.slot, view.stale_slot) {
        (Some(slot), _) => {
            if let Some(shard) = snap.shards.get(&slot) {
                // Rendered once per change of the shard, on the first call after it.
                let body = crate::cpu_bound(|| shard.body_with(shared.meta_labels).clone());
                shared.publish_shard(Some(slot), snap.term, shard.generation, body);
                // The leader's own work: applied at once, not queued.
                handle.apply(|a| {
                    a.confirm(slot, &shared.replica_id, shard.generation, Instant::now())
                });
            }
        }
        // Its slot lease lapsed: keep serving that slot's last shard.
        (None, Some(_)) => {}
        (None, None) => {
            shared.publish_shard(None, snap.term, snap.generation, Body::empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(term: u64) -> Arc<Mirror> {
        let head = super::super::protocol::ChangesHead {
            term,
            generation: 9,
            whole: true,
            slots: Vec::new(),
            shards: Vec::new(),
            frames: Vec::new(),
        };
        let whole = super::super::protocol::Frame {
            generation: 9,
            bytes: super::super::protocol::encode_frame([]),
        };
        Arc::new(Mirror::followed(None, head, vec![whole]).expect("a whole copy"))
    }

    #[test]
    fn past_its_deadline_a_term_is_fenced_until_the_coordinator_says_it_is_over() {
        let now = Instant::now();
        let leading = |term, until| CoordinationView {
            role: Role::Leader,
            term: Some(term),
            leader_until: until,
            ..CoordinationView::single()
        };
        let lease = |view: CoordinationView| term_lease(&watch::channel(view).1, 5);
        let second = Duration::from_secs(1);
        assert!(matches!(
            lease(leading(5, Some(now + second))),
            TermLease::Valid(_)
        ));
        // The deadline passed as published; the coordinator may have renewed since.
        assert!(matches!(
            lease(leading(5, Some(now - second))),
            TermLease::Fenced
        ));
        // The coordinator says the term is not held: the work ends.
        assert!(matches!(lease(leading(5, None)), TermLease::Over));
        assert!(matches!(
            lease(leading(6, Some(now + second))),
            TermLease::Over
        ));
    }

    /// A term fenced when its work starts (the coordinator's renewal is on its
    /// way) is worked once the renewal is published, not given up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_term_fenced_at_its_start_is_worked_once_renewed() {
        let leading = |until| CoordinationView {
            role: Role::Leader,
            term: Some(5),
            leader_until: Some(until),
            live_slots: Some(Vec::new()),
            ..CoordinationView::single()
        };
        let (view_tx, view) = watch::channel(leading(Instant::now() - Duration::from_millis(1)));
        let stats = crate::aws::RequestStats::default();
        let shared = Shared::new(
            "r".into(),
            "127.0.0.1:9002".into(),
            view.clone(),
            Arc::new(crate::telemetry::Metrics::new(&stats)),
            crate::targets::MetaLabels::All,
        );
        let cfg = LeaderConfig {
            shard_by: ShardBy::Target,
            params: Params::default(),
            handoff_grace: Duration::ZERO,
            membership_grace: Duration::from_secs(1),
            seed_max_age: Duration::from_secs(60),
        };
        let (_targets_tx, targets) = watch::channel(None);
        let cancel = CancellationToken::new();
        let work = tokio::spawn(run(
            cfg,
            5,
            shared.clone(),
            view,
            targets,
            None,
            cancel.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!work.is_finished(), "a fenced term is not over");
        view_tx.send_replace(leading(Instant::now() + Duration::from_secs(10)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(shared.leader().map(|h| h.term()), Some(5));
        // The coordinator says the term is over: the work ends.
        view_tx.send_replace(CoordinationView {
            leader_until: None,
            ..leading(Instant::now())
        });
        tokio::time::timeout(Duration::from_secs(2), work)
            .await
            .expect("the work ends with its term")
            .expect("no panic");
        assert!(shared.leader().is_none());
    }

    #[test]
    fn a_new_leader_seeds_only_from_a_current_copy_of_an_earlier_term() {
        let fresh = Duration::from_secs(60);
        assert!(seed_for(5, Some(mirror(4)), fresh).is_some());
        // A term in between that nobody led does not make a current copy stale.
        assert!(seed_for(7, Some(mirror(4)), fresh).is_some());
        // A copy not known current within the bound (days old, say) is not a seed.
        assert!(seed_for(5, Some(mirror(4)), Duration::ZERO).is_none());
        // Nor one of this term or a later one.
        assert!(seed_for(4, Some(mirror(4)), fresh).is_none());
        assert!(seed_for(5, None, fresh).is_none());
    }
}
