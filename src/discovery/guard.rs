//! The guard against mass disappearance. AWS can answer *successfully* that most
//! targets are gone: a wrong region or account after a configuration edit, a
//! deleted namespace, an emptied namespace list. Publishing that at once empties
//! every collector within one cycle. A result that would drop more than
//! `MAX_DROP_FRACTION` of the published targets is held instead, until such a
//! drop has been seen `DROP_CONFIRM_CYCLES` cycles in a row. While it is held the
//! publisher serves the union of the published list and the new answer, so that
//! targets that appeared meanwhile (a deployment replacing most tasks over a few
//! cycles) are served at once and nothing is served less.

use std::collections::HashSet;
use std::time::SystemTime;

use serde::Serialize;

use crate::sharding::{self, IdHasher, TargetId};

type IdBuild = std::hash::BuildHasherDefault<IdHasher>;
use crate::targets::Target;

/// A held result, as `/v1/status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DropHold {
    /// When the first of these cycles was seen.
    pub since: String,
    /// Consecutive cycles that dropped too much, and how many publish the drop.
    pub cycles_seen: u32,
    pub cycles_needed: u32,
    /// Published targets the result lacks, and how many are published.
    pub would_drop: usize,
    pub published: usize,
}

/// How many targets of `published` `next` drops, and the identities published.
fn dropped(published: &[Target], next: &[Target]) -> (usize, HashSet<TargetId, IdBuild>) {
    let next_ids: HashSet<TargetId, IdBuild> = next.iter().map(identity).collect();
    let published_ids: HashSet<TargetId, IdBuild> = published.iter().map(identity).collect();
    (published_ids.difference(&next_ids).count(), published_ids)
}

/// What is served while a drop is held: every target of `next`, and those of
/// `published` that `next` lacks, in the order `next` is built in.
pub fn union(published: &[Target], next: &[Target]) -> Vec<Target> {
    with_gone_kept(published, next).unwrap_or_else(|| next.to_vec())
}

/// [`union`], or `None` when `next` lacks none of `published` (it is then the
/// union itself).
pub fn with_gone_kept(published: &[Target], next: &[Target]) -> Option<Vec<Target>> {
    let present: HashSet<TargetId, IdBuild> = next.iter().map(identity).collect();
    let mut kept: sharding::IdMap<TargetId, &Target> = Default::default();
    for t in published {
        let id = identity(t);
        if !present.contains(&id) {
            kept.entry(id).or_insert(t);
        }
    }
    if kept.is_empty() {
        return None;
    }
    let mut all: Vec<Target> = next.to_vec();
    all.extend(kept.into_values().cloned());
    all.sort();
    Some(all)
}

/// What to do with a cycle's result.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Publish,
    Hold(DropHold),
}

#[derive(Clone, Debug)]
pub struct DropGuard {
    max_fraction: f64,
    confirm_cycles: u32,
    /// The drop being confirmed.
    held: Option<DropHold>,
}

fn identity(t: &Target) -> TargetId {
    sharding::target_id(t)
}

impl DropGuard {
    /// `max_fraction` or `confirm_cycles` of 0 turns the guard off.
    pub fn new(max_fraction: f64, confirm_cycles: u32) -> Self {
        DropGuard {
            max_fraction,
            confirm_cycles,
            held: None,
        }
    }

    fn enabled(&self) -> bool {
        self.max_fraction > 0.0 && self.confirm_cycles > 0
    }

    /// Whether publishing `next` over `published` drops no more than the
    /// guard lets through at once (judging nothing, counting nothing).
    pub fn allows(&self, published: &[Target], next: &[Target]) -> bool {
        if !self.enabled() || published.is_empty() {
            return true;
        }
        let (would_drop, published_ids) = dropped(published, next);
        would_drop as f64 <= self.max_fraction * published_ids.len() as f64
    }

    /// The hold in force, if any.
    pub fn hold(&self) -> Option<&DropHold> {
        self.held.as_ref()
    }

    /// Judges `next` against what is `published`. Targets are compared by identity
    /// (scheme, address, path), so a label change drops nothing.
    pub fn check(&mut self, published: &[Target], next: &[Target]) -> Verdict {
        if !self.enabled() || published.is_empty() {
            self.release(None);
            return Verdict::Publish;
        }
        let (would_drop, published_ids) = dropped(published, next);
        if would_drop as f64 <= self.max_fraction * published_ids.len() as f64 {
            self.release(None);
            return Verdict::Publish;
        }
        let seen = self.held.as_ref().map_or(0, |h| h.cycles_seen) + 1;
        if seen >= self.confirm_cycles {
            self.release(Some((would_drop, published_ids.len(), seen)));
            return Verdict::Publish;
        }
        let since = match &self.held {
            Some(hold) => hold.since.clone(),
            None => {
                tracing::warn!(
                    would_drop,
                    published = published_ids.len(),
                    "discovery answered that {would_drop} of {} published targets are gone, more \
                     than MAX_DROP_FRACTION ({}): still serving them until such a drop is seen \
                     {} cycles in a row (a wrong region, account or namespace list looks like \
                     this; see /v1/status)",
                    published_ids.len(),
                    self.max_fraction,
                    self.confirm_cycles
                );
                humantime::format_rfc3339_millis(SystemTime::now()).to_string()
            }
        };
        let hold = DropHold {
            since,
            cycles_seen: seen,
            cycles_needed: self.confirm_cycles,
            would_drop,
            published: published_ids.len(),
        };
        self.held = Some(hold.clone());
        Verdict::Hold(hold)
    }

    /// Ends a hold: the answer changed back, or was confirmed (`confirmed` says how).
    fn release(&mut self, confirmed: Option<(usize, usize, u32)>) {
        if self.held.take().is_some() {
            match confirmed {
                Some((dropped, published, cycles)) => tracing::warn!(
                    "the drop of {dropped} of {published} targets was seen {cycles} cycles in a \
                     row: publishing it"
                ),
                None => tracing::info!("discovery no longer drops most targets: hold ended"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::MetricsSource;

    fn targets(range: std::ops::Range<usize>) -> Vec<Target> {
        range
            .map(|i| {
                Target::new(
                    "ns",
                    "svc",
                    &format!("t{i}"),
                    MetricsSource::App,
                    &format!("10.0.0.{i}:80"),
                    Default::default(),
                )
            })
            .collect()
    }

    #[test]
    fn a_large_drop_is_held_until_confirmed() {
        let mut guard = DropGuard::new(0.5, 3);
        let published = targets(0..10);
        let shrunk = targets(0..4); // drops 6 of 10
        assert!(matches!(
            guard.check(&published, &shrunk),
            Verdict::Hold(DropHold {
                cycles_seen: 1,
                would_drop: 6,
                published: 10,
                ..
            })
        ));
        assert!(matches!(guard.check(&published, &shrunk), Verdict::Hold(_)));
        assert_eq!(guard.check(&published, &shrunk), Verdict::Publish);
        assert!(guard.hold().is_none());
    }

    #[test]
    fn a_changing_drop_is_confirmed_too_and_recovery_ends_the_hold() {
        let mut guard = DropGuard::new(0.5, 3);
        let published = targets(0..10);
        assert!(matches!(
            guard.check(&published, &targets(0..2)),
            Verdict::Hold(_)
        ));
        // A drop that changes every cycle (new tasks registering) still counts.
        let Verdict::Hold(hold) = guard.check(&published, &targets(1..4)) else {
            panic!("held");
        };
        assert_eq!(hold.cycles_seen, 2);
        // A cycle under the threshold ends the hold and restarts the count.
        assert_eq!(guard.check(&published, &published), Verdict::Publish);
        assert!(guard.hold().is_none());
        assert!(matches!(
            guard.check(&published, &targets(0..2)),
            Verdict::Hold(DropHold { cycles_seen: 1, .. })
        ));
    }

    #[test]
    fn a_hold_serves_the_union() {
        let published = targets(0..6);
        let next = targets(4..9);
        let both = union(&published, &next);
        let addrs: Vec<&str> = both.iter().map(|t| &*t.address).collect();
        assert_eq!(both.len(), 9, "{addrs:?}");
        let mut sorted = both.clone();
        sorted.sort();
        assert_eq!(both, sorted);
        // The new answer's version of a target wins.
        let mut relabelled = next.clone();
        relabelled[0] = relabelled[0].with_label("team", "x");
        let both = union(&published, &relabelled);
        assert!(both.iter().any(|t| t.label("team").is_some()));
        assert_eq!(both.len(), 9);
    }

    #[test]
    fn small_drops_label_changes_and_a_disabled_guard_pass() {
        let mut guard = DropGuard::new(0.5, 3);
        let published = targets(0..10);
        assert_eq!(guard.check(&published, &targets(0..5)), Verdict::Publish);
        let mut relabelled = published.clone();
        for t in &mut relabelled {
            *t = t.with_label("team", "x");
        }
        assert_eq!(guard.check(&published, &relabelled), Verdict::Publish);
        assert_eq!(guard.check(&[], &[]), Verdict::Publish);
        for mut off in [DropGuard::new(0.0, 3), DropGuard::new(0.5, 0)] {
            assert_eq!(off.check(&published, &[]), Verdict::Publish);
        }
    }
}
