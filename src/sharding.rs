//! The sharding engine: which slots serve which targets. Pure and deterministic,
//! no I/O, so its properties (minimal movement, bounded load, weights,
//! replication) are proven by property tests and measured by benchmarks.
//!
//! Rendezvous (highest random weight) hashing on the `rendezvous_hash` crate,
//! with a pinned hash: a key's hash is XXH3-64 of its bytes, a slot's is XXH3-64
//! of its id's little-endian bytes, and the score of a (key, slot) pair is
//! SplitMix64 of their XOR. Nothing depends on std's `DefaultHasher`, whose
//! output may change between Rust releases: a leader built by one release
//! agrees with its successor built by another. Golden vectors pin the output.
//!
//! Slots of equal weight are ranked by the integer score; with unequal weights
//! the crate's logarithmic method is used (score `ln(h / u64::MAX) / weight`),
//! so a slot of weight 2 gets about twice the keys. Ties go to the higher slot
//! id, as in the crate.
//!
//! Bounded load (`BALANCE_TOLERANCE` ε > 0): keys are placed one by one, largest
//! first and then in key-hash order, each on its highest-ranked slots that still
//! have room under `ceil((1 + ε) × fair share)`. [`assign`] computes each key's
//! scores in one pass instead of sorting every key's full ranking;
//! [`assign_reference`] is the same algorithm over the crate's `calc_candidates`,
//! and a property test proves the two give the same answer.

use std::hash::{Hash, Hasher};

use rendezvous_hash::{Capacity, IdNode, NodeHasher, RendezvousNodes, WeightedNode};
use serde::Serialize;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::targets::Target;

/// What is hashed to place targets: all targets with the same key share slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardBy {
    /// Each target on its own: scheme, address and metrics path (labels do not move it).
    Target,
    /// All targets of a Cloud Map service together.
    Service,
    /// All targets of a namespace together (the hand-made sharding of the post, automated).
    Namespace,
}

impl ShardBy {
    /// As `SHARD_BY` names them.
    pub const NAMES: &'static [&'static str] = &["target", "service", "namespace"];

    pub fn from_name(name: &str) -> Option<ShardBy> {
        match name.to_ascii_lowercase().as_str() {
            "target" => Some(ShardBy::Target),
            "service" => Some(ShardBy::Service),
            "namespace" => Some(ShardBy::Namespace),
            _ => None,
        }
    }
}

/// A slot that can be assigned keys.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Slot {
    pub id: u32,
    /// Relative capacity (> 0).
    pub weight: f64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Distinct slots per key (`REPLICATION_FACTOR`); at most the number of slots.
    pub replication: usize,
    /// `BALANCE_TOLERANCE` ε: no slot above `ceil((1 + ε) × fair share)`; 0 turns bounding off.
    pub tolerance: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            replication: 1,
            tolerance: 0.1,
        }
    }
}

/// A key to place: its hash and how many targets it stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub hash: u64,
    pub size: u32,
}

impl Hash for KeyRef {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

/// A key hash as the crate's `Hash` item: writes exactly its 8 bytes.
#[derive(Clone, Copy, Debug)]
struct KeyRef(u64);

/// The pinned [`NodeHasher`]: score = SplitMix64(key hash XOR slot hash).
#[derive(Clone, Copy, Debug, Default)]
pub struct PinnedHasher;

impl NodeHasher<u32> for PinnedHasher {
    fn hash<T: Hash>(&self, node: &u32, item: &T) -> u64 {
        let mut captured = CaptureHash(0);
        item.hash(&mut captured);
        score(captured.0, slot_hash(*node))
    }
}

/// Receives what an item's `Hash` writes: a `u64` is taken as is, bytes are
/// chained through XXH3 (little-endian and platform-independent either way).
struct CaptureHash(u64);

impl Hasher for CaptureHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// XXH3-64 of a key's bytes.
pub fn key_hash(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

/// XXH3-64 of a slot id's little-endian bytes.
pub fn slot_hash(slot: u32) -> u64 {
    xxh3_64(&slot.to_le_bytes())
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The rendezvous score of a key on a slot.
#[inline]
pub fn score(key_hash: u64, slot_hash: u64) -> u64 {
    splitmix64(key_hash ^ slot_hash)
}

/// The crate's weighted score: `ln(h / u64::MAX) / weight`, computed the same way.
#[inline]
fn weighted_score(h: u64, weight: f64) -> f64 {
    ((h as f64) / (u64::MAX as f64)).ln() / weight
}

/// The bytes identifying a target for hashing under `by`. Domain prefixes keep
/// the three kinds of key apart.
pub fn key_bytes(target: &Target, by: ShardBy) -> Vec<u8> {
    let mut out = Vec::new();
    key_into(&mut out, target, by);
    out
}

/// [`key_bytes`] written into `out` (cleared first), so that many keys can be
/// hashed through one buffer.
pub fn key_into(out: &mut Vec<u8>, target: &Target, by: ShardBy) {
    let parts: [&str; 3] = match by {
        ShardBy::Target => [target.scheme(), &target.address, target.metrics_path()],
        ShardBy::Service => [&target.namespace, &target.service, ""],
        ShardBy::Namespace => [&target.namespace, "", ""],
    };
    key_parts_into(out, by, parts);
}

fn key_parts_into(out: &mut Vec<u8>, by: ShardBy, parts: [&str; 3]) {
    out.clear();
    out.extend_from_slice(match by {
        ShardBy::Target => b"t\0",
        ShardBy::Service => b"s\0",
        ShardBy::Namespace => b"n\0",
    });
    for part in parts {
        out.extend_from_slice(part.as_bytes());
        out.push(0);
    }
}

/// What makes a target one scrape endpoint (scheme, address, metrics path), as
/// 128 bits: two targets with the same identity are served as one, and the
/// assignment follows a target by it from one computation to the next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId(pub u128);

/// Hashes a value that is a hash already (a [`TargetId`], a key's 128 bits) by
/// mixing its low bits with a secret of this process: maps of a million of them
/// spend next to nothing on hashing, and keys (made of addresses anyone who can
/// register in Cloud Map chooses) cannot be picked to collide in a table.
#[derive(Clone, Copy, Debug)]
pub struct IdHasher(u64);

impl Default for IdHasher {
    fn default() -> Self {
        static SECRET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        IdHasher(*SECRET.get_or_init(|| {
            use std::hash::BuildHasher as _;
            std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
        }))
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = splitmix64(self.0 ^ u64::from_le_bytes(word));
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = splitmix64(self.0 ^ v as u64);
    }
}

/// Maps keyed by [`TargetId`]s or key hashes.
pub type IdMap<K, V> = std::collections::HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

pub fn target_id(target: &Target) -> TargetId {
    TargetId(xxhash_rust::xxh3::xxh3_128(&key_bytes(
        target,
        ShardBy::Target,
    )))
}

/// [`target_id`] from the parts it is made of, without a target.
pub fn target_id_of(scheme: &str, address: &str, metrics_path: &str) -> TargetId {
    let mut out = Vec::with_capacity(4 + scheme.len() + address.len() + metrics_path.len() + 3);
    key_parts_into(&mut out, ShardBy::Target, [scheme, address, metrics_path]);
    TargetId(xxhash_rust::xxh3::xxh3_128(&out))
}

/// [`target_id`] of every target, through one buffer.
pub fn target_ids<'a>(targets: impl IntoIterator<Item = &'a Target>) -> Vec<TargetId> {
    let mut bytes = Vec::new();
    targets
        .into_iter()
        .map(|t| {
            key_into(&mut bytes, t, ShardBy::Target);
            TargetId(xxhash_rust::xxh3::xxh3_128(&bytes))
        })
        .collect()
}

/// The placement of every key: `replicas` slot ids per key, highest-ranked first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub replicas: usize,
    owners: Vec<u32>,
}

impl Assignment {
    /// No slot for any key.
    fn none() -> Self {
        Assignment {
            replicas: 0,
            owners: Vec::new(),
        }
    }

    /// Slots of key `i` (empty when there are no slots).
    pub fn owners(&self, i: usize) -> &[u32] {
        &self.owners[i * self.replicas..(i + 1) * self.replicas]
    }

    pub fn len(&self) -> usize {
        self.owners.len().checked_div(self.replicas).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }
}

/// Per-slot capacity in target units: `ceil((1 + ε) × total × weight / Σ weights)`,
/// or unbounded when ε is 0.
pub fn capacities(total: u64, slots: &[Slot], tolerance: f64) -> Vec<u64> {
    if tolerance <= 0.0 {
        return vec![u64::MAX; slots.len()];
    }
    let sum: f64 = slots.iter().map(|s| s.weight).sum();
    slots
        .iter()
        .map(|s| {
            let bound = (1.0 + tolerance) * total as f64 * s.weight / sum;
            // Floating point error must not add a unit: 1.1 x 400 / 10 is 44, not 44.000000000000007.
            (bound * (1.0 - 1e-12)).ceil() as u64
        })
        .collect()
}

/// Slots sorted by id, without duplicates or unusable weights.
fn normalise(slots: &[Slot]) -> Vec<Slot> {
    let mut out: Vec<Slot> = slots
        .iter()
        .copied()
        .filter(|s| s.weight.is_finite() && s.weight > 0.0)
        .collect();
    out.sort_by_key(|s| s.id);
    out.dedup_by_key(|s| s.id);
    out
}

fn uniform(slots: &[Slot]) -> bool {
    slots.windows(2).all(|w| w[0].weight == w[1].weight)
}

/// Keys in placement order: largest first, then by hash (then input position, which
/// only matters for two different keys with the same 64-bit hash). Without
/// capacities the order does not matter and the input order is kept.
fn placement_order(keys: &[Key], bounded: bool) -> Vec<usize> {
    if !bounded {
        return (0..keys.len()).collect();
    }
    // Sorting (size, hash, index) tuples in place is cache-friendly; the index only
    // breaks ties between different keys with the same hash.
    let mut tuples: Vec<(std::cmp::Reverse<u32>, u64, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (std::cmp::Reverse(k.size), k.hash, i as u32))
        .collect();
    tuples.sort_unstable();
    tuples.into_iter().map(|(_, _, i)| i as usize).collect()
}

/// Places one key: its best-ranked slots with room, then, if a key cannot fit
/// anywhere, the least-loaded remaining slots. `better(a, b)`: slot position `a`
/// ranks above `b` for this key.
fn place(
    size: u64,
    want: usize,
    loads: &mut [u64],
    caps: &[u64],
    out: &mut Vec<usize>,
    better: impl Fn(usize, usize) -> bool,
) {
    out.clear();
    let n = loads.len();
    while out.len() < want {
        let mut best: Option<usize> = None;
        for p in 0..n {
            if out.contains(&p) || loads[p].saturating_add(size) > caps[p] {
                continue;
            }
            if best.is_none_or(|b| better(p, b)) {
                best = Some(p);
            }
        }
        match best {
            Some(p) => out.push(p),
            None => break,
        }
    }
    while out.len() < want {
        let mut best: Option<usize> = None;
        for p in 0..n {
            if out.contains(&p) {
                continue;
            }
            let wins = match best {
                None => true,
                Some(b) => loads[p] < loads[b] || (loads[p] == loads[b] && better(p, b)),
            };
            if wins {
                best = Some(p);
            }
        }
        match best {
            Some(p) => out.push(p),
            None => break,
        }
    }
    for &p in out.iter() {
        loads[p] += size;
    }
}

/// What both assignment paths start from.
struct Setup {
    /// Usable slots, by id.
    slots: Vec<Slot>,
    /// Slots per key: the replication factor, at most the number of slots.
    want: usize,
    caps: Vec<u64>,
    loads: Vec<u64>,
    owners: Vec<u32>,
}

/// `None` when there is no usable slot.
fn setup(keys: &[Key], slots: &[Slot], params: &Params) -> Option<Setup> {
    let slots = normalise(slots);
    let want = params.replication.max(1).min(slots.len());
    if want == 0 {
        return None;
    }
    let total: u64 = keys.iter().map(|k| u64::from(k.size) * want as u64).sum();
    Some(Setup {
        caps: capacities(total, &slots, params.tolerance),
        loads: vec![0; slots.len()],
        owners: vec![0; keys.len() * want],
        slots,
        want,
    })
}

/// Assigns keys to slots. The fast path: one pass of scores per key.
pub fn assign(keys: &[Key], slots: &[Slot], params: &Params) -> Assignment {
    let Some(Setup {
        slots,
        want,
        caps,
        mut loads,
        mut owners,
    }) = setup(keys, slots, params)
    else {
        return Assignment::none();
    };
    let hashes: Vec<u64> = slots.iter().map(|s| slot_hash(s.id)).collect();
    let ids: Vec<u32> = slots.iter().map(|s| s.id).collect();
    let mut chosen = Vec::with_capacity(want);

    if uniform(&slots) {
        let mut scores = vec![0u64; slots.len()];
        for i in placement_order(keys, params.tolerance > 0.0) {
            for (p, h) in hashes.iter().enumerate() {
                scores[p] = score(keys[i].hash, *h);
            }
            place(
                keys[i].size.into(),
                want,
                &mut loads,
                &caps,
                &mut chosen,
                |a, b| (scores[a], ids[a]) > (scores[b], ids[b]),
            );
            for (r, p) in chosen.iter().enumerate() {
                owners[i * want + r] = ids[*p];
            }
        }
    } else {
        let weights: Vec<f64> = slots.iter().map(|s| s.weight).collect();
        let mut scores = vec![0f64; slots.len()];
        for i in placement_order(keys, params.tolerance > 0.0) {
            for (p, h) in hashes.iter().enumerate() {
                scores[p] = weighted_score(score(keys[i].hash, *h), weights[p]);
            }
            place(
                keys[i].size.into(),
                want,
                &mut loads,
                &caps,
                &mut chosen,
                |a, b| scores[a] > scores[b] || (scores[a] == scores[b] && ids[a] > ids[b]),
            );
            for (r, p) in chosen.iter().enumerate() {
                owners[i * want + r] = ids[*p];
            }
        }
    }
    Assignment {
        replicas: want,
        owners,
    }
}

/// The same assignment computed through the crate's `calc_candidates` (a full
/// ranking sorted per key): the reference the fast path is tested against, and
/// the baseline of the benchmarks.
pub fn assign_reference(keys: &[Key], slots: &[Slot], params: &Params) -> Assignment {
    let Some(Setup {
        slots,
        want,
        caps,
        mut loads,
        mut owners,
    }) = setup(keys, slots, params)
    else {
        return Assignment::none();
    };
    let position = |id: u32| slots.iter().position(|s| s.id == id).unwrap_or(0);
    let mut chosen = Vec::with_capacity(want);
    let rankings: Box<dyn Fn(u64) -> Vec<u32>> = if uniform(&slots) {
        let mut nodes = RendezvousNodes::new(PinnedHasher);
        for s in &slots {
            nodes.insert(IdNode::new(s.id));
        }
        Box::new(move |h| nodes.calc_candidates(&KeyRef(h)).map(|n| **n).collect())
    } else {
        let mut nodes = RendezvousNodes::new(PinnedHasher);
        for s in &slots {
            if let Some(capacity) = Capacity::new(s.weight) {
                nodes.insert(WeightedNode::new(IdNode::new(s.id), capacity));
            }
        }
        Box::new(move |h| nodes.calc_candidates(&KeyRef(h)).map(|n| *n.node).collect())
    };
    for i in placement_order(keys, params.tolerance > 0.0) {
        let ranking: Vec<usize> = rankings(keys[i].hash).into_iter().map(position).collect();
        let rank_of = |p: usize| ranking.iter().position(|&q| q == p).unwrap_or(usize::MAX);
        place(
            keys[i].size.into(),
            want,
            &mut loads,
            &caps,
            &mut chosen,
            |a, b| rank_of(a) < rank_of(b),
        );
        for (r, p) in chosen.iter().enumerate() {
            owners[i * want + r] = slots[*p].id;
        }
    }
    Assignment {
        replicas: want,
        owners,
    }
}

/// Targets grouped into keys under `by`: the keys and, per target, its key index.
pub fn group_targets<'a>(
    targets: impl IntoIterator<Item = &'a Target>,
    by: ShardBy,
) -> (Vec<Key>, Vec<usize>) {
    // Keys are told apart by 128 bits of their bytes: no key is kept whole.
    let mut index: IdMap<u128, usize> = IdMap::default();
    let mut keys: Vec<Key> = Vec::new();
    let mut of_target = Vec::new();
    let mut bytes = Vec::new();
    for t in targets {
        key_into(&mut bytes, t, by);
        let next = keys.len();
        let i = *index
            .entry(xxhash_rust::xxh3::xxh3_128(&bytes))
            .or_insert_with(|| {
                keys.push(Key {
                    hash: key_hash(&bytes),
                    size: 0,
                });
                next
            });
        keys[i].size += 1;
        of_target.push(i);
    }
    (keys, of_target)
}

/// Slots of every target, in input order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetAssignment {
    pub replicas: usize,
    per_target: Vec<u32>,
}

impl TargetAssignment {
    pub fn slots_of(&self, target: usize) -> &[u32] {
        &self.per_target[target * self.replicas..(target + 1) * self.replicas]
    }

    pub fn len(&self) -> usize {
        self.per_target
            .len()
            .checked_div(self.replicas)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.per_target.is_empty()
    }

    /// Targets per slot id (a replicated target counts on each of its slots).
    pub fn per_slot(&self) -> std::collections::BTreeMap<u32, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for id in &self.per_target {
            *counts.entry(*id).or_insert(0) += 1;
        }
        counts
    }
}

/// Assigns targets to slots under `by` and `params`.
pub fn assign_targets<'a>(
    targets: impl IntoIterator<Item = &'a Target>,
    slots: &[Slot],
    by: ShardBy,
    params: &Params,
) -> TargetAssignment {
    let (keys, of_target) = group_targets(targets, by);
    let keyed = assign(&keys, slots, params);
    let mut per_target = Vec::with_capacity(of_target.len() * keyed.replicas);
    for k in of_target {
        per_target.extend_from_slice(keyed.owners(k));
    }
    TargetAssignment {
        replicas: keyed.replicas,
        per_target,
    }
}

/// How two assignments of the same targets differ.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Movement {
    /// Targets whose set of slots changed.
    pub moved: usize,
    pub targets: usize,
    pub moved_fraction: f64,
}

pub fn movement(before: &TargetAssignment, after: &TargetAssignment) -> Movement {
    let targets = before.len().min(after.len());
    let moved = (0..targets)
        .filter(|&t| {
            let (mut a, mut b) = (before.slots_of(t).to_vec(), after.slots_of(t).to_vec());
            a.sort_unstable();
            b.sort_unstable();
            a != b
        })
        .count();
    Movement {
        moved,
        targets,
        moved_fraction: if targets == 0 {
            0.0
        } else {
            moved as f64 / targets as f64
        },
    }
}

/// The least fraction of targets any assignment must move between two slot sets:
/// the total share of load that slots gain.
pub fn optimal_moved_fraction(before: &[Slot], after: &[Slot]) -> f64 {
    let share = |slots: &[Slot]| {
        let slots = normalise(slots);
        let sum: f64 = slots.iter().map(|s| s.weight).sum();
        slots
            .into_iter()
            .map(|s| (s.id, s.weight / sum))
            .collect::<std::collections::BTreeMap<u32, f64>>()
    };
    let (b, a) = (share(before), share(after));
    a.iter()
        .map(|(id, new)| (new - b.get(id).copied().unwrap_or(0.0)).max(0.0))
        .sum()
}

/// `max / mean` of per-slot loads over `slots` (slots with no load count as 0).
pub fn max_over_mean(per_slot: &std::collections::BTreeMap<u32, usize>, slots: usize) -> f64 {
    if slots == 0 {
        return 0.0;
    }
    let total: usize = per_slot.values().sum();
    let max = per_slot.values().copied().max().unwrap_or(0);
    if total == 0 {
        0.0
    } else {
        max as f64 / (total as f64 / slots as f64)
    }
}

/// `n` slots of weight 1 with ids `0..n`.
pub fn equal_slots(n: u32) -> Vec<Slot> {
    (0..n).map(|id| Slot { id, weight: 1.0 }).collect()
}

#[cfg(test)]
mod tests;
