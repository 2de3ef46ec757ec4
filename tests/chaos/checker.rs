//! The campaign's checker, pure: it is fed what every replica's http_sd answered,
//! the registered set and the fault windows, and holds them to the invariants.
//!
//! Collectors are modelled the way Prometheus reads http_sd: a 200 replaces a
//! collector's list, any other answer (or none) keeps it. A collector lives as
//! long as its task: it is gone at once after a SIGKILL, and when shard-sd exits
//! after a SIGTERM.
//!
//! - A target that has been served is *uncovered* while no collector holds it.
//!   That may last at most `Bounds::gap`; time in a window that blinds
//!   coordination (DynamoDB unreachable to every replica, plus its tail) does not
//!   count, because nobody can then learn that a holder died. The bound is for one
//!   failure: when the replica that took over the target's slot (per the lease
//!   table, read directly) is itself killed, paused or stopped during the gap, the
//!   bound counts again from that failure.
//! - A target registered (or whose namespace was added) and not served yet is
//!   *pending*: at most `Bounds::pending`, not counting time in windows that
//!   blind discovery (Cloud Map or SSM faults, an impaired leader) or coordination.
//! - A target in two collectors' lists longer than `Bounds::duplicate` must
//!   overlap a window that explains it (DynamoDB faults, pauses); those runs are
//!   reported per fault kind.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

/// What a fault window excuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blind {
    /// Nothing: it is only reported.
    Nothing,
    /// New registrations may wait (Cloud Map or SSM faults, the leader impaired).
    Discovery,
    /// Nobody can learn who holds what (DynamoDB unreachable to every replica).
    Coordination,
}

#[derive(Clone, Debug)]
pub struct Window {
    pub kind: String,
    /// The replica a process fault hit, if the window stops it serving.
    pub victim: Option<String>,
    pub start: Instant,
    pub end: Option<Instant>,
    /// How long its effect outlasts it (retries in flight, leases to expire).
    pub tail: Duration,
    pub blind: Blind,
    /// Whether it explains a long duplicate (DynamoDB faults, pauses).
    pub explains_duplicates: bool,
}

impl Window {
    fn span(&self, now: Instant) -> (Instant, Instant) {
        (self.start, self.end.unwrap_or(now) + self.tail)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub gap: Duration,
    pub pending: Duration,
    pub duplicate: Duration,
}

#[derive(Debug)]
struct TargetState {
    expected: bool,
    /// Served by some collector since it was last expected.
    seen: bool,
    /// The slot whose holder served it when it was last held.
    last_slot: Option<u32>,
    /// Start of the current uncovered (or pending) run, and the slot it was lost with.
    missing_since: Option<Instant>,
    lost_slot: Option<u32>,
    dup_since: Option<Instant>,
    flagged: bool,
    /// When it was last expected (registered, or its namespace added back).
    expected_since: Option<Instant>,
    /// How long it may be pending.
    pending_bound: Duration,
}

/// Runs of time, by fault kind: the worst (longest) one and how many.
#[derive(Clone, Debug, Default)]
pub struct Worst(pub BTreeMap<String, (Duration, u64)>);

impl Worst {
    fn record(&mut self, kinds: &[String], len: Duration) {
        for kind in kinds {
            let entry = self.0.entry(kind.clone()).or_default();
            entry.0 = entry.0.max(len);
            entry.1 += 1;
        }
    }

    pub fn render(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(k, (d, n))| format!("{k}: {:.2}s ({n} runs)", d.as_secs_f64()))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

pub struct Checker {
    pub bounds: Bounds,
    start: Instant,
    collectors: BTreeMap<String, BTreeSet<String>>,
    /// When each collector's list was last replaced (a 200).
    received: BTreeMap<String, Instant>,
    targets: BTreeMap<String, TargetState>,
    /// Holder of each slot over time, as the lease table said (changes only).
    holders: Vec<(Instant, BTreeMap<u32, String>)>,
    pub windows: Vec<Window>,
    pub violations: Vec<String>,
    /// Uncovered runs of served targets.
    pub worst_gap: Worst,
    /// Registration (or namespace added) to first served.
    pub worst_pending: Worst,
    pub worst_dup: Worst,
    pub samples: u64,
    pub timeline: Vec<(Duration, String)>,
    last_counts: (usize, usize),
    /// The collectors that last held each target twice.
    last_dup_holders: BTreeMap<String, Vec<String>>,
}

/// Length of the union of `spans` within `[from, to]`.
fn covered(mut spans: Vec<(Instant, Instant)>, from: Instant, to: Instant) -> Duration {
    spans.sort();
    let mut total = Duration::ZERO;
    let mut reach = from;
    for (s, e) in spans {
        let (s, e) = (s.max(reach), e.min(to));
        if e > s {
            total += e - s;
            reach = e;
        }
    }
    total
}

impl Checker {
    pub fn new(bounds: Bounds, start: Instant) -> Self {
        Checker {
            bounds,
            start,
            collectors: BTreeMap::new(),
            received: BTreeMap::new(),
            targets: BTreeMap::new(),
            holders: Vec::new(),
            windows: Vec::new(),
            violations: Vec::new(),
            worst_gap: Worst::default(),
            worst_pending: Worst::default(),
            worst_dup: Worst::default(),
            samples: 0,
            timeline: Vec::new(),
            last_counts: (0, 0),
            last_dup_holders: BTreeMap::new(),
        }
    }

    /// Forgets the runs seen so far (the cluster's start-up is not part of the campaign).
    pub fn reset_reports(&mut self) {
        self.worst_gap = Worst::default();
        self.worst_pending = Worst::default();
        self.worst_dup = Worst::default();
    }

    pub fn note(&mut self, now: Instant, what: impl Into<String>) {
        self.timeline
            .push((now.saturating_duration_since(self.start), what.into()));
    }

    /// `target` is registered in a discovered namespace from `now` on.
    pub fn expect(&mut self, target: &str, now: Instant) {
        self.expect_within(target, now, self.bounds.pending);
    }

    /// [`Checker::expect`], with a pending bound of its own (a registration
    /// nothing announces waits for a discovery cycle).
    pub fn expect_within(&mut self, target: &str, now: Instant, pending_bound: Duration) {
        let state = self
            .targets
            .entry(target.to_owned())
            .or_insert(TargetState {
                expected: false,
                seen: false,
                last_slot: None,
                missing_since: None,
                lost_slot: None,
                dup_since: None,
                flagged: false,
                expected_since: None,
                pending_bound,
            });
        if !state.expected {
            *state = TargetState {
                expected: true,
                seen: false,
                last_slot: None,
                missing_since: Some(now),
                lost_slot: None,
                dup_since: state.dup_since,
                flagged: false,
                expected_since: Some(now),
                pending_bound,
            };
        }
    }

    /// `target` was deregistered, or its namespace removed from the list.
    pub fn unexpect(&mut self, target: &str) {
        if let Some(state) = self.targets.get_mut(target) {
            state.expected = false;
            state.missing_since = None;
        }
    }

    pub fn expected(&self) -> BTreeSet<String> {
        self.targets
            .iter()
            .filter(|(_, s)| s.expected)
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// What the collectors hold together.
    pub fn union(&self) -> BTreeSet<String> {
        self.collectors.values().flatten().cloned().collect()
    }

    /// The collectors holding `target`.
    pub fn holders(&self, target: &str) -> Vec<String> {
        self.collectors
            .iter()
            .filter(|(_, list)| list.contains(target))
            .map(|(id, _)| id.clone())
            .collect()
    }

    pub fn add_collector(&mut self, id: &str) {
        self.collectors.insert(id.to_owned(), BTreeSet::new());
    }

    pub fn remove_collector(&mut self, id: &str) {
        self.collectors.remove(id);
        self.received.remove(id);
    }

    pub fn open(
        &mut self,
        kind: impl Into<String>,
        now: Instant,
        tail: Duration,
        blind: Blind,
        explains_duplicates: bool,
    ) -> usize {
        self.open_on(kind, None, now, tail, blind, explains_duplicates)
    }

    /// A window of a fault that stops `victim` serving (SIGKILL, SIGTERM, SIGSTOP).
    pub fn open_on(
        &mut self,
        kind: impl Into<String>,
        victim: Option<&str>,
        now: Instant,
        tail: Duration,
        blind: Blind,
        explains_duplicates: bool,
    ) -> usize {
        self.windows.push(Window {
            kind: kind.into(),
            victim: victim.map(str::to_owned),
            start: now,
            end: None,
            tail,
            blind,
            explains_duplicates,
        });
        self.windows.len() - 1
    }

    pub fn close(&mut self, window: usize, now: Instant) {
        if let Some(w) = self.windows.get_mut(window) {
            w.end.get_or_insert(now);
        }
    }

    /// Kinds of the windows in effect when a run that lasted until `to` began at `from`.
    fn kinds(&self, from: Instant, to: Instant) -> Vec<String> {
        let mut kinds: Vec<String> = self
            .windows
            .iter()
            .filter(|w| {
                let (s, e) = w.span(to);
                s <= from && e >= from
            })
            .map(|w| w.kind.clone())
            .collect();
        kinds.sort();
        kinds.dedup();
        if kinds.is_empty() {
            kinds.push("no fault".into());
        }
        kinds
    }

    /// Records who holds each slot now (read from the lease table).
    pub fn holders_now(&mut self, now: Instant, holders: BTreeMap<u32, String>) {
        if self.holders.last().map(|(_, h)| h) != Some(&holders) {
            self.holders.push((now, holders));
        }
    }

    /// Whether `replica` held `slot` around `at` (within a second either way, the
    /// lease table being read once a sample).
    fn held_around(&self, replica: &str, slot: u32, at: Instant) -> bool {
        let margin = Duration::from_secs(1);
        let before = at.checked_sub(margin).unwrap_or(at);
        let in_force = self.holders.iter().rev().find(|(t, _)| *t <= before);
        in_force
            .into_iter()
            .chain(
                self.holders
                    .iter()
                    .filter(|(t, _)| *t + margin >= at && *t <= at + margin),
            )
            .any(|(_, h)| h.get(&slot).map(String::as_str) == Some(replica))
    }

    /// The start of a run lost with `slot`, moved up to the last failure, during
    /// the run, of a replica that held that slot (a successor that failed too).
    fn restart(&self, since: Instant, now: Instant, slot: Option<u32>) -> Instant {
        let Some(slot) = slot else {
            return since;
        };
        self.windows
            .iter()
            .filter(|w| w.start > since && w.start <= now)
            .filter(|w| {
                w.victim
                    .as_deref()
                    .is_some_and(|v| self.held_around(v, slot, w.start))
            })
            .map(|w| w.start)
            .max()
            .unwrap_or(since)
    }

    /// The part of `[from, to]` that counts against a bound.
    fn counted(&self, from: Instant, to: Instant, pending: bool) -> Duration {
        let exempt: Vec<(Instant, Instant)> = self
            .windows
            .iter()
            .filter(|w| match w.blind {
                Blind::Coordination => true,
                Blind::Discovery => pending,
                Blind::Nothing => false,
            })
            .map(|w| w.span(to))
            .collect();
        to.saturating_duration_since(from)
            .saturating_sub(covered(exempt, from, to))
    }

    /// One sample: `answers` maps each live collector's replica to its http_sd
    /// answer, `Some(list)` for a 200, `None` for anything else.
    pub fn sample(&mut self, now: Instant, answers: BTreeMap<String, Option<BTreeSet<String>>>) {
        self.samples += 1;
        for (id, answer) in answers {
            if let (Some(list), Some(held)) = (answer, self.collectors.get_mut(&id)) {
                *held = list;
                self.received.insert(id, now);
            }
        }
        // Per target, the newest list holding it: a target (re)registered after a
        // collector's list was received is not served by that list (a paused
        // replica's collector keeps what it had before the target went and came
        // back), so it stays pending until a newer list holds it.
        let mut newest: BTreeMap<&str, Instant> = BTreeMap::new();
        for (id, list) in &self.collectors {
            let at = self.received.get(id).copied().unwrap_or(self.start);
            for t in list {
                let e = newest.entry(t.as_str()).or_insert(at);
                *e = (*e).max(at);
            }
        }
        let newest: BTreeMap<String, Instant> =
            newest.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        let mut holders: BTreeMap<&str, usize> = BTreeMap::new();
        for list in self.collectors.values() {
            for t in list {
                *holders.entry(t.as_str()).or_default() += 1;
            }
        }
        let holders: BTreeMap<String, usize> = holders
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        // The slot each target is served for, by its collector's replica, per the
        // lease table now.
        let slot_of: BTreeMap<&str, u32> = self
            .holders
            .last()
            .map(|(_, h)| h.iter().map(|(s, id)| (id.as_str(), *s)).collect())
            .unwrap_or_default();
        let mut served_slot: BTreeMap<String, u32> = BTreeMap::new();
        for (id, list) in &self.collectors {
            if let Some(slot) = slot_of.get(id.as_str()) {
                for t in list {
                    served_slot.entry(t.clone()).or_insert(*slot);
                }
            }
        }
        let mut events = Vec::new();
        let (mut missing, mut twice) = (0, 0);
        let names: Vec<String> = self.targets.keys().cloned().collect();
        for name in names {
            let count = holders.get(&name).copied().unwrap_or(0);
            // Duplicates, expected or not.
            if count >= 2 {
                twice += 1;
                let who = self.holders(&name);
                self.last_dup_holders.insert(name.clone(), who);
                if self.targets[&name].dup_since.is_none() {
                    self.targets.get_mut(&name).unwrap().dup_since = Some(now);
                }
            } else if let Some(since) = self.targets.get_mut(&name).unwrap().dup_since.take() {
                events.push(self.end_duplicate(&name, since, now));
            }
            let state = &self.targets[&name];
            if !state.expected {
                continue;
            }
            if count == 0 {
                missing += 1;
                let state = self.targets.get_mut(&name).unwrap();
                if state.missing_since.is_none() {
                    state.lost_slot = state.last_slot;
                }
                let since = *state.missing_since.get_or_insert(now);
                self.check_open_gap(&name, since, now);
            } else {
                let state = self.targets.get_mut(&name).unwrap();
                let fresh = newest
                    .get(&name)
                    .is_some_and(|at| state.expected_since.is_none_or(|e| *at >= e));
                if !state.seen && !fresh {
                    let since = *state.missing_since.get_or_insert(now);
                    self.check_open_gap(&name, since, now);
                    continue;
                }
                let pending = !state.seen;
                state.seen = true;
                state.flagged = false;
                if let Some(slot) = served_slot.get(&name) {
                    state.last_slot = Some(*slot);
                }
                if let Some(since) = state.missing_since.take() {
                    self.end_gap(&name, since, now, pending);
                }
            }
        }
        for event in events.into_iter().flatten() {
            self.violations.push(event);
        }
        if (missing, twice) != self.last_counts {
            self.last_counts = (missing, twice);
            self.note(
                now,
                format!(
                    "sample: {missing} expected targets held by no collector, {twice} held twice"
                ),
            );
        }
    }

    fn check_open_gap(&mut self, name: &str, since: Instant, now: Instant) {
        let state = &self.targets[name];
        if state.flagged {
            return;
        }
        let pending = !state.seen;
        let from = if pending {
            since
        } else {
            self.restart(since, now, state.lost_slot)
        };
        let counted = self.counted(from, now, pending);
        let bound = if pending {
            state.pending_bound
        } else {
            self.bounds.gap
        };
        if counted > bound {
            let what = if pending {
                "registered but not served"
            } else {
                "held by no collector"
            };
            let msg = format!(
                "at {:.1}s: {name} {what} for {:.2}s counted ({:.2}s in all), bound {:.2}s; \
                 faults: {}",
                now.saturating_duration_since(self.start).as_secs_f64(),
                counted.as_secs_f64(),
                (now - since).as_secs_f64(),
                bound.as_secs_f64(),
                self.kinds(since, now).join(", ")
            );
            self.note(now, format!("VIOLATION {msg}"));
            self.violations.push(msg);
            self.targets.get_mut(name).unwrap().flagged = true;
        }
    }

    fn end_gap(&mut self, name: &str, since: Instant, now: Instant, pending: bool) {
        let kinds = self.kinds(since, now);
        let from = if pending {
            since
        } else {
            self.restart(since, now, self.targets[name].lost_slot)
        };
        let counted = self.counted(from, now, pending);
        if pending {
            self.worst_pending.record(&kinds, now - since);
        } else {
            self.worst_gap.record(&kinds, now - since);
            self.note(
                now,
                format!(
                    "{name} covered again after {:.2}s ({:.2}s counted; {})",
                    (now - since).as_secs_f64(),
                    counted.as_secs_f64(),
                    kinds.join(", ")
                ),
            );
        }
    }

    /// Ends a duplicate run; returns a violation if nothing explains a long one.
    fn end_duplicate(&mut self, name: &str, since: Instant, now: Instant) -> Option<String> {
        let len = now - since;
        let kinds = self.kinds(since, now);
        self.worst_dup.record(&kinds, len);
        if len <= self.bounds.duplicate {
            return None;
        }
        let explained = self.windows.iter().any(|w| {
            let (s, e) = w.span(now);
            w.explains_duplicates && s <= now && e >= since
        });
        if explained {
            self.note(
                now,
                format!(
                    "{name} held twice for {:.2}s ({})",
                    len.as_secs_f64(),
                    kinds.join(", ")
                ),
            );
            return None;
        }
        let msg = format!(
            "at {:.1}s: {name} held by two collectors for {:.2}s, bound {:.2}s, with no \
             DynamoDB fault or pause to explain it; faults: {}; held twice by {:?}",
            now.saturating_duration_since(self.start).as_secs_f64(),
            len.as_secs_f64(),
            self.bounds.duplicate.as_secs_f64(),
            kinds.join(", "),
            self.last_dup_holders.get(name).cloned().unwrap_or_default()
        );
        self.note(now, format!("VIOLATION {msg}"));
        Some(msg)
    }

    /// Ends open runs at the end of the campaign.
    pub fn finish(&mut self, now: Instant) {
        let names: Vec<String> = self.targets.keys().cloned().collect();
        for name in names {
            if let Some(since) = self.targets.get_mut(&name).unwrap().dup_since.take() {
                if let Some(v) = self.end_duplicate(&name, since, now) {
                    self.violations.push(v);
                }
            }
            let state = self.targets.get_mut(&name).unwrap();
            if let Some(since) = state.missing_since.take().filter(|_| state.expected) {
                let pending = !state.seen;
                self.check_open_gap(&name, since, now);
                self.end_gap(&name, since, now, pending);
            }
        }
        for w in &mut self.windows {
            w.end.get_or_insert(now);
        }
    }

    /// The wall-clock time of the timeline's zero.
    pub fn wall_zero(&self) -> std::time::SystemTime {
        std::time::SystemTime::now() - self.start.elapsed()
    }

    pub fn timeline_text(&self) -> String {
        self.timeline
            .iter()
            .map(|(at, what)| format!("{:>8.2}s  {what}", at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: Bounds = Bounds {
        gap: Duration::from_secs(4),
        pending: Duration::from_secs(6),
        duplicate: Duration::from_secs(5),
    };

    fn answers(lists: &[(&str, Option<&[&str]>)]) -> BTreeMap<String, Option<BTreeSet<String>>> {
        lists
            .iter()
            .map(|(id, l)| {
                (
                    id.to_string(),
                    l.map(|l| l.iter().map(|s| s.to_string()).collect()),
                )
            })
            .collect()
    }

    fn at(t0: Instant, secs: f64) -> Instant {
        t0 + Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_target_back_in_a_list_older_than_its_return_is_still_pending() {
        let t0 = Instant::now();
        let mut c = Checker::new(BOUNDS, t0);
        c.add_collector("a");
        c.add_collector("b");
        c.expect("t1", t0);
        c.sample(
            at(t0, 1.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&[]))]),
        );
        // Its namespace leaves the list, while "a" is paused (answers nothing)
        // and keeps its list; the namespace comes back at 3 s.
        c.unexpect("t1");
        c.sample(at(t0, 2.0), answers(&[("a", None), ("b", Some(&[]))]));
        c.expect("t1", at(t0, 3.0));
        c.sample(at(t0, 3.5), answers(&[("a", None), ("b", Some(&[]))]));
        // "a" resumes and answers without it: served at 8.5 s, 5.5 s after it
        // came back, within the pending bound; not a 4.5 s gap of a target
        // served before.
        c.sample(at(t0, 4.0), answers(&[("a", Some(&[])), ("b", Some(&[]))]));
        c.sample(at(t0, 7.5), answers(&[("a", Some(&[])), ("b", Some(&[]))]));
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        c.sample(
            at(t0, 8.5),
            answers(&[("a", Some(&[])), ("b", Some(&["t1"]))]),
        );
        assert!(c.violations.is_empty(), "{:?}", c.violations);
        // Held since by a list received after its return: a gap from now on.
        c.remove_collector("b");
        c.sample(at(t0, 9.0), answers(&[("a", Some(&[]))]));
        c.sample(at(t0, 13.5), answers(&[("a", Some(&[]))]));
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        assert!(c.violations[0].contains("held by no collector"));
    }

    #[test]
    fn a_target_nobody_holds_past_the_bound_is_a_violation() {
        let t0 = Instant::now();
        let mut c = Checker::new(BOUNDS, t0);
        c.add_collector("a");
        c.add_collector("b");
        c.expect("t1", t0);
        c.sample(
            at(t0, 1.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&[]))]),
        );
        // A non-200 keeps the list: still covered.
        c.sample(at(t0, 2.0), answers(&[("a", None), ("b", Some(&[]))]));
        assert!(c.violations.is_empty());
        // The collector holding it is gone: uncovered from 3 s.
        c.remove_collector("a");
        c.sample(at(t0, 3.0), answers(&[("b", Some(&[]))]));
        c.sample(at(t0, 6.9), answers(&[("b", Some(&[]))]));
        assert!(c.violations.is_empty(), "3.9 s is within the bound");
        c.sample(at(t0, 7.1), answers(&[("b", Some(&[]))]));
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        assert!(c.violations[0].contains("held by no collector"));
    }

    #[test]
    fn coordination_blind_time_does_not_count_and_discovery_faults_excuse_only_pending() {
        let t0 = Instant::now();
        let mut c = Checker::new(BOUNDS, t0);
        c.add_collector("a");
        c.expect("t1", t0);
        c.sample(at(t0, 0.5), answers(&[("a", Some(&["t1"]))]));
        let w = c.open(
            "dynamodb-all",
            at(t0, 1.0),
            Duration::ZERO,
            Blind::Coordination,
            true,
        );
        c.sample(at(t0, 1.0), answers(&[("a", Some(&[]))]));
        c.close(w, at(t0, 6.0));
        c.sample(at(t0, 8.0), answers(&[("a", Some(&[]))]));
        assert!(
            c.violations.is_empty(),
            "2 s counted of 7: {:?}",
            c.violations
        );
        // A Cloud Map fault excuses a new registration, not an uncovered target.
        let w = c.open(
            "cloudmap",
            at(t0, 8.0),
            Duration::ZERO,
            Blind::Discovery,
            false,
        );
        c.expect("t2", at(t0, 8.0));
        c.sample(at(t0, 13.0), answers(&[("a", Some(&[]))]));
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        assert!(c.violations[0].contains("t1"));
        c.close(w, at(t0, 20.0));
        c.sample(at(t0, 20.0), answers(&[("a", Some(&["t1", "t2"]))]));
        assert_eq!(c.violations.len(), 1, "t2 waited only for Cloud Map");
        assert_eq!(c.worst_pending.0["cloudmap"].1, 1);
    }

    #[test]
    fn a_long_duplicate_needs_a_fault_to_explain_it() {
        let t0 = Instant::now();
        let mut c = Checker::new(BOUNDS, t0);
        c.add_collector("a");
        c.add_collector("b");
        c.expect("t1", t0);
        c.sample(
            at(t0, 0.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&["t1"]))]),
        );
        c.sample(
            at(t0, 4.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&[]))]),
        );
        assert!(c.violations.is_empty(), "4 s is within the bound");
        c.sample(
            at(t0, 5.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&["t1"]))]),
        );
        c.sample(
            at(t0, 11.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&[]))]),
        );
        assert_eq!(c.violations.len(), 1, "{:?}", c.violations);
        let w = c.open("pause", at(t0, 12.0), Duration::ZERO, Blind::Nothing, true);
        c.sample(
            at(t0, 12.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&["t1"]))]),
        );
        c.close(w, at(t0, 15.0));
        c.sample(
            at(t0, 19.0),
            answers(&[("a", Some(&["t1"])), ("b", Some(&[]))]),
        );
        assert_eq!(c.violations.len(), 1, "the pause explains it");
        assert_eq!(c.worst_dup.0["pause"].0, Duration::from_secs(7));
    }

    #[test]
    fn a_successor_that_fails_too_restarts_the_bound() {
        let run = |holder_of_slot: &str| {
            let t0 = Instant::now();
            let mut c = Checker::new(BOUNDS, t0);
            c.add_collector("a");
            c.add_collector("b");
            c.expect("t1", t0);
            c.holders_now(t0, BTreeMap::from([(0, "a".to_owned())]));
            c.sample(
                at(t0, 0.1),
                answers(&[("a", Some(&["t1"])), ("b", Some(&[]))]),
            );
            // a dies; b is paused before it serves.
            c.remove_collector("a");
            c.sample(at(t0, 1.0), answers(&[("b", Some(&[]))]));
            c.holders_now(
                at(t0, 3.0),
                BTreeMap::from([(0, holder_of_slot.to_owned())]),
            );
            c.open_on(
                "pause",
                Some("b"),
                at(t0, 3.2),
                Duration::ZERO,
                Blind::Nothing,
                true,
            );
            c.sample(at(t0, 6.0), answers(&[("b", Some(&[]))]));
            let at_6 = c.violations.len();
            c.sample(at(t0, 7.5), answers(&[("b", Some(&[]))]));
            (at_6, c.violations.len())
        };
        // b took the slot: counted from b's pause, 2.8 s then 4.3 s.
        assert_eq!(run("b"), (0, 1));
        // b never held the slot: its pause restarts nothing (5 s, then 6.5 s).
        assert_eq!(run("c"), (1, 1));
    }

    #[test]
    fn union_of_spans() {
        let t0 = Instant::now();
        let s = |a: f64, b: f64| (at(t0, a), at(t0, b));
        let spans = vec![s(1.0, 3.0), s(2.0, 4.0), s(6.0, 7.0)];
        assert_eq!(
            covered(spans, at(t0, 0.0), at(t0, 6.5)),
            Duration::from_millis(3500)
        );
    }
}
