//! What a discovery loop does with each cycle's result: warn about new data
//! problems, judge the list against the last one (see [`DropGuard`]), publish it
//! (served as is in single-replica mode, handed to the assignment by the
//! leader), and record the cycle on `/v1/status` and in the metrics.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::guard::{self, DropGuard, Verdict};
use super::{CycleReport, Discoverer};
use crate::state::{LastDiscovery, Shared};
use crate::targets::{Body, Target};

/// Where a discovery loop's targets go.
pub enum Sink {
    /// Single-replica mode: serve them.
    Serve,
    /// Leader: hand each complete result to the assignment.
    Leader(watch::Sender<Option<Arc<Vec<Target>>>>),
}

/// What a discovery loop carries from cycle to cycle besides the discovery caches.
pub struct Publisher {
    sink: Sink,
    guard: DropGuard,
    /// The last list this loop published.
    published: Option<Arc<Vec<Target>>>,
    /// What is served before this loop's first publication (a new leader's
    /// inherited assignment): the guard's baseline until then.
    inherited: Option<Arc<Vec<Target>>>,
    /// What was published when the current cycle started: the guard judges every
    /// list of the cycle, those published as services are read included, against
    /// it, so a drop spread over a cycle's turns counts as one.
    cycle_start: Option<Arc<Vec<Target>>>,
    known_problems: BTreeSet<String>,
}

impl Publisher {
    pub fn new(sink: Sink, guard: DropGuard, inherited: Option<Arc<Vec<Target>>>) -> Self {
        Publisher {
            sink,
            guard,
            published: None,
            inherited,
            cycle_start: None,
            known_problems: BTreeSet::new(),
        }
    }
}

/// Runs discovery cycles every `interval` and hands their targets to `publisher`.
pub async fn discovery_loop(
    mut discoverer: Discoverer,
    shared: Arc<Shared>,
    interval: Duration,
    shutdown: CancellationToken,
    mut publisher: Publisher,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        publisher.cycle_start = publisher.baseline().cloned();
        let mut progress = |d: &mut Discoverer| publisher.progress(d, &shared);
        let report = tokio::select! {
            report = discoverer.run_cycle_with(&mut progress) => report,
            _ = shutdown.cancelled() => return,
        };
        publish_cycle(&mut discoverer, &report, &shared, &mut publisher);
    }
}

/// Publishes the targets after a cycle and records its status. The first list is
/// published only once every configured part has been read; after that the list
/// is always published (failed parts keep their previous targets), unless it
/// would drop most published targets (see [`DropGuard`]).
fn publish_cycle(
    discoverer: &mut Discoverer,
    report: &CycleReport,
    shared: &Shared,
    publisher: &mut Publisher,
) {
    let built = crate::cpu_bound(|| discoverer.targets());
    publisher.log_problems(&built.problems);
    // The very list published last, and no drop on hold: nothing to judge or publish.
    let unchanged = publisher
        .published
        .as_ref()
        .is_some_and(|p| Arc::ptr_eq(p, &built.targets))
        && publisher.guard.hold().is_none();
    let may_publish = publisher.published.is_some() || report.complete;
    if may_publish && !unchanged {
        let previous = publisher.baseline().map_or(0, |b| b.len());
        if publisher.publish(&built.targets, shared) {
            tracing::info!(
                cycle = report.cycle,
                targets = built.targets.len(),
                previous,
                "targets changed"
            );
        }
    } else if !may_publish {
        tracing::warn!(
            cycle = report.cycle,
            "not serving discovered targets yet: discovery has not read every configured namespace \
             and service"
        );
    }
    if !unchanged {
        // A list was built (and, single, rendered): its transient buffers are free now.
        crate::release_free_memory();
    }
    record_cycle(discoverer, report, shared, publisher, &built);
}

impl Publisher {
    /// During a cycle: publishes what is known now if it changed, once a first
    /// list was published, keeping the targets gone: those wait for the end of
    /// the cycle, where the guard judges the whole cycle's drop at once (a drop
    /// spread over the cycle's turns is one drop), and meanwhile are served a
    /// little longer: a duplicate, never a gap.
    fn progress(&mut self, discoverer: &mut Discoverer, shared: &Shared) {
        let Some(published) = self.published.clone() else {
            return;
        };
        if self.guard.hold().is_some() {
            return;
        }
        let built = crate::cpu_bound(|| discoverer.targets());
        if Arc::ptr_eq(&published, &built.targets) {
            return;
        }
        let list = crate::cpu_bound(|| {
            guard::with_gone_kept(&published, &built.targets)
                .map_or_else(|| built.targets.clone(), Arc::new)
        });
        if self.send(list.clone(), shared) {
            tracing::info!(
                targets = list.len(),
                previous = published.len(),
                "targets changed during the cycle"
            );
        }
        self.published = Some(list);
        crate::release_free_memory();
    }

    /// Logs the data problems that appeared since the last cycle, and those gone.
    fn log_problems(&mut self, found: &[crate::targets::Problem]) {
        let problems: BTreeSet<String> = found.iter().map(ToString::to_string).collect();
        for new in problems.difference(&self.known_problems) {
            tracing::warn!("{new}");
        }
        for gone in self.known_problems.difference(&problems) {
            tracing::info!("resolved: {gone}");
        }
        self.known_problems = problems;
    }

    /// What the guard compares a new list with: the last list published, else
    /// what is served before this loop's first publication.
    fn baseline(&self) -> Option<&Arc<Vec<Target>>> {
        self.published.as_ref().or(self.inherited.as_ref())
    }

    /// Judges `targets` against the baseline and publishes them, or, while a
    /// drop is held, the union of both (never less than was published). Returns
    /// whether what is published changed.
    fn publish(&mut self, targets: &Arc<Vec<Target>>, shared: &Shared) -> bool {
        let baseline = self
            .cycle_start
            .clone()
            .or_else(|| self.baseline().cloned());
        let verdict = match &baseline {
            Some(baseline) => self.guard.check(baseline, targets),
            None => Verdict::Publish,
        };
        let (list, confirmed) = match (&verdict, &baseline) {
            (Verdict::Hold(_), Some(baseline)) => {
                (Arc::new(guard::union(baseline, targets)), false)
            }
            _ => (targets.clone(), true),
        };
        let changed = self.send(list.clone(), shared);
        if confirmed {
            self.published = Some(list);
        }
        changed
    }

    /// Serves `list` (single mode) or hands it to the assignment (leader).
    /// Returns whether it differs from what was.
    fn send(&self, list: Arc<Vec<Target>>, shared: &Shared) -> bool {
        match &self.sink {
            Sink::Serve => shared.publish(crate::cpu_bound(|| {
                Body::render_with(list.iter(), shared.meta_labels)
            })),
            Sink::Leader(tx) => tx.send_if_modified(|current| {
                let differs = current
                    .as_ref()
                    .is_none_or(|c| !Arc::ptr_eq(c, &list) && **c != *list);
                if differs {
                    *current = Some(list.clone());
                }
                differs
            }),
        }
    }
}

/// Records a cycle on `/v1/status` and in the metrics.
fn record_cycle(
    discoverer: &Discoverer,
    report: &CycleReport,
    shared: &Shared,
    publisher: &Publisher,
    built: &crate::targets::BuildOutput,
) {
    let hold = publisher.guard.hold().cloned();
    shared.metrics.drop_hold.set(i64::from(hold.is_some()));
    tracing::debug!(
        cycle = report.cycle,
        outcome = report.outcome(),
        duration_ms = report.duration_ms,
        aws_requests = report.aws_requests,
        services_refreshed = report.services_refreshed,
        "discovery cycle done"
    );
    let metrics = &shared.metrics;
    metrics.targets_discovered.set(built.targets.len() as i64);
    metrics
        .discovery_cycle_seconds
        .observe(report.duration_ms as f64 / 1000.0);
    metrics
        .discovery_cycle_stretch_seconds
        .set(report.stretch_ms as f64 / 1000.0);
    let pacer = &discoverer.aws().pacer;
    let pace = pacer.max_rps().map(|_| pacer.rate());
    if let Some(rate) = pace {
        metrics.aws_pace_rps.set(rate);
    }
    if report.errors.is_empty() {
        let unix = report
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        metrics.last_discovery_success.set(unix.as_secs_f64());
    }
    let time = humantime::format_rfc3339_millis(report.started).to_string();
    shared.update_status(|status| {
        status.drop_hold = hold;
        status.last_discovery = Some(LastDiscovery {
            time: time.clone(),
            outcome: report.outcome(),
            duration_ms: report.duration_ms,
            stretch_ms: report.stretch_ms,
            pace_rps: pace.filter(|r| r.is_finite()),
            aws_requests: report.aws_requests,
            services_refreshed: report.services_refreshed,
            errors: report.errors.clone(),
        });
        if report.errors.is_empty() {
            status.last_success = Some(time);
        }
        status.namespaces = report.namespaces.clone();
        status.problems = publisher.known_problems.iter().cloned().collect();
        status.skipped_instances = built.skipped_without_ipv4;
    });
}
