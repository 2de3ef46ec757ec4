//! The leader's published assignment: per live slot, the rendered `http_sd`
//! shard it serves, stamped with the leader's term and a generation that grows
//! with every change.
//!
//! Handoff without gaps: when a target moves from a live slot A to slot B, A
//! keeps it (it is *draining*) until every new owner has confirmed a generation
//! that contains it and `HANDOFF_GRACE` has passed since, so collectors overlap
//! briefly instead of leaving a gap. A slot that is no longer live has nothing
//! to drain. This module is a pure state machine: the leader task feeds it
//! targets, slots, confirmations and the time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;

use crate::sharding::{self, IdMap, Params, ShardBy, Slot, TargetAssignment, TargetId};

/// The slots serving each target, by identity.
pub type Owners = IdMap<TargetId, Vec<u32>>;
use crate::targets::{Body, Target};

/// One slot's shard as published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Generation at which this shard last changed.
    pub generation: u64,
    pub body: Body,
    /// Of its targets, how many are draining (moved away, kept until the new
    /// owner confirmed).
    pub draining: usize,
    /// A hash of its targets (see [`Target::content_hash`]): an unchanged shard is
    /// not rendered again.
    content: u64,
}

impl Shard {
    pub fn targets(&self) -> usize {
        self.body.targets()
    }
}

/// What the leader serves to followers.
#[derive(Debug)]
pub struct Snapshot {
    pub term: u64,
    pub generation: u64,
    /// The membership the shards were computed for (live slots and those in grace).
    pub slots: Vec<Slot>,
    pub shards: BTreeMap<u32, Arc<Shard>>,
    /// The head of [`Snapshot::encode`], made once however many replicas mirror it.
    head: OnceLock<Bytes>,
}

/// The head of an encoded snapshot: everything but the shards' bytes.
#[derive(Debug, Serialize, serde::Deserialize)]
struct SnapshotHead {
    term: u64,
    generation: u64,
    #[serde(default)]
    slots: Vec<Slot>,
    shards: Vec<ShardHead>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct ShardHead {
    slot: u32,
    targets: usize,
    etag: String,
    /// Length of its gzip bytes in the tail.
    bytes: usize,
    /// XXH3 of those bytes, checked on receipt (a cut or garbled transfer is
    /// refused at once, not when the copy is needed).
    hash: String,
}

fn bytes_hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Why an encoded snapshot was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no head line")]
    NoHead,
    #[error("bad head: {0}")]
    Head(#[from] serde_json::Error),
    #[error("the shards' bytes do not add up to what the head says")]
    Length,
    #[error("the bytes of slot {0}'s shard are not those sent")]
    Garbled(u32),
    #[error("a shard is not an http_sd document: {0}")]
    Shard(#[from] crate::targets::BodyError),
}

/// The snapshot document of earlier releases, JSON throughout: `{"term",
/// "generation", "slots", "shards": {"<slot>": [http_sd groups]}}`. Served to,
/// and read from, peers that do not ask for [`SNAPSHOT_CONTENT_TYPE`], so that a
/// rolling upgrade mixes releases without a gap.
#[derive(Debug, serde::Deserialize)]
struct LegacyDoc {
    term: u64,
    generation: u64,
    #[serde(default)]
    slots: Vec<Slot>,
    shards: BTreeMap<u32, Box<serde_json::value::RawValue>>,
}

/// The content type of an encoded snapshot (see [`Snapshot::encode`]); a peer
/// that does not ask for it gets the JSON document of earlier releases.
pub const SNAPSHOT_CONTENT_TYPE: &str = "application/vnd.shard-sd.snapshot";

/// A snapshot as a replica mirrors it: the leader's shards as it compressed them.
#[derive(Debug)]
pub struct SnapshotDoc {
    pub term: u64,
    pub generation: u64,
    pub slots: Vec<Slot>,
    pub shards: BTreeMap<u32, Body>,
}

impl Snapshot {
    /// The whole assignment for a mirror: one JSON line (term, generation,
    /// membership, and per shard its slot, targets, ETag, length and hash), then
    /// each shard's gzip bytes as served. Nothing is rendered, compressed or
    /// copied again: the chunks are the shards' own bytes.
    pub fn encode(&self) -> Vec<Bytes> {
        let head = self
            .head
            .get_or_init(|| {
                let head = SnapshotHead {
                    term: self.term,
                    generation: self.generation,
                    slots: self.slots.clone(),
                    shards: self
                        .shards
                        .iter()
                        .map(|(slot, shard)| ShardHead {
                            slot: *slot,
                            targets: shard.body.targets(),
                            etag: shard.body.etag().to_owned(),
                            bytes: shard.body.gzip().len(),
                            hash: bytes_hash(shard.body.gzip()),
                        })
                        .collect(),
                };
                // Serialising plain structs into a Vec cannot fail.
                let mut out = serde_json::to_vec(&head).unwrap_or_default();
                out.push(b'\n');
                Bytes::from(out)
            })
            .clone();
        std::iter::once(head)
            .chain(self.shards.values().map(|s| s.body.gzip().clone()))
            .collect()
    }

    /// The JSON document of earlier releases (see [`LegacyDoc`]): each shard
    /// inflated for it.
    pub fn legacy_json(&self) -> Result<Vec<u8>, crate::targets::BodyError> {
        let slots = serde_json::to_string(&self.slots).unwrap_or_else(|_| "[]".into());
        let mut out = format!(
            "{{\"term\":{},\"generation\":{},\"slots\":{slots},\"shards\":{{",
            self.term, self.generation
        )
        .into_bytes();
        for (i, (slot, shard)) in self.shards.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(format!("\"{slot}\":").as_bytes());
            out.extend_from_slice(&shard.body.json()?);
        }
        out.extend_from_slice(b"}}");
        Ok(out)
    }

    /// Reads the JSON document of earlier releases, checking each shard.
    pub fn decode_legacy(bytes: &[u8]) -> Result<SnapshotDoc, SnapshotError> {
        let doc: LegacyDoc = serde_json::from_slice(bytes)?;
        let mut shards = BTreeMap::new();
        for (slot, raw) in doc.shards {
            shards.insert(slot, Body::from_json_checked(raw.get().as_bytes())?);
        }
        Ok(SnapshotDoc {
            term: doc.term,
            generation: doc.generation,
            slots: doc.slots,
            shards,
        })
    }

    /// Reads [`Snapshot::encode`]'s bytes. The shards are taken as the leader
    /// rendered them; each is checked when it is used (see [`Body::checked`]).
    pub fn decode(bytes: &Bytes) -> Result<SnapshotDoc, SnapshotError> {
        let newline = bytes
            .iter()
            .position(|b| *b == b'\n')
            .ok_or(SnapshotError::NoHead)?;
        let head: SnapshotHead = serde_json::from_slice(&bytes[..newline])?;
        let mut at = newline + 1;
        let mut shards = BTreeMap::new();
        for shard in head.shards {
            let end = at.checked_add(shard.bytes).ok_or(SnapshotError::Length)?;
            if end > bytes.len() {
                return Err(SnapshotError::Length);
            }
            let gzip = &bytes[at..end];
            if bytes_hash(gzip) != shard.hash {
                return Err(SnapshotError::Garbled(shard.slot));
            }
            // A copy of its own: a shard served from the mirror does not keep the
            // whole received buffer alive.
            shards.insert(
                shard.slot,
                Body::unchecked(Bytes::copy_from_slice(gzip), shard.etag, shard.targets),
            );
            at = end;
        }
        if at != bytes.len() {
            return Err(SnapshotError::Length);
        }
        Ok(SnapshotDoc {
            term: head.term,
            generation: head.generation,
            slots: head.slots,
            shards,
        })
    }
}

/// The leader's assignment as `/v1/assignment` serves it: per slot, its holder
/// (as the leader sees it) and what that holder confirmed.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct AssignmentDoc {
    pub term: Option<u64>,
    pub generation: Option<u64>,
    pub slots: Vec<AssignedSlot>,
}

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct AssignedSlot {
    pub slot: u32,
    pub holder: Option<String>,
    pub addr: Option<String>,
    pub targets: usize,
    pub draining: usize,
    pub generation: u64,
    pub confirmed_generation: u64,
    pub confirmed_holder: Option<String>,
}

impl AssignmentDoc {
    /// Whether the targets of `slot`, which `me` released, are served by someone
    /// else now: a new holder confirmed the slot's current shard, or the slot left
    /// the assignment (no standby took it) and every remaining slot's holder
    /// confirmed its current shard, the released targets included.
    pub fn handed_over(&self, slot: u32, me: &str) -> bool {
        match self.slots.iter().find(|s| s.slot == slot) {
            Some(assigned) => assigned.handed_over_from(me),
            None => {
                self.generation.is_some()
                    && !self.slots.is_empty()
                    && self.slots.iter().all(|s| {
                        s.holder.is_some()
                            && s.confirmed_holder == s.holder
                            && s.confirmed_generation >= s.generation
                    })
            }
        }
    }
}

impl AssignedSlot {
    /// Whether a holder other than `me` holds this slot and has confirmed its
    /// current shard: a stopping holder's targets are served by its successor.
    pub fn handed_over_from(&self, me: &str) -> bool {
        let holder = self.holder.as_deref().filter(|h| *h != me);
        holder.is_some()
            && self.confirmed_holder.as_deref() == holder
            && self.confirmed_generation >= self.generation
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
            head: OnceLock::new(),
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
        for (slot, list) in per_slot {
            let mut hash = xxhash_rust::xxh3::Xxh3::new();
            for (i, _) in &list {
                hash.update(&self.targets[*i].content_hash().to_le_bytes());
            }
            let content = hash.digest();
            let draining = list.iter().filter(|(_, d)| *d).count();
            let shard = match self.shards.get(&slot) {
                Some(old) if old.content == content && old.body.targets() == list.len() => {
                    if old.draining == draining {
                        old.clone()
                    } else {
                        Arc::new(Shard {
                            draining,
                            ..(**old).clone()
                        })
                    }
                }
                _ => {
                    changed += 1;
                    Arc::new(Shard {
                        generation: next,
                        body: Body::render(list.iter().map(|(i, _)| &self.targets[*i])),
                        draining,
                        content,
                    })
                }
            };
            shards.insert(slot, shard);
        }
        let removed = self.shards.keys().any(|k| !shards.contains_key(k));
        if changed > 0 || removed {
            self.generation = next;
        }
        self.shards = shards;
        Change {
            moved: 0,
            shards_changed: changed,
        }
    }
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
            serde_json::from_slice(&shard.body.json().unwrap()).unwrap();
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
            .all(|s| s.body.json().unwrap() == b"[]"));
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
    fn a_released_slot_is_handed_over_only_once_someone_else_confirmed_its_targets() {
        let slot =
            |slot, holder: Option<&str>, generation, confirmed: Option<(&str, u64)>| AssignedSlot {
                slot,
                holder: holder.map(str::to_owned),
                addr: None,
                targets: 1,
                draining: 0,
                generation,
                confirmed_generation: confirmed.map_or(0, |c| c.1),
                confirmed_holder: confirmed.map(|c| c.0.to_owned()),
            };
        let doc = |slots| AssignmentDoc {
            term: Some(2),
            generation: Some(9),
            slots,
        };
        // Still confirmed by the stopping holder only, or taken but not confirmed.
        assert!(!doc(vec![slot(1, Some("me"), 5, Some(("me", 5)))]).handed_over(1, "me"));
        assert!(!doc(vec![slot(1, Some("new"), 5, Some(("me", 5)))]).handed_over(1, "me"));
        assert!(!doc(vec![slot(1, Some("new"), 5, Some(("new", 4)))]).handed_over(1, "me"));
        assert!(doc(vec![slot(1, Some("new"), 5, Some(("new", 5)))]).handed_over(1, "me"));
        // The slot left the assignment: every other slot must have confirmed.
        let others = vec![
            slot(0, Some("a"), 9, Some(("a", 9))),
            slot(2, Some("b"), 8, Some(("b", 7))),
        ];
        assert!(!doc(others.clone()).handed_over(1, "me"));
        let mut confirmed = others;
        confirmed[1].confirmed_generation = 8;
        assert!(doc(confirmed).handed_over(1, "me"));
        let empty = AssignmentDoc {
            term: None,
            generation: None,
            slots: vec![],
        };
        assert!(
            !empty.handed_over(1, "me"),
            "no assignment yet is no handover"
        );
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
    fn an_encoded_snapshot_reads_back_as_the_same_shards() {
        let list: Vec<Target> = (0..40).map(target).collect();
        let mut a = Assigner::new(ShardBy::Target, Params::default(), GRACE, 7);
        a.set_slots(&slots(&[0, 1, 2]));
        a.set_targets(Arc::new(list));
        let snap = a.snapshot().unwrap();
        let bytes = Bytes::from(snap.encode().concat());
        let doc = Snapshot::decode(&bytes).expect("decodes");
        assert_eq!((doc.term, doc.generation), (7, snap.generation));
        assert_eq!(doc.slots, snap.slots);
        for (slot, shard) in &snap.shards {
            assert_eq!(doc.shards[slot].checked().expect("checks"), shard.body);
        }
        // Cut short, or with a head that does not add up: refused.
        assert!(Snapshot::decode(&bytes.slice(..bytes.len() - 1)).is_err());
        assert!(Snapshot::decode(&Bytes::from_static(b"no head")).is_err());
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(Snapshot::decode(&Bytes::from(longer)).is_err());
        let mut garbled = bytes.to_vec();
        let last = garbled.len() - 3;
        garbled[last] ^= 0xff;
        assert!(matches!(
            Snapshot::decode(&Bytes::from(garbled)),
            Err(SnapshotError::Garbled(_))
        ));
        // The JSON document of earlier releases, both ways.
        let legacy =
            Snapshot::decode_legacy(&snap.legacy_json().expect("inflates")).expect("legacy");
        assert_eq!((legacy.term, legacy.generation), (7, snap.generation));
        for (slot, shard) in &snap.shards {
            assert_eq!(legacy.shards[slot], shard.body);
        }
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
