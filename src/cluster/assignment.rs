//! The leader's assignment: per live slot, the targets its shard holds, stamped
//! with the leader's term and a generation that grows with every change, and the
//! log of those changes that replicas follow (see [`super::protocol`]).
//!
//! Handoff without gaps: when a target moves from a live slot A to slot B, A
//! keeps it (it is *draining*) until every new owner has confirmed a generation
//! that contains it and `HANDOFF_GRACE` has passed since, so collectors overlap
//! briefly instead of leaving a gap. A slot that is no longer live has nothing
//! to drain. This module is a pure state machine: the leader task feeds it
//! targets, slots, confirmations and the time.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sharding::{self, IdMap, Params, ShardBy, Slot, TargetAssignment, TargetId};

/// The slots serving each target, by identity.
pub type Owners = IdMap<TargetId, Vec<u32>>;
use super::protocol::{self, Frame, Id, Record, ShardHead, WireTarget};
use crate::targets::{Body, MetaLabels, Target};

/// One slot's shard as published: which targets it holds. Its `http_sd` body is
/// rendered only when somebody needs it (the leader's own slot, a replica of an
/// earlier release), once per change of the shard.
#[derive(Debug)]
pub struct Shard {
    /// Generation at which this shard last changed.
    pub generation: u64,
    /// Of its targets, how many are draining (moved away, kept until the new
    /// owner confirmed).
    pub draining: usize,
    /// [`protocol::content_of`] its targets: an unchanged shard is not
    /// published again, and a replica checks what it rebuilt against it.
    pub content: u64,
    /// Its targets, as indices into `targets`, in order.
    members: Arc<[u32]>,
    targets: Arc<Vec<Target>>,
    /// The `http_sd` body for each [`MetaLabels`] setting, rendered when asked.
    bodies: [OnceLock<Body>; 3],
}

impl Shard {
    pub fn targets(&self) -> usize {
        self.members.len()
    }

    /// Its targets, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Target> {
        self.members.iter().map(|i| &self.targets[*i as usize])
    }

    /// The `http_sd` body with every label, rendered the first time it is asked for.
    pub fn body(&self) -> &Body {
        self.body_with(MetaLabels::All)
    }

    /// The `http_sd` body with the `__meta_cloudmap_*` labels `meta` keeps.
    pub fn body_with(&self, meta: MetaLabels) -> &Body {
        self.bodies[meta as usize].get_or_init(|| Body::render_with(self.iter(), meta))
    }

    pub fn head(&self, slot: u32) -> ShardHead {
        ShardHead {
            slot,
            generation: self.generation,
            targets: self.targets(),
            draining: self.draining,
            content: self.content,
        }
    }
}

/// What the leader publishes, immutable once made: readers (the peer routes, the
/// leader's own slot) never wait for the next computation.
#[derive(Debug)]
pub struct Snapshot {
    pub term: u64,
    pub generation: u64,
    /// The membership the shards were computed for (live slots and those in grace).
    pub slots: Vec<Slot>,
    pub shards: BTreeMap<u32, Arc<Shard>>,
    /// The changes of the latest generations, oldest first, each bringing the
    /// assignment from the generation before it to its own.
    pub log: Arc<[Frame]>,
    /// One frame of the whole assignment, made when an asker is behind the log.
    whole: OnceLock<Frame>,
}

impl Snapshot {
    pub fn heads(&self) -> Vec<ShardHead> {
        self.shards.iter().map(|(slot, s)| s.head(*slot)).collect()
    }

    /// The head line of an answer with this snapshot's frames (`whole`: one
    /// whole copy); its frame list is filled in when it is encoded.
    pub fn answer_head(&self, whole: bool) -> protocol::ChangesHead {
        protocol::ChangesHead {
            term: self.term,
            generation: self.generation,
            whole,
            slots: self.slots.clone(),
            shards: self.heads(),
            frames: Vec::new(),
        }
    }

    /// The frames an asker holding (`term`, `after`) needs: those after `after`
    /// from the log, when the log reaches back that far and is not longer than
    /// a whole copy; else one frame of the whole assignment (`true`).
    pub fn frames_after(&self, term: u64, after: u64) -> (Vec<Frame>, bool) {
        if term == self.term && after < self.generation {
            // Generations grow by one per frame: the first needed is `after + 1`.
            if let Some(i) = self.log.iter().position(|f| f.generation == after + 1) {
                let frames = &self.log[i..];
                let bytes: usize = frames.iter().map(|f| f.bytes.len()).sum();
                let whole_is_smaller = self.whole.get().is_some_and(|w| w.bytes.len() < bytes);
                if !whole_is_smaller {
                    return (frames.to_vec(), false);
                }
            }
        }
        (vec![self.whole().clone()], true)
    }

    /// Every target with the slots serving it, in one frame.
    pub fn whole(&self) -> &Frame {
        self.whole.get_or_init(|| {
            // Every shard indexes the same list (see `Assigner::render`).
            let targets = self.shards.values().next().map(|s| s.targets.clone());
            let n = targets.as_ref().map_or(0, |t| t.len());
            let mut slots_of: Vec<Vec<u32>> = vec![Vec::new(); n];
            for (slot, shard) in &self.shards {
                for i in shard.members.iter() {
                    slots_of[*i as usize].push(*slot);
                }
            }
            let records = targets
                .iter()
                .flat_map(|t| t.iter())
                .zip(slots_of)
                .filter(|(_, slots)| !slots.is_empty())
                .map(|(t, slots)| Record::Put {
                    t: WireTarget::of(t),
                    slots,
                });
            Frame {
                generation: self.generation,
                bytes: protocol::encode_frame(records),
            }
        })
    }
}

/// A slot of the assignment, as `/v1/assignment` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SlotSummary {
    pub slot: u32,
    pub targets: usize,
    pub draining: usize,
    pub generation: u64,
    /// Highest generation the slot's holder has confirmed.
    pub confirmed_generation: u64,
    /// The holder that confirmed it: a drain waits for the new holder, not the old one.
    pub confirmed_holder: Option<String>,
}

#[derive(Clone, Debug)]
struct Drain {
    from: u32,
    /// New owners that must confirm `since`.
    to: Vec<u32>,
    since: u64,
    /// Set once every new owner confirmed: the drain ends then.
    until: Option<Instant>,
}

/// An assignment as a successor inherits it (see [`Assigner::inherited`]).
#[derive(Debug)]
pub struct Inherited {
    pub targets: Arc<Vec<Target>>,
    /// The slots serving each target, draining ones included.
    pub owners: Owners,
    pub slots: Vec<Slot>,
}

/// Counts of the last change, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Change {
    /// Targets whose slots changed.
    pub moved: usize,
    /// Slots whose shard changed.
    pub shards_changed: usize,
}

pub struct Assigner {
    by: ShardBy,
    params: Params,
    grace: Duration,
    term: u64,
    generation: u64,
    slots: Vec<Slot>,
    /// Current targets, one per identity, shared with the discovery result
    /// whenever it had no two of one identity.
    targets: Arc<Vec<Target>>,
    /// The identity of each target, in the same order.
    ids: Vec<TargetId>,
    /// Slots of each target under the current assignment, in the same order.
    placed: TargetAssignment,
    /// Slots each target had in the previous term (a seed), taken as its old
    /// owners by the next computation.
    seeded: Option<Owners>,
    draining: IdMap<TargetId, Vec<Drain>>,
    /// Per member slot: which holder confirmed which generation.
    confirmed: HashMap<u32, (String, u64)>,
    shards: BTreeMap<u32, Arc<Shard>>,
    /// Whether targets were ever given: until then nothing is published.
    has_targets: bool,
    /// Each target as the last frame left it.
    served: IdMap<TargetId, Served>,
    /// The frames of the latest generations (see [`Snapshot::log`]).
    log: VecDeque<Frame>,
    log_bytes: usize,
}

impl Assigner {
    pub fn new(by: ShardBy, params: Params, grace: Duration, term: u64) -> Self {
        Assigner {
            by,
            params,
            grace,
            term,
            generation: 0,
            slots: Vec::new(),
            targets: Arc::new(Vec::new()),
            ids: Vec::new(),
            placed: TargetAssignment::default(),
            seeded: None,
            draining: IdMap::default(),
            confirmed: HashMap::new(),
            shards: BTreeMap::new(),
            has_targets: false,
            served: IdMap::default(),
            log: VecDeque::new(),
            log_bytes: 0,
        }
    }

    pub fn term(&self) -> u64 {
        self.term
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The published assignment, or `None` before the first targets.
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.has_targets.then(|| Snapshot {
            term: self.term,
            generation: self.generation,
            slots: self.slots.clone(),
            shards: self.shards.clone(),
            log: self.log.iter().cloned().collect(),
            whole: OnceLock::new(),
        })
    }

    pub fn summary(&self) -> Vec<SlotSummary> {
        self.shards
            .iter()
            .map(|(slot, shard)| SlotSummary {
                slot: *slot,
                targets: shard.targets(),
                draining: shard.draining,
                generation: shard.generation,
                confirmed_generation: self.confirmed.get(slot).map_or(0, |c| c.1),
                confirmed_holder: self.confirmed.get(slot).map(|c| c.0.clone()),
            })
            .collect()
    }

    /// The slots serving each target now, draining ones included.
    fn owners(&self) -> Owners {
        let mut owners: Owners = self
            .ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, self.placed.slots_of(i).to_vec()))
            .collect();
        for (id, drains) in &self.draining {
            let slots = owners.entry(*id).or_default();
            for d in drains {
                if !slots.contains(&d.from) {
                    slots.push(d.from);
                }
            }
        }
        owners
    }

    /// What a successor needs to go on where this assignment stands: its targets,
    /// the slots serving each (draining ones included) and its membership. `None`
    /// before the first targets.
    pub fn inherited(&self) -> Option<Inherited> {
        if !self.has_targets {
            return None;
        }
        Some(Inherited {
            targets: self.targets.clone(),
            owners: self.owners(),
            slots: self.slots.clone(),
        })
    }

    /// Starts from a previous term's assignment: its targets and the slots that
    /// served each, so that a target still being handed over goes on being served
    /// by its old slot until its new holder confirms it in this term.
    pub fn seed(&mut self, targets: Arc<Vec<Target>>, owners: &Owners) -> Change {
        let live: BTreeSet<u32> = self.slots.iter().map(|s| s.id).collect();
        self.seeded = Some(
            owners
                .iter()
                .map(|(id, slots)| {
                    let mut slots: Vec<u32> =
                        slots.iter().copied().filter(|s| live.contains(s)).collect();
                    slots.sort_unstable();
                    (*id, slots)
                })
                .collect(),
        );
        self.set_targets(targets)
    }

    /// New discovery result (sorted, as discovery gives it). Of two targets with
    /// one identity the later one is kept.
    pub fn set_targets(&mut self, list: Arc<Vec<Target>>) -> Change {
        // Shards are rendered in target order: sorted, as discovery gives them.
        let list = if list.windows(2).all(|w| w[0] <= w[1]) {
            list
        } else {
            let mut sorted = (*list).clone();
            sorted.sort();
            Arc::new(sorted)
        };
        let ids = sharding::target_ids(list.iter());
        let mut last: IdMap<TargetId, usize> =
            IdMap::with_capacity_and_hasher(ids.len(), Default::default());
        for (i, id) in ids.iter().enumerate() {
            last.insert(*id, i);
        }
        let (targets, ids) = if last.len() == ids.len() {
            (list, ids)
        } else {
            let keep: Vec<usize> = (0..ids.len()).filter(|i| last[&ids[*i]] == *i).collect();
            (
                Arc::new(keep.iter().map(|i| list[*i].clone()).collect()),
                keep.iter().map(|i| ids[*i]).collect(),
            )
        };
        self.has_targets = true;
        self.recompute(targets, ids)
    }

    /// New set of live slots (already debounced by the caller).
    pub fn set_slots(&mut self, slots: &[Slot]) -> Change {
        let mut slots = slots.to_vec();
        slots.sort_by_key(|s| s.id);
        if slots == self.slots {
            return Change::default();
        }
        self.slots = slots;
        self.confirmed
            .retain(|id, _| self.slots.iter().any(|s| s.id == *id));
        self.recompute(self.targets.clone(), self.ids.clone())
    }

    /// `holder`, the current holder of `slot` (checked by the caller, as is the
    /// term), has the slot's shard as of `generation` (from a long-poll answer, or
    /// from a mirrored copy of the whole assignment of that generation). Ignored
    /// for a slot outside the membership or a generation not published yet, so a
    /// confirmation can neither end a handoff early nor grow the state.
    pub fn confirm(&mut self, slot: u32, holder: &str, generation: u64, now: Instant) -> Change {
        if !self.shards.contains_key(&slot) || generation > self.generation {
            return Change::default();
        }
        let entry = self
            .confirmed
            .entry(slot)
            .or_insert_with(|| (holder.to_owned(), 0));
        if entry.0 != holder {
            *entry = (holder.to_owned(), 0);
        }
        if generation <= entry.1 {
            return Change::default();
        }
        entry.1 = generation;
        let grace = self.grace;
        let confirmed = &self.confirmed;
        let mut started = false;
        for drains in self.draining.values_mut() {
            for d in drains.iter_mut().filter(|d| d.until.is_none()) {
                let all =
                    d.to.iter()
                        .all(|to| confirmed.get(to).is_some_and(|c| c.1 >= d.since));
                if all {
                    d.until = Some(now + grace);
                    started = true;
                }
            }
        }
        // A zero grace ends drains at once.
        if started && grace.is_zero() {
            return self.tick(now);
        }
        Change::default()
    }

    /// Ends drains whose grace has passed.
    pub fn tick(&mut self, now: Instant) -> Change {
        let mut ended = false;
        for drains in self.draining.values_mut() {
            let before = drains.len();
            drains.retain(|d| d.until.is_none_or(|u| u > now));
            ended |= drains.len() != before;
        }
        self.draining.retain(|_, d| !d.is_empty());
        if ended {
            self.render()
        } else {
            Change::default()
        }
    }

    /// When the next drain ends, if any is counting down.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.draining
            .values()
            .flatten()
            .filter_map(|d| d.until)
            .min()
    }

    /// Places `targets` (identities `ids`) on the slots and starts the handoffs of
    /// those that moved.
    fn recompute(&mut self, targets: Arc<Vec<Target>>, ids: Vec<TargetId>) -> Change {
        let placed = sharding::assign_targets(targets.iter(), &self.slots, self.by, &self.params);
        let live: BTreeSet<u32> = self.slots.iter().map(|s| s.id).collect();
        // Old owners: the seed's, else the previous computation's (looked up by
        // position, so that nothing per target is allocated).
        let seeded = self.seeded.take();
        let before: IdMap<TargetId, usize> = match &seeded {
            Some(_) => IdMap::default(),
            None => self
                .ids
                .iter()
                .enumerate()
                .map(|(i, id)| (*id, i))
                .collect(),
        };
        let old_owners = |id: &TargetId| -> Option<&[u32]> {
            match &seeded {
                Some(seeded) => seeded.get(id).map(Vec::as_slice),
                None => before.get(id).map(|i| self.placed.slots_of(*i)),
            }
        };
        let mut moved = 0;
        let mut drains: Vec<(TargetId, Drain)> = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            let new = placed.slots_of(i);
            let Some(old) = old_owners(id) else {
                continue;
            };
            let same = old.len() == new.len() && old.iter().all(|s| new.contains(s));
            if same {
                continue;
            }
            moved += 1;
            // Back to slots that never stopped serving it (it was draining from
            // them): nobody has to wait for anybody, the slots it leaves drop it.
            let draining_from = |s: &u32| {
                self.draining
                    .get(id)
                    .is_some_and(|ds| ds.iter().any(|d| d.from == *s))
            };
            let mut added = new.iter().filter(|s| !old.contains(s)).peekable();
            let already_served = added.peek().is_some() && added.all(draining_from);
            if already_served {
                continue;
            }
            // Every new owner confirms it in this term (one that had it already
            // confirms at once).
            for from in old
                .iter()
                .copied()
                .filter(|s| !new.contains(s) && live.contains(s))
            {
                drains.push((
                    *id,
                    Drain {
                        from,
                        to: new.to_vec(),
                        since: self.generation + 1,
                        until: None,
                    },
                ));
            }
        }
        drop(before);
        drop(seeded);
        for (id, drain) in drains {
            self.draining.entry(id).or_default().push(drain);
        }
        // Drains of targets that are gone, back home, or from slots no longer live end now.
        let index: IdMap<TargetId, usize> = match self.draining.is_empty() {
            true => IdMap::default(),
            false => ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
        };
        self.draining.retain(|id, drains| {
            let current = index.get(id).map(|i| placed.slots_of(*i));
            drains.retain(|d| {
                current.is_some_and(|slots| !slots.contains(&d.from)) && live.contains(&d.from)
            });
            !drains.is_empty()
        });
        self.targets = targets;
        self.ids = ids;
        self.placed = placed;
        let mut change = self.render();
        change.moved = moved;
        change
    }

    /// Renders every live slot's shard whose targets changed; bumps the generation
    /// if any did.
    fn render(&mut self) -> Change {
        let draining: Owners = self
            .draining
            .iter()
            .map(|(id, ds)| (*id, ds.iter().map(|d| d.from).collect()))
            .collect();
        // Each slot's targets, in target order: (index, draining from this slot).
        let mut per_slot: BTreeMap<u32, Vec<(usize, bool)>> =
            self.slots.iter().map(|s| (s.id, Vec::new())).collect();
        for (i, id) in self.ids.iter().enumerate() {
            for slot in self.placed.slots_of(i) {
                if let Some(list) = per_slot.get_mut(slot) {
                    list.push((i, false));
                }
            }
            for slot in draining.get(id).into_iter().flatten() {
                if let Some(list) = per_slot.get_mut(slot) {
                    if list.last().map(|(last, _)| *last) != Some(i) {
                        list.push((i, true));
                    }
                }
            }
        }
        let next = self.generation + 1;
        let mut changed = 0;
        let mut shards = BTreeMap::new();
        for (slot, list) in &per_slot {
            let content = protocol::content_of(list.iter().map(|(i, _)| &self.targets[*i]));
            let draining = list.iter().filter(|(_, d)| *d).count();
            let members: Arc<[u32]> = list.iter().map(|(i, _)| *i as u32).collect();
            let old = self
                .shards
                .get(slot)
                .filter(|old| old.content == content && old.targets() == list.len());
            if old.is_none() {
                changed += 1;
            }
            shards.insert(
                *slot,
                Arc::new(Shard {
                    generation: old.map_or(next, |o| o.generation),
                    draining,
                    content,
                    members,
                    targets: self.targets.clone(),
                    // Unchanged: what was rendered for it still holds.
                    bodies: old.map(|o| o.bodies.clone()).unwrap_or_default(),
                }),
            );
        }
        let removed = self.shards.keys().any(|k| !shards.contains_key(k));
        self.shards = shards;
        if changed > 0 || removed {
            self.generation = next;
            let frame = self.changes_since_last(&per_slot);
            self.log_bytes += frame.bytes.len();
            self.log.push_back(frame);
            while self.log.len() > 1
                && (self.log.len() > LOG_MAX_FRAMES || self.log_bytes > LOG_MAX_BYTES)
            {
                if let Some(old) = self.log.pop_front() {
                    self.log_bytes -= old.bytes.len();
                }
            }
        }
        Change {
            moved: 0,
            shards_changed: changed,
        }
    }

    /// The frame of the generation just made: each target new or changed since the
    /// last one, moved between slots, or gone (see [`Record`]).
    fn changes_since_last(&mut self, per_slot: &BTreeMap<u32, Vec<(usize, bool)>>) -> Frame {
        // The slots of each target: the first inline, any others aside (replicas,
        // drains), so a million targets cost no allocation each.
        let mut first = vec![u32::MAX; self.targets.len()];
        let mut more: HashMap<usize, Vec<u32>> = HashMap::new();
        for (slot, list) in per_slot {
            for (i, _) in list {
                if first[*i] == u32::MAX {
                    first[*i] = *slot;
                } else {
                    more.entry(*i).or_default().push(*slot);
                }
            }
        }
        let slots_of = |i: usize| match more.get(&i) {
            None => Slots::One(first[i]),
            Some(rest) => Slots::Many(
                std::iter::once(first[i])
                    .chain(rest.iter().copied())
                    .collect(),
            ),
        };
        let mut served: IdMap<TargetId, Served> =
            IdMap::with_capacity_and_hasher(self.served.len(), Default::default());
        let mut changes = Vec::new();
        for (i, id) in self.ids.iter().enumerate() {
            if first[i] == u32::MAX {
                continue;
            }
            let now = Served {
                content: self.targets[i].content_hash(),
                slots: slots_of(i),
            };
            // A slot that gains a target gets it whole: its holder keeps only the
            // targets of its own slot.
            match self.served.remove(id) {
                Some(was) if was == now => {}
                Some(was) if was.content == now.content && now.slots.within(&was.slots) => {
                    changes.push(Delta::Move(*id, now.slots.to_vec()))
                }
                _ => changes.push(Delta::Put(i, now.slots.to_vec())),
            }
            served.insert(*id, now);
        }
        changes.extend(self.served.keys().map(|id| Delta::Gone(*id)));
        self.served = served;
        let targets = &self.targets;
        let records = changes.into_iter().map(|d| match d {
            Delta::Put(i, slots) => Record::Put {
                t: WireTarget::of(&targets[i]),
                slots,
            },
            Delta::Move(id, slots) => Record::Move { id: Id(id), slots },
            Delta::Gone(id) => Record::Gone { id: Id(id) },
        });
        Frame {
            generation: self.generation,
            bytes: protocol::encode_frame(records),
        }
    }
}

/// Most frames the leader keeps, and most bytes: a replica further behind gets a
/// whole copy.
pub const LOG_MAX_FRAMES: usize = 1024;
pub const LOG_MAX_BYTES: usize = 32 << 20;

/// The slots serving a target.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Slots {
    One(u32),
    Many(Box<[u32]>),
}

impl Slots {
    fn as_slice(&self) -> &[u32] {
        match self {
            Slots::One(s) => std::slice::from_ref(s),
            Slots::Many(s) => s,
        }
    }

    /// Whether every slot of these is one of `other`'s.
    fn within(&self, other: &Slots) -> bool {
        self.as_slice().iter().all(|s| other.as_slice().contains(s))
    }

    fn to_vec(&self) -> Vec<u32> {
        match self {
            Slots::One(s) => vec![*s],
            Slots::Many(s) => s.to_vec(),
        }
    }
}

/// What the last frame left a target as: its content and slots.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Served {
    content: u64,
    slots: Slots,
}

enum Delta {
    Put(usize, Vec<u32>),
    Move(TargetId, Vec<u32>),
    Gone(TargetId),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::MetricsSource;

    fn target(i: usize) -> Target {
        Target::new(
            "ns",
            "svc",
            &format!("t{i}"),
            MetricsSource::App,
            &format!("10.0.{}.{}:3000", i / 250, i % 250),
            Default::default(),
        )
    }

    fn slots(ids: &[u32]) -> Vec<Slot> {
        ids.iter().map(|&id| Slot { id, weight: 1.0 }).collect()
    }

    fn addresses(shard: &Shard) -> BTreeSet<String> {
        let groups: Vec<serde_json::Value> =
            serde_json::from_slice(&shard.body().json().unwrap()).unwrap();
        groups
            .iter()
            .map(|g| g["targets"][0].as_str().unwrap().to_owned())
            .collect()
    }

    fn union(a: &Assigner) -> BTreeSet<String> {
        a.snapshot()
            .unwrap()
            .shards
            .values()
            .flat_map(|s| addresses(s))
            .collect()
    }

    const GRACE: Duration = Duration::from_secs(10);

    #[test]
    fn nothing_published_before_targets() {
        let mut a = Assigner::new(ShardBy::Target, Params::default(), GRACE, 1);
        a.set_slots(&slots(&[0, 1]));
        assert!(a.snapshot().is_none());
        a.set_targets(Arc::new(Vec::new()));
        let snap = a.snapshot().unwrap();
        assert_eq!(snap.shards.len(), 2);
        assert!(snap
            .shards
            .values()
            .all(|s| s.body().json().unwrap() == b"[]"));
    }

    #[test]
    fn a_moved_target_stays_with_its_old_slot_until_confirmed_plus_grace() {
        let t0 = Instant::now();
        let list: Vec<Target> = (0..300).map(target).collect();
        let mut a = Assigner::new(ShardBy::Target, Params::default(), GRACE, 1);
        a.set_slots(&slots(&[0, 1, 2]));
        a.set_targets(Arc::new(list.clone()));
        let before = a.snapshot().unwrap();
        let g1 = before.generation;

        // Scale out: slot 3 joins; about a quarter of the targets move to it.
        let change = a.set_slots(&slots(&[0, 1, 2, 3]));
        assert!(change.moved > 40 && change.moved < 110, "{change:?}");
        let snap = a.snapshot().unwrap();
        assert!(snap.generation > g1);
        let new_shard = addresses(&snap.shards[&3]);
        assert_eq!(new_shard.len(), change.moved);
        // The old owners still serve what moved: every target is served, the movers twice.
        for slot in 0..3 {
            let old = addresses(&before.shards[&slot]);
            assert!(
                old.is_subset(&addresses(&snap.shards[&slot])),
                "slot {slot} dropped a target early"
            );
        }
        let total: usize = snap.shards.values().map(|s| s.targets()).sum();
        assert_eq!(total, 300 + change.moved);

        // Slot 3 confirms; the grace starts; before it ends nothing changes.
        // Confirmations for a slot outside the membership, or of a generation not
        // published yet, change nothing.
        a.confirm(9, "x", 1, t0);
        a.confirm(3, "r3", u64::MAX, t0);
        assert_eq!(a.next_deadline(), None);
        assert_eq!(a.summary().len(), 4);
        a.confirm(
            3,
            "r3",
            snap.shards[&3].generation,
            t0 + Duration::from_secs(1),
        );
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(11)));
        assert_eq!(a.tick(t0 + Duration::from_secs(5)), Change::default());
        let change = a.tick(t0 + Duration::from_secs(11));
        assert_eq!(change.shards_changed, 3);
        let after = a.snapshot().unwrap();
        let total: usize = after.shards.values().map(|s| s.targets()).sum();
        assert_eq!(total, 300, "no target served twice after the grace");
        assert_eq!(union(&a).len(), 300);
        assert!(after.shards.values().all(|s| s.draining == 0));
    }

    #[test]
    fn a_lost_slot_has_nothing_to_drain() {
        let list: Vec<Target> = (0..100).map(target).collect();
        let mut a = Assigner::new(ShardBy::Target, Params::default(), GRACE, 1);
        a.set_slots(&slots(&[0, 1, 2]));
        a.set_targets(Arc::new(list.clone()));
        a.set_slots(&slots(&[0, 2]));
        let snap = a.snapshot().unwrap();
        assert_eq!(snap.shards.len(), 2);
        let total: usize = snap.shards.values().map(|s| s.targets()).sum();
        assert_eq!(total, 100);
        assert_eq!(union(&a).len(), 100);
    }

    #[test]
    fn zero_grace_ends_the_drain_on_confirmation() {
        let t0 = Instant::now();
        let list: Vec<Target> = (0..100).map(target).collect();
        let mut a = Assigner::new(ShardBy::Target, Params::default(), Duration::ZERO, 1);
        a.set_slots(&slots(&[0, 1]));
        a.set_targets(Arc::new(list.clone()));
        a.set_slots(&slots(&[0, 1, 2]));
        let g = a.snapshot().unwrap().shards[&2].generation;
        let change = a.confirm(2, "r2", g, t0);
        assert!(change.shards_changed > 0);
        let total: usize = a
            .snapshot()
            .unwrap()
            .shards
            .values()
            .map(|s| s.targets())
            .sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn a_new_term_goes_on_with_the_handoffs_of_the_previous_one() {
        let t0 = Instant::now();
        let list: Vec<Target> = (0..300).map(target).collect();
        let mut old = Assigner::new(ShardBy::Target, Params::default(), GRACE, 1);
        old.set_slots(&slots(&[0, 1, 2]));
        old.set_targets(Arc::new(list.clone()));
        let change = old.set_slots(&slots(&[0, 1, 2, 3]));
        assert!(change.moved > 0);
        let before = old.snapshot().unwrap();
        // The leader dies with the moved targets still draining.
        let inherited = old.inherited().unwrap();
        let mut new = Assigner::new(ShardBy::Target, Params::default(), GRACE, 2);
        new.set_slots(&inherited.slots);
        new.seed(inherited.targets, &inherited.owners);
        let seeded = new.snapshot().unwrap();
        for slot in 0..4 {
            assert_eq!(
                addresses(&seeded.shards[&slot]),
                addresses(&before.shards[&slot]),
                "slot {slot} serves what it served in the previous term"
            );
        }
        // Only a confirmation in the new term, plus the grace, ends the handoff.
        let g = seeded.shards[&3].generation;
        new.confirm(3, "r3", g, t0);
        new.tick(t0 + GRACE + Duration::from_secs(1));
        let total: usize = new
            .snapshot()
            .unwrap()
            .shards
            .values()
            .map(|s| s.targets())
            .sum();
        assert_eq!(total, 300);
    }

    #[test]
    fn a_target_moved_back_to_a_slot_still_serving_it_is_dropped_at_once() {
        // Bounded load with few targets: one fewer lowers the cap, and a target at
        // the cut moves to its next slot; one more moves it back, while its first
        // slot still serves it (draining). It is then served once, at once.
        let list: Vec<Target> = (0..20).map(target).collect();
        let mut found = false;
        for k in 0..list.len() {
            let mut a = Assigner::new(ShardBy::Target, Params::default(), GRACE, 1);
            a.set_slots(&slots(&[0, 1, 2]));
            a.set_targets(Arc::new(list.clone()));
            let fewer: Vec<Target> = list.iter().filter(|t| **t != list[k]).cloned().collect();
            a.set_targets(Arc::new(fewer.clone()));
            if a.draining.is_empty() {
                continue;
            }
            found = true;
            a.set_targets(Arc::new(list.clone()));
            let total: usize = a
                .snapshot()
                .unwrap()
                .shards
                .values()
                .map(|s| s.targets())
                .sum();
            assert_eq!(
                total, 20,
                "removing and restoring target {k}: served once each"
            );
            assert!(a.draining.is_empty(), "{:?}", a.draining);
        }
        assert!(found, "no removal moved a target between live slots");
    }

    #[test]
    fn unchanged_input_keeps_the_generation() {
        let list: Vec<Target> = (0..50).map(target).collect();
        let mut a = Assigner::new(ShardBy::Target, Params::default(), GRACE, 1);
        a.set_slots(&slots(&[0, 1]));
        a.set_targets(Arc::new(list.clone()));
        let g = a.generation();
        let mut reversed = list.clone();
        reversed.reverse();
        assert_eq!(a.set_targets(Arc::new(reversed.clone())), Change::default());
        assert_eq!(a.generation(), g);
        // A new target changes one shard only.
        let mut more = list.clone();
        more.push(target(999));
        let change = a.set_targets(Arc::new(more.clone()));
        assert_eq!((change.moved, change.shards_changed), (0, 1));
        assert_eq!(a.generation(), g + 1);
    }
}
