//! What a discovery loop does with each cycle's result: warn about new data
//! problems, judge the list against the last one (see [`DropGuard`]), publish it
//! (served as is in single-replica mode, handed to the assignment by the
//! leader), and record the cycle on `/v1/status` and in the metrics.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use std::time::SystemTime;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::guard::{self, DropGuard, Verdict};
use super::{CycleReport, Discoverer, ServiceKey};
use crate::events::{Batch, EcsService, EventsSource, Health, Rechecks};
use crate::state::{EventsStatus, LastDiscovery, Shared};
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
    /// What the last cycle published: what publications on events are judged
    /// against, so that drops on events do not add up past the guard's bound.
    swept: Option<Arc<Vec<Target>>>,
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
            swept: None,
            known_problems: BTreeSet::new(),
        }
    }
}

/// How a leader's discovery loops run, term after term.
#[derive(Clone, Debug)]
pub struct DiscoverySettings {
    pub options: super::DiscoveryOptions,
    /// Time between cycles (the safety net with events).
    pub interval: Duration,
    pub events: Option<EventsSource>,
}

/// Runs discovery cycles every `interval` and hands their targets to
/// `publisher`. With `events`, also reads the ECS task events queue and re-reads
/// the services they name at once; a cycle then is the safety net, run every
/// `interval` while the queue is read and every `events.fallback` while it
/// cannot be.
pub async fn discovery_loop(
    mut discoverer: Discoverer,
    shared: Arc<Shared>,
    interval: Duration,
    shutdown: CancellationToken,
    mut publisher: Publisher,
    events: Option<EventsSource>,
) {
    let mut events = events.map(|source| Reactor::start(source, &shared, &shutdown));
    let mut next_cycle = tokio::time::Instant::now();
    // When the last cycle started; none before the first.
    let mut last_cycle: Option<tokio::time::Instant> = None;
    // Until a first list is published, a cycle that could not complete is
    // tried again soon, backing off to the period: a new leader whose first
    // cycle met an AWS blip must not wait a whole safety-net interval.
    let mut first_retry = FIRST_RETRY;
    // The next cycle is such a retry.
    let mut retrying = false;
    loop {
        let recheck_at = events.as_ref().and_then(|e| e.rechecks.next_due());
        let (batches, health) = match events.as_mut() {
            Some(reactor) => (Some(&mut reactor.batches), Some(&mut reactor.health)),
            None => (None, None),
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next_cycle) => {
                let started = tokio::time::Instant::now();
                last_cycle = Some(started);
                // Judged against what the last cycle published, so that drops
                // on events and this cycle's add up to one drop.
                publisher.cycle_start = publisher
                    .swept
                    .clone()
                    .or_else(|| publisher.baseline().cloned());
                let mut progress = |d: &mut Discoverer| publisher.progress(d, &shared);
                let report = tokio::select! {
                    report = discoverer.run_cycle_with(&mut progress) => report,
                    _ = shutdown.cancelled() => return,
                };
                publish_cycle(&mut discoverer, &report, &shared, &mut publisher);
                let period = period(interval, events.as_ref());
                // Only a discovery not complete yet: a complete one held by
                // the drop guard waits its cycles as any other.
                retrying = publisher.published.is_none() && !report.publishable;
                next_cycle = if retrying {
                    let retry = first_retry.min(period);
                    first_retry = (first_retry * 2).min(period);
                    tokio::time::Instant::now() + retry
                } else {
                    started + period
                };
            }
            Some(batch) = next_batch(batches) => {
                if let Some(reactor) = events.as_mut() {
                    tokio::select! {
                        _ = reactor.on_events(batch, &mut discoverer, &mut publisher, &shared) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            _ = sleep_until_some(recheck_at), if recheck_at.is_some() => {
                if let Some(reactor) = events.as_mut() {
                    tokio::select! {
                        _ = reactor.on_rechecks(&mut discoverer, &mut publisher, &shared) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
            Some(()) = health_changed(health) => {
                // Falling back polls sooner; recovering goes back to the safety net.
                if let Some(reactor) = &events {
                    let state = EventsStatus::of(&reactor.health.borrow());
                    shared.update_status(|s| s.events = Some(state));
                }
                // Before the first cycle, that one comes first, at once; a
                // retry keeps its time if sooner.
                if let Some(started) = last_cycle {
                    let normal = started + period(interval, events.as_ref());
                    next_cycle = if retrying { next_cycle.min(normal) } else { normal };
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The first wait before a cycle again while nothing was published yet.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// Time between cycles: `interval`, or the fallback while events cannot be read.
fn period(interval: Duration, events: Option<&Reactor>) -> Duration {
    match events {
        Some(reactor) if reactor.health.borrow().is_fallback() => reactor.fallback.min(interval),
        _ => interval,
    }
}

async fn next_batch(batches: Option<&mut mpsc::Receiver<Batch>>) -> Option<Batch> {
    match batches {
        Some(batches) => batches.recv().await,
        None => std::future::pending().await,
    }
}

async fn health_changed(health: Option<&mut watch::Receiver<Health>>) -> Option<()> {
    match health {
        Some(health) => health.changed().await.ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The event-driven side of a discovery loop: the queue's consumer (stopped
/// with the loop), the services to check again, the batches waiting for their
/// checks to end, and the fallback period.
struct Reactor {
    batches: mpsc::Receiver<Batch>,
    health: watch::Receiver<Health>,
    rechecks: Rechecks,
    /// ECS services no instance named, when the namespaces were last listed
    /// for them and the services that may hold their first instance: listed
    /// again at most every [`UNKNOWN_RELIST`], those services read meanwhile.
    unknown: HashMap<EcsService, (std::time::Instant, Vec<ServiceKey>)>,
    fallback: Duration,
    shared: Arc<Shared>,
    _consumer: tokio_util::sync::DropGuard,
}

/// Least time between two listings of the namespaces' services for an ECS
/// service no instance names (its tasks' events keep coming, e.g. the
/// collectors' own service, which is in no namespace).
const UNKNOWN_RELIST: Duration = Duration::from_secs(30);

impl Reactor {
    fn start(source: EventsSource, shared: &Arc<Shared>, shutdown: &CancellationToken) -> Reactor {
        let (tx, batches) = mpsc::channel(16);
        let (health_tx, health) = watch::channel(Health::Starting);
        let stop = shutdown.child_token();
        let fallback = source.fallback;
        shared.update_status(|s| s.events = Some(EventsStatus::of(&Health::Starting)));
        tokio::spawn(crate::events::consume(
            source,
            tx,
            health_tx,
            shared.metrics.clone(),
            stop.clone(),
        ));
        Reactor {
            batches,
            health,
            rechecks: Rechecks::default(),
            unknown: HashMap::new(),
            fallback,
            shared: shared.clone(),
            _consumer: stop.drop_guard(),
        }
    }

    /// Re-reads the services a batch of events names (after a short wait for
    /// the rest of a burst), publishes what changed, schedules checks of them,
    /// and answers each batch: handled when every read succeeded (its messages
    /// are then deleted; the checks after it are this leader's, and a new
    /// leader's first cycle reads everything anyway), else not (they come back).
    async fn on_events(
        &mut self,
        first: Batch,
        discoverer: &mut Discoverer,
        publisher: &mut Publisher,
        shared: &Shared,
    ) {
        tokio::time::sleep(DEBOUNCE).await;
        let mut batches = vec![first];
        while let Ok(more) = self.batches.try_recv() {
            batches.push(more);
        }
        let oldest = batches.iter().filter_map(|b| b.oldest).min();
        let named: BTreeSet<EcsService> = batches
            .iter()
            .flat_map(|b| b.services.iter().cloned())
            .collect();
        let (mut found, unknown): (BTreeMap<EcsService, Vec<ServiceKey>>, Vec<EcsService>) =
            crate::cpu_bound(|| {
                let mut found = BTreeMap::new();
                let mut unknown = Vec::new();
                for ecs in &named {
                    let keys = discoverer.services_of(ecs);
                    if keys.is_empty() {
                        unknown.push(ecs.clone());
                    } else {
                        found.insert(ecs.clone(), keys);
                    }
                }
                (found, unknown)
            });
        let now = std::time::Instant::now();
        self.unknown
            .retain(|_, (at, _)| now.duration_since(*at) < UNKNOWN_RELIST);
        let mut relist = Vec::new();
        for ecs in unknown {
            match self.unknown.get(&ecs) {
                Some((_, candidates)) => {
                    found.insert(ecs, candidates.clone());
                }
                None => relist.push(ecs),
            }
        }
        let mut handled = true;
        if !relist.is_empty() {
            let (candidates, errors) = discoverer.services_without_instances().await;
            log_errors(&errors);
            handled &= errors.is_empty();
            for ecs in relist {
                if errors.is_empty() {
                    self.unknown.insert(ecs.clone(), (now, candidates.clone()));
                }
                found.insert(ecs, candidates.clone());
            }
        }
        let wanted: BTreeSet<ServiceKey> = found.values().flatten().cloned().collect();
        for key in &wanted {
            self.rechecks.start(key.clone(), now, oldest);
        }
        handled &= self
            .refresh(&wanted, oldest, discoverer, publisher, shared)
            .await;
        for batch in batches {
            let _ = batch.handled.send(handled);
        }
    }

    /// Reads again the services due for a check.
    async fn on_rechecks(
        &mut self,
        discoverer: &mut Discoverer,
        publisher: &mut Publisher,
        shared: &Shared,
    ) {
        let (due, oldest) = self.rechecks.take_due(std::time::Instant::now());
        if !due.is_empty() {
            // A failure is tried again at the next check or cycle.
            let _ = self
                .refresh(&due, oldest, discoverer, publisher, shared)
                .await;
        }
    }

    /// Re-reads `wanted` and publishes what changed; returns whether every
    /// read succeeded.
    async fn refresh(
        &mut self,
        wanted: &BTreeSet<ServiceKey>,
        event_time: Option<SystemTime>,
        discoverer: &mut Discoverer,
        publisher: &mut Publisher,
        shared: &Shared,
    ) -> bool {
        shared
            .metrics
            .targeted_refreshes
            .inc_by(wanted.len() as u64);
        let errors = discoverer.refresh_some(wanted).await;
        log_errors(&errors);
        if publisher.publish_targeted(discoverer, shared) {
            if let Some(age) = event_time.and_then(|t| SystemTime::now().duration_since(t).ok()) {
                shared
                    .metrics
                    .event_to_published_seconds
                    .observe(age.as_secs_f64());
            }
        }
        errors.is_empty()
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        // No longer reading (the term ended, or the loop stopped).
        self.shared.update_status(|s| s.events = None);
        self.shared.metrics.events_fallback.set(0);
    }
}

/// How long the loop waits after a first event for the rest of its burst (a
/// deploy starts and stops many tasks at once).
pub const DEBOUNCE: Duration = Duration::from_millis(200);

fn log_errors(errors: &[crate::aws::AwsCallError]) {
    if let Some(first) = errors.first() {
        tracing::warn!(
            failed_calls = errors.len(),
            "re-reading services named by ECS task events: {first}; the next check or cycle \
             tries again"
        );
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
    let may_publish = publisher.published.is_some() || report.publishable;
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
            "not serving discovered targets yet: waiting for {}",
            report
                .waiting_for
                .as_deref()
                .unwrap_or("discovery to complete")
        );
    }
    if !unchanged {
        // A list was built (and, single, rendered): its transient buffers are free now.
        crate::release_free_memory();
    }
    publisher.swept = publisher.published.clone();
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

    /// After services were re-read on events: publishes what is known now,
    /// targets gone included when the drop is within the guard's bound (else
    /// they are kept, for the cycles to judge). Returns whether what is
    /// published changed.
    fn publish_targeted(&mut self, discoverer: &mut Discoverer, shared: &Shared) -> bool {
        let Some(published) = self.published.clone() else {
            return false; // the first complete cycle publishes first
        };
        let built = crate::cpu_bound(|| discoverer.targets());
        if Arc::ptr_eq(&published, &built.targets) {
            return false;
        }
        let list = crate::cpu_bound(|| {
            let baseline = self.swept.as_ref().unwrap_or(&published);
            if self.guard.hold().is_none() && self.guard.allows(baseline, &built.targets) {
                built.targets.clone()
            } else {
                guard::with_gone_kept(&published, &built.targets)
                    .map_or_else(|| built.targets.clone(), Arc::new)
            }
        });
        let changed = self.send(list.clone(), shared);
        if changed {
            tracing::info!(
                targets = list.len(),
                previous = published.len(),
                "targets changed on ECS task events"
            );
        }
        shared
            .metrics
            .targets_discovered
            .set(built.targets.len() as i64);
        self.published = Some(list);
        crate::release_free_memory();
        changed
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
    if let Some(rules) = &report.rules {
        shared.record_rules(rules);
    }
    shared.update_status(|status| {
        status.drop_hold = hold;
        status.last_discovery = Some(LastDiscovery {
            time: time.clone(),
            outcome: report.outcome(),
            duration_ms: report.duration_ms,
            stretch_ms: report.stretch_ms,
            pace_rps: pace.filter(|r| r.is_finite()),
            aws_requests: report.aws_requests,
            ecs_requests: report.ecs_requests,
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
