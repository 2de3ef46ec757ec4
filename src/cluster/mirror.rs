//! A replica's copy of the leader's assignment, kept by following the leader's
//! changes (see [`super::protocol`]): the frames as received, compressed, from
//! which the next leader starts at once instead of after its first discovery
//! cycle, and from which a replica that takes a slot serves it until the leader
//! answers. [`OwnShard`] is the one slot a replica serves, typed, rebuilt from
//! the same frames and checked against the leader's fingerprint of it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::assignment::{Inherited, Owners};
use super::protocol::{self, ChangesHead, Frame, ProtocolError, Record, ShardHead};
use crate::sharding::{self, IdMap, Slot, TargetId};
use crate::targets::{Body, Interner, MetaLabels, Target};

/// A copy of a leader's whole assignment: followed from the leader, or this
/// replica's own when its term ended.
#[derive(Debug)]
pub struct Mirror {
    pub term: u64,
    pub generation: u64,
    /// The membership of that assignment.
    pub slots: Vec<Slot>,
    pub shards: BTreeMap<u32, ShardHead>,
    /// A whole frame, then the changes after it, as received.
    frames: Vec<Frame>,
    whole_bytes: usize,
    change_bytes: usize,
    /// The targets and the slots serving each: this replica's own when it led,
    /// else read from the frames the first time a new leader needs them.
    contents: OnceLock<Option<MirrorContents>>,
    /// When the copy was last known to be current: received, or confirmed
    /// unchanged by its leader's long-poll, or this replica's own term ended.
    current_at: Mutex<Instant>,
}

/// What a new leader starts from.
#[derive(Clone, Debug)]
pub struct MirrorContents {
    /// Sorted, one per identity.
    pub targets: Arc<Vec<Target>>,
    /// The slots serving each target (draining ones included): a new leader goes
    /// on with the handoffs in flight.
    pub owners: Arc<Owners>,
}

impl Mirror {
    /// A copy from an answer: a whole one, or `held` followed by the answer's
    /// changes. Refused if the changes do not start where `held` ends.
    pub fn followed(
        held: Option<&Mirror>,
        head: ChangesHead,
        frames: Vec<Frame>,
    ) -> Result<Mirror, ProtocolError> {
        let (mut kept, whole_bytes, mut change_bytes) = match (head.whole, held) {
            (true, _) => (Vec::new(), frames.iter().map(|f| f.bytes.len()).sum(), 0),
            (false, Some(held))
                if held.term == head.term
                    && !held.frames.is_empty()
                    && frames
                        .first()
                        .is_none_or(|f| f.generation == held.generation + 1) =>
            {
                (held.frames.clone(), held.whole_bytes, held.change_bytes)
            }
            (false, held) => {
                return Err(ProtocolError::Gap {
                    term: held.map_or(0, |h| h.term),
                    after: held.map_or(0, |h| h.generation),
                })
            }
        };
        // Consecutive generations, ending at the answer's: a whole copy is one
        // frame of that generation; changes run on from the copy held.
        let consecutive = frames
            .windows(2)
            .all(|w| w[1].generation == w[0].generation + 1);
        let ends = frames
            .last()
            .map_or(held.is_some_and(|h| h.generation == head.generation), |f| {
                f.generation == head.generation
            });
        if !consecutive || !ends || (head.whole && frames.len() != 1) {
            return Err(ProtocolError::Discontinuous(head.generation));
        }
        if !head.whole {
            change_bytes += frames.iter().map(|f| f.bytes.len()).sum::<usize>();
        }
        kept.extend(frames);
        Ok(Mirror {
            term: head.term,
            generation: head.generation,
            slots: head.slots,
            shards: head.shards.into_iter().map(|s| (s.slot, s)).collect(),
            frames: kept,
            whole_bytes,
            change_bytes,
            contents: OnceLock::new(),
            current_at: Mutex::new(Instant::now()),
        })
    }

    /// This replica's own assignment, as its term leaves it.
    pub fn own(
        term: u64,
        generation: u64,
        inherited: Inherited,
        shards: BTreeMap<u32, ShardHead>,
    ) -> Self {
        Mirror {
            term,
            generation,
            slots: inherited.slots,
            shards,
            frames: Vec::new(),
            whole_bytes: 0,
            change_bytes: 0,
            contents: OnceLock::from(Some(MirrorContents {
                targets: inherited.targets,
                owners: Arc::new(inherited.owners),
            })),
            current_at: Mutex::new(Instant::now()),
        }
    }

    /// Whether the changes held outweigh a whole copy: the next answer should be
    /// one (the changes are then dropped).
    pub fn wants_whole(&self) -> bool {
        self.frames.is_empty() || self.change_bytes > self.whole_bytes
    }

    /// Compressed bytes held.
    pub fn bytes(&self) -> usize {
        self.whole_bytes + self.change_bytes
    }

    /// Every record of the copy, in order.
    fn replay(
        &self,
        mut visit: impl FnMut(Record) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        for frame in &self.frames {
            protocol::decode_frame(&frame.bytes, &mut visit)?;
        }
        Ok(())
    }

    /// The targets and their slots, read from the frames once and checked
    /// against every slot's fingerprint. `None` if they do not add up (the copy
    /// is then not started from).
    pub fn contents(&self) -> Option<&MirrorContents> {
        self.contents
            .get_or_init(|| match self.read_all() {
                Ok(contents) => Some(contents),
                Err(err) => {
                    tracing::warn!(
                        term = self.term,
                        generation = self.generation,
                        "the mirrored assignment cannot be read: {err}"
                    );
                    None
                }
            })
            .as_ref()
    }

    fn read_all(&self) -> Result<MirrorContents, ProtocolError> {
        let mut strings = Interner::default();
        let mut all: IdMap<TargetId, (Target, Vec<u32>)> = IdMap::default();
        self.replay(|record| apply_all(&mut all, &mut strings, record))?;
        // In target order, with their identities: each slot is checked without
        // hashing a target again.
        let mut sorted: Vec<(Target, TargetId)> =
            all.iter().map(|(id, (t, _))| (t.clone(), *id)).collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (slot, head) in &self.shards {
            let shard = sorted
                .iter()
                .filter(|(_, id)| all.get(id).is_some_and(|(_, s)| s.contains(slot)))
                .map(|(t, _)| t);
            check(*slot, head, shard)?;
        }
        let owners: Owners = all
            .into_iter()
            .map(|(id, (_, slots))| (id, slots))
            .collect();
        let targets: Vec<Target> = sorted.into_iter().map(|(t, _)| t).collect();
        Ok(MirrorContents {
            targets: Arc::new(targets),
            owners: Arc::new(owners),
        })
    }

    /// Its confirmation that nothing changed since: the copy is current now.
    pub fn confirm_current(&self) {
        self.set_current_at(Instant::now());
    }

    /// The copy was last known current at `at`.
    pub fn set_current_at(&self, at: Instant) {
        *self.current_at.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }

    /// How long ago the copy was last known to be current.
    pub fn age(&self) -> Duration {
        self.current_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

fn apply_all(
    all: &mut IdMap<TargetId, (Target, Vec<u32>)>,
    strings: &mut Interner,
    record: Record,
) -> Result<(), ProtocolError> {
    match record {
        Record::Put { t, slots } => {
            let target = t.target(strings)?;
            all.insert(sharding::target_id(&target), (target, slots));
        }
        Record::Move { id, slots } => match all.get_mut(&id.0) {
            Some(entry) => entry.1 = slots,
            None => return Err(ProtocolError::Unknown(id.0 .0)),
        },
        Record::Gone { id } => {
            all.remove(&id.0);
        }
    }
    Ok(())
}

/// Whether `targets` (in order) are the shard `head` describes.
fn check<'a>(
    slot: u32,
    head: &ShardHead,
    targets: impl Iterator<Item = &'a Target>,
) -> Result<(), ProtocolError> {
    let mut count = 0;
    let content = protocol::content_of(targets.inspect(|_| count += 1));
    if count == head.targets && content == head.content {
        return Ok(());
    }
    Err(ProtocolError::Diverged {
        slot,
        targets: count,
        content,
        leader_targets: head.targets,
        leader_content: head.content,
    })
}

/// The shard of the one slot a replica serves, kept typed from the frames it
/// receives: a frame changes it in place, and its body is rendered only when it
/// changed.
#[derive(Debug)]
pub struct OwnShard {
    pub slot: u32,
    /// The (term, generation) of the mirror it is in step with.
    pub at: (u64, u64),
    targets: IdMap<TargetId, Target>,
    strings: Interner,
}

impl OwnShard {
    pub fn empty(slot: u32) -> OwnShard {
        OwnShard {
            slot,
            at: (0, 0),
            targets: IdMap::default(),
            strings: Interner::default(),
        }
    }

    /// The slot's shard in `mirror`.
    pub fn from_mirror(slot: u32, mirror: &Mirror) -> Result<OwnShard, ProtocolError> {
        let mut own = OwnShard::empty(slot);
        own.at = (mirror.term, mirror.generation);
        match mirror.contents.get() {
            // This replica's own assignment: typed already.
            Some(Some(contents)) => {
                for t in contents.targets.iter() {
                    let id = sharding::target_id(t);
                    if contents.owners.get(&id).is_some_and(|s| s.contains(&slot)) {
                        own.targets.insert(id, t.clone());
                    }
                }
            }
            _ => mirror.replay(|record| own.apply_record(record))?,
        }
        Ok(own)
    }

    /// Applies an answer's frames (a whole copy replaces what is held).
    pub fn apply(&mut self, whole: bool, frames: &[Frame]) -> Result<(), ProtocolError> {
        if whole {
            self.targets.clear();
        }
        for frame in frames {
            protocol::decode_frame(&frame.bytes, |record| self.apply_record(record))?;
        }
        self.strings.prune();
        Ok(())
    }

    fn apply_record(&mut self, record: Record) -> Result<(), ProtocolError> {
        match record {
            Record::Put { t, slots } => {
                if slots.contains(&self.slot) {
                    let target = t.target(&mut self.strings)?;
                    self.targets.insert(sharding::target_id(&target), target);
                } else {
                    // Another slot's, or one of this slot's changed and moved at once.
                    self.targets.remove(&t.target_id());
                }
            }
            Record::Move { id, slots } => {
                if !slots.contains(&self.slot) {
                    self.targets.remove(&id.0);
                }
            }
            Record::Gone { id } => {
                self.targets.remove(&id.0);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.targets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    /// The rendered shard, if it is the one `head` describes, with the
    /// `__meta_cloudmap_*` labels `meta` keeps.
    pub fn body(&self, head: &ShardHead, meta: MetaLabels) -> Result<Body, ProtocolError> {
        let mut sorted: Vec<&Target> = self.targets.values().collect();
        sorted.sort();
        check(self.slot, head, sorted.iter().copied())?;
        Ok(Body::render_with(sorted, meta))
    }
}

#[cfg(test)]
mod tests {
    use super::super::assignment::Assigner;
    use super::*;
    use crate::sharding::{Params, ShardBy};
    use crate::targets::MetricsSource;

    fn target(i: usize, label: &str) -> Target {
        Target::new(
            "ns",
            "svc",
            &format!("t{i}"),
            MetricsSource::App,
            &format!("10.0.{}.{}:3000", i / 250, i % 250),
            [("v".to_owned(), label.to_owned())].into(),
        )
    }

    fn slots(ids: &[u32]) -> Vec<Slot> {
        ids.iter().map(|&id| Slot { id, weight: 1.0 }).collect()
    }

    /// Follows `a` from `mirror` (whole when `None`), as a follower of slot `slot` does.
    fn follow(
        a: &Assigner,
        mirror: Option<Mirror>,
        own: &mut OwnShard,
    ) -> Result<Mirror, ProtocolError> {
        let snap = a.snapshot().expect("published");
        let after = mirror.as_ref().map_or((0, 0), |m| (m.term, m.generation));
        let (frames, whole) = snap.frames_after(after.0, after.1);
        let head = snap.answer_head(whole);
        own.apply(whole, &frames)?;
        let next = Mirror::followed(mirror.as_ref(), head, frames)?;
        let leader = &snap.shards[&own.slot];
        // Each replica renders its own META_LABELS; the check is over every label.
        for meta in [MetaLabels::All, MetaLabels::Basic, MetaLabels::None] {
            assert_eq!(
                own.body(&next.shards[&own.slot], meta)?,
                *leader.body_with(meta)
            );
        }
        Ok(next)
    }

    #[test]
    fn a_follower_rebuilds_its_shard_and_the_whole_assignment_from_the_changes() {
        const GRACE: Duration = Duration::from_secs(10);
        let mut list: Vec<Target> = (0..300).map(|i| target(i, "a")).collect();
        let mut a = Assigner::new(ShardBy::Target, Params::default(), GRACE, 3);
        a.set_slots(&slots(&[0, 1, 2]));
        a.set_targets(Arc::new(list.clone()));
        let mut own = OwnShard::empty(1);
        let mut mirror = follow(&a, None, &mut own).expect("whole");
        assert!(!own.is_empty());

        // Registrations, a relabelled target, deregistrations, a slot joining
        // (targets drain), its confirmation: each followed through the log only.
        type Step = Box<dyn Fn(&mut Assigner, &mut Vec<Target>)>;
        let steps: Vec<Step> = vec![
            Box::new(|a, l| {
                l.push(target(900, "a"));
                l.sort();
                a.set_targets(Arc::new(l.clone()));
            }),
            Box::new(|a, l| {
                l[5] = target(5, "b");
                l.sort();
                a.set_targets(Arc::new(l.clone()));
            }),
            Box::new(|a, l| {
                l.truncate(250);
                a.set_targets(Arc::new(l.clone()));
            }),
            Box::new(|a, _| {
                a.set_slots(&slots(&[0, 1, 2, 3]));
            }),
            Box::new(|a, _| {
                let g = a.generation();
                a.confirm(3, "r3", g, Instant::now());
                a.tick(Instant::now() + GRACE * 2);
            }),
            Box::new(|a, _| {
                a.set_slots(&slots(&[0, 1, 3]));
            }),
        ];
        for step in &steps {
            let before = a.generation();
            step(&mut a, &mut list);
            assert!(a.generation() > before);
            let whole_before = mirror.frames.len();
            mirror = follow(&a, Some(mirror), &mut own).expect("changes");
            assert!(mirror.frames.len() > whole_before, "followed by changes");
        }
        // The whole assignment, from the frames, is the leader's.
        let contents = mirror.contents().expect("reads").clone();
        let inherited = a.inherited().expect("inherited");
        assert_eq!(*contents.targets, *inherited.targets);
        assert_eq!(*contents.owners, inherited.owners);
        // A slot taken now is served from the copy as the leader has it.
        let taken = OwnShard::from_mirror(3, &mirror).expect("slot 3");
        assert_eq!(
            taken
                .body(&mirror.shards[&3], MetaLabels::All)
                .expect("checks"),
            *a.snapshot().unwrap().shards[&3].body()
        );
    }

    #[test]
    fn changes_that_do_not_follow_the_copy_are_refused() {
        let list: Vec<Target> = (0..50).map(|i| target(i, "a")).collect();
        let mut a = Assigner::new(ShardBy::Target, Params::default(), Duration::ZERO, 1);
        a.set_slots(&slots(&[0, 1]));
        a.set_targets(Arc::new(list.clone()));
        let mut own = OwnShard::empty(0);
        let mirror = follow(&a, None, &mut own).expect("whole");
        let mut more = list.clone();
        more.push(target(77, "a"));
        more.sort();
        a.set_targets(Arc::new(more.clone()));
        more.push(target(78, "a"));
        more.sort();
        a.set_targets(Arc::new(more));
        // Only the last frame, as if one was lost on the way.
        let snap = a.snapshot().unwrap();
        let (frames, whole) = snap.frames_after(mirror.term, mirror.generation);
        assert!(!whole && frames.len() == 2);
        let head = snap.answer_head(whole);
        assert!(matches!(
            Mirror::followed(Some(&mirror), head.clone(), frames[1..].to_vec()),
            Err(ProtocolError::Gap { .. })
        ));
        // A shard that differs from the leader's by one target does not pass for it.
        let mut wrong = OwnShard::from_mirror(0, &mirror).unwrap();
        let extra = target(5000, "a");
        wrong
            .targets
            .insert(crate::sharding::target_id(&extra), extra);
        assert!(matches!(
            wrong.body(&mirror.shards[&0], MetaLabels::All),
            Err(ProtocolError::Diverged { .. })
        ));
        // Frames that stop short of the answer's generation are refused.
        assert!(matches!(
            Mirror::followed(Some(&mirror), head.clone(), frames[..1].to_vec()),
            Err(ProtocolError::Discontinuous(_))
        ));
        // A different term is never taken as changes.
        let other = ChangesHead { term: 9, ..head };
        assert!(Mirror::followed(Some(&mirror), other, frames).is_err());
    }
}
