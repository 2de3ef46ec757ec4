//! The guard against mass disappearance. AWS can answer *successfully* that most
//! targets are gone: a wrong region or account after a configuration edit, a
//! deleted namespace, an emptied namespace list. Publishing that at once empties
//! every collector within one cycle. A result that would drop more than
//! `MAX_DROP_FRACTION` of the published targets is held instead, until the same
//! answer has been seen `DROP_CONFIRM_CYCLES` cycles in a row.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::time::SystemTime;

use serde::Serialize;

use crate::sharding::{self, ShardBy};
use crate::targets::Target;

/// A held result, as `/v1/status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DropHold {
    /// When the result was first seen.
    pub since: String,
    /// Consecutive cycles that returned it, and how many publish it.
    pub cycles_seen: u32,
    pub cycles_needed: u32,
    /// Published targets the result lacks, and how many are published.
    pub would_drop: usize,
    pub published: usize,
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
    /// The result being confirmed: its fingerprint and hold.
    held: Option<(u64, DropHold)>,
}

fn identity(t: &Target) -> Vec<u8> {
    sharding::key_bytes(t, ShardBy::Target)
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

    /// The hold in force, if any.
    pub fn hold(&self) -> Option<&DropHold> {
        self.held.as_ref().map(|(_, hold)| hold)
    }

    /// Judges `next` against what is `published`. Targets are compared by identity
    /// (scheme, address, path), so a label change drops nothing.
    pub fn check(&mut self, published: &[Target], next: &[Target]) -> Verdict {
        if !self.enabled() || published.is_empty() {
            self.release(None);
            return Verdict::Publish;
        }
        let next_ids: HashSet<Vec<u8>> = next.iter().map(identity).collect();
        let published_ids: HashSet<Vec<u8>> = published.iter().map(identity).collect();
        let would_drop = published_ids.difference(&next_ids).count();
        if would_drop as f64 <= self.max_fraction * published_ids.len() as f64 {
            self.release(None);
            return Verdict::Publish;
        }
        let fingerprint = {
            let mut ids: Vec<&Vec<u8>> = next_ids.iter().collect();
            ids.sort();
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            ids.hash(&mut hasher);
            hasher.finish()
        };
        let seen = match &self.held {
            Some((fp, hold)) if *fp == fingerprint => hold.cycles_seen + 1,
            _ => 1,
        };
        if seen >= self.confirm_cycles {
            self.release(Some((would_drop, published_ids.len(), seen)));
            return Verdict::Publish;
        }
        let since = match &self.held {
            Some((fp, hold)) if *fp == fingerprint => hold.since.clone(),
            _ => {
                tracing::warn!(
                    would_drop,
                    published = published_ids.len(),
                    "discovery answered that {would_drop} of {} published targets are gone, more \
                     than MAX_DROP_FRACTION ({}): holding the published list until the same \
                     answer is seen {} cycles in a row (a wrong region, account or namespace \
                     list looks like this; see /v1/status)",
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
        self.held = Some((fingerprint, hold.clone()));
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
            .map(|i| Target {
                namespace: "ns".into(),
                service: "svc".into(),
                instance_id: format!("t{i}"),
                source: MetricsSource::App,
                address: format!("10.0.0.{i}:80"),
                labels: Default::default(),
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
    fn a_different_answer_restarts_the_count_and_recovery_ends_the_hold() {
        let mut guard = DropGuard::new(0.5, 2);
        let published = targets(0..10);
        assert!(matches!(
            guard.check(&published, &targets(0..2)),
            Verdict::Hold(_)
        ));
        let Verdict::Hold(hold) = guard.check(&published, &targets(0..3)) else {
            panic!("a different answer must not be confirmed by the first");
        };
        assert_eq!(hold.cycles_seen, 1);
        assert_eq!(guard.check(&published, &published), Verdict::Publish);
        assert!(guard.hold().is_none());
    }

    #[test]
    fn small_drops_label_changes_and_a_disabled_guard_pass() {
        let mut guard = DropGuard::new(0.5, 3);
        let published = targets(0..10);
        assert_eq!(guard.check(&published, &targets(0..5)), Verdict::Publish);
        let mut relabelled = published.clone();
        for t in &mut relabelled {
            t.labels.insert("team".into(), "x".into());
        }
        assert_eq!(guard.check(&published, &relabelled), Verdict::Publish);
        assert_eq!(guard.check(&[], &[]), Verdict::Publish);
        for mut off in [DropGuard::new(0.0, 3), DropGuard::new(0.5, 0)] {
            assert_eq!(off.check(&published, &[]), Verdict::Publish);
        }
    }
}
