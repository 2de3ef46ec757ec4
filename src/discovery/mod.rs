//! Cloud Map discovery: one cycle reads the namespace list, resolves the
//! namespaces, lists their services and refreshes tags and instances, keeping
//! per-part caches so that an unchanged cycle costs one cheap call per service.
//!
//! Failure model: every part (the namespace list, the namespace index, one
//! namespace's services, one service's tags or instances) keeps its last good
//! value when a call for it fails. A cycle therefore never turns an AWS error into
//! a smaller target list; [`CycleReport::complete`] says whether every configured
//! part has been read at least once, which gates the first publication.

pub mod cloudmap;
pub mod ecs;
pub mod guard;
pub mod namespaces;
pub mod publish;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::aws::pacer::Pacer;
use crate::aws::{AwsCallError, AwsClients};
use crate::events::EcsService;
use crate::targets::{self, BuildOutput, HostPorts, Instance, Interner, ServiceData};
use cloudmap::{NamespaceRef, ServiceRef, DISCOVER_MAX_RESULTS};
use rules::{Rules, RulesReport, Settings};

/// A Cloud Map service: (namespace name, service id).
pub type ServiceKey = (String, String);
use namespaces::NamespaceSource;

/// Which instances `DiscoverInstances` returns, by Cloud Map health status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthStatus {
    Healthy,
    Unhealthy,
    All,
    /// Healthy instances, or all of them when none is healthy.
    HealthyOrElseAll,
}

impl HealthStatus {
    /// As `HEALTH_STATUS` names them.
    pub const NAMES: &'static [&'static str] =
        &["HEALTHY", "UNHEALTHY", "ALL", "HEALTHY_OR_ELSE_ALL"];

    pub fn from_name(name: &str) -> Option<HealthStatus> {
        let all = [
            HealthStatus::Healthy,
            HealthStatus::Unhealthy,
            HealthStatus::All,
            HealthStatus::HealthyOrElseAll,
        ];
        let i = Self::NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(name))?;
        Some(all[i])
    }
}
/// Instances are re-read even with an unchanged revision every this many cycles,
/// because a health change does not bump the revision.
pub const FULL_REFRESH_CYCLES: u64 = 5;
/// Service tags change rarely; they are re-read every this many cycles.
pub const TAG_REFRESH_CYCLES: u64 = 5;

#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    pub source: NamespaceSource,
    pub health: HealthStatus,
    /// Services refreshed at once.
    pub concurrency: usize,
    /// The refresh interval, over which a complete discovery spreads its calls
    /// when `spread`; zero: no spreading.
    pub interval: Duration,
    /// Off with events: a sweep then goes as fast as the pacer allows, so that
    /// events wait for it as little as possible.
    pub spread: bool,
    /// With `DISCOVERY_RULES_PARAMETER_NAME`: the process's discovery rules.
    pub rules: Option<rules::RulesKeeper>,
}

/// What is called with the discoverer when services changed during a cycle.
pub type Progress<'a> = &'a mut (dyn FnMut(&mut Discoverer) + Send);

/// Least time between two calls of a cycle's progress, and how many times the
/// last call's own duration it must also leave (a large list costs more to
/// build and assign: fewer mid-cycle publications).
pub const PROGRESS_SPACING: Duration = Duration::from_secs(1);
const PROGRESS_COST_FACTOR: u32 = 10;

/// The part of the refresh interval over which a cycle spreads its service
/// refreshes, leaving room for the pacer's own delays.
pub const SPREAD_FRACTION: f64 = 0.8;

#[derive(Clone, Debug)]
struct ServiceState {
    svc: ServiceRef,
    tags: Option<BTreeMap<String, String>>,
    tags_cycle: u64,
    /// Its tags merged with its discovery rule, as of its last turn.
    settings: Option<Arc<Settings>>,
    /// Host ports of its tasks, in bridge mode.
    tasks: ecs::TaskCache,
    /// Some task's host ports could not be read yet.
    ports_pending: bool,
    /// Shared with the targets built from them; an instance read again unchanged
    /// keeps its `Arc`.
    instances: Option<Vec<Arc<Instance>>>,
    revision: Option<i64>,
    instances_cycle: u64,
    warned_truncated: bool,
    /// Where this service's targets stand in the last list built, and what its
    /// data had wrong; `None` when its tags or instances changed since.
    built: Option<ServiceBuilt>,
}

/// A service's part of the last list built.
#[derive(Clone, Debug)]
struct ServiceBuilt {
    range: std::ops::Range<usize>,
    problems: Vec<targets::Problem>,
    skipped_without_ipv4: usize,
}

impl ServiceState {
    fn new(svc: ServiceRef) -> Self {
        ServiceState {
            svc,
            tags: None,
            tags_cycle: 0,
            settings: None,
            tasks: ecs::TaskCache::new(),
            ports_pending: false,
            instances: None,
            revision: None,
            instances_cycle: 0,
            warned_truncated: false,
            built: None,
        }
    }

    /// Its tags and instances have been read.
    fn is_read(&self) -> bool {
        self.settings.is_some() && self.instances.is_some()
    }

    /// Read, and no task of it waits for ECS: what it has now can replace what
    /// it had.
    fn is_settled(&self) -> bool {
        self.is_read() && !self.ports_pending
    }
}

#[derive(Clone, Debug)]
struct NamespaceState {
    ns: NamespaceRef,
    /// `None` until the first successful listing.
    services: Option<BTreeMap<String, ServiceState>>,
    /// Listed services whose namespace could not be confirmed (`GetService`
    /// failed): unread, so the namespace is not complete.
    unconfirmed: usize,
    stale: bool,
}

/// What one cycle did.
#[derive(Clone, Debug, Serialize)]
pub struct CycleReport {
    pub cycle: u64,
    #[serde(skip)]
    pub started: SystemTime,
    pub duration_ms: u64,
    /// How much longer than the refresh interval the cycle took (the pacer could
    /// not fit its calls in): 0 when it fit.
    pub stretch_ms: u64,
    /// Every failed call, naming its resource. Empty on a clean cycle.
    pub errors: Vec<String>,
    /// Every configured namespace and each of its services has been read at least once.
    pub complete: bool,
    /// Complete, the discovery rules read, and no bridge-mode task waiting for
    /// ECS: what the first publication waits for.
    pub publishable: bool,
    /// What the first publication still waits for, when not publishable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Services whose instances were re-read this cycle.
    pub services_refreshed: usize,
    /// HTTP attempts to AWS this cycle (retries included).
    pub aws_requests: u64,
    /// Of which ECS `DescribeTasks` (bridge-mode tasks never seen before).
    pub ecs_requests: u64,
    /// The discovery rules in force, when a rules parameter is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules: Option<RulesReport>,
    pub namespaces: Vec<NamespaceReport>,
}

impl CycleReport {
    /// `ok`, `partial` (some parts kept their previous value) or `failed`
    /// (nothing could be read).
    pub fn outcome(&self) -> &'static str {
        match (self.errors.is_empty(), self.complete) {
            (true, _) => "ok",
            (false, true) => "partial",
            (false, false) => "failed",
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct NamespaceReport {
    pub name: String,
    pub found: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub services: usize,
    pub instances: usize,
    /// Some part of it kept a previous result this cycle.
    pub stale: bool,
}

/// Discovery state carried from cycle to cycle.
pub struct Discoverer {
    aws: AwsClients,
    opts: DiscoveryOptions,
    cycle: u64,
    /// Last good namespace list.
    names: Option<Vec<String>>,
    /// Last good index of the account's namespaces, by name.
    index: Option<HashMap<String, NamespaceRef>>,
    /// Confirmed namespace id of each service id (services never move).
    service_namespace: HashMap<String, String>,
    /// Configured namespaces that exist, by name.
    namespaces: BTreeMap<String, NamespaceState>,
    /// Configured names not found, each warned about once.
    missing: BTreeSet<String>,
    /// Strings of instances, shared between them.
    strings: Arc<Mutex<Interner>>,
    /// The targets of everything known as last built; each service's part is
    /// taken from it again while the service is unchanged.
    built: Option<Arc<BuildOutput>>,
    /// Whether anything changed since `built` was built.
    changed: bool,
    /// A cycle ended publishable: the first discovery is over.
    settled_once: bool,
}

impl Discoverer {
    pub fn new(aws: AwsClients, opts: DiscoveryOptions) -> Self {
        Discoverer {
            aws,
            opts,
            cycle: 0,
            names: None,
            index: None,
            service_namespace: HashMap::new(),
            namespaces: BTreeMap::new(),
            missing: BTreeSet::new(),
            strings: Default::default(),
            built: None,
            changed: true,
            settled_once: false,
        }
    }

    pub fn aws(&self) -> &AwsClients {
        &self.aws
    }

    /// Runs one discovery cycle and updates the cached state.
    pub async fn run_cycle(&mut self) -> CycleReport {
        self.run_cycle_with(&mut |_| {}).await
    }

    /// [`Discoverer::run_cycle`], calling `progress` when services changed
    /// during the cycle (see [`Discoverer::refresh_services`]).
    pub async fn run_cycle_with(&mut self, progress: Progress<'_>) -> CycleReport {
        self.cycle += 1;
        let started = SystemTime::now();
        let clock = Instant::now();
        let requests_before = self.aws.stats.total();
        let ecs_before = self.aws.stats.ecs();
        let mut errors: Vec<AwsCallError> = Vec::new();
        let mut other_errors: Vec<String> = Vec::new();

        match namespaces::load(&self.opts.source, &self.aws.ssm).await {
            Ok(names) => {
                if self.names.as_ref() != Some(&names) {
                    tracing::info!(namespaces = ?names, "namespace list loaded");
                }
                self.names = Some(names);
            }
            Err(err) => other_errors.push(err.to_string()),
        }
        if let Some(err) = self.load_rules().await {
            other_errors.push(err);
        }

        match cloudmap::list_namespaces(&self.aws.cloudmap, &self.aws.pacer).await {
            Ok(list) => {
                self.index = Some(list.into_iter().map(|ns| (ns.name.clone(), ns)).collect())
            }
            Err(err) => errors.push(err),
        }

        if let (Some(names), Some(index)) = (&self.names, &self.index) {
            self.resolve_namespaces(names.clone(), index.clone());
            self.list_services(&mut errors).await;
            self.refresh_services(&mut errors, progress).await;
        }

        log_failures(self.cycle, &other_errors, &errors);
        let waiting_for = self.waiting_for();
        self.settled_once |= waiting_for.is_none();
        let mut messages: Vec<String> = other_errors;
        messages.extend(errors.iter().map(ToString::to_string));
        CycleReport {
            cycle: self.cycle,
            started,
            duration_ms: clock.elapsed().as_millis() as u64,
            stretch_ms: clock
                .elapsed()
                .saturating_sub(self.opts.interval)
                .as_millis() as u64,
            errors: messages,
            complete: self.is_complete(),
            publishable: waiting_for.is_none(),
            waiting_for,
            services_refreshed: self.refreshed_this_cycle(),
            aws_requests: self.aws.stats.total() - requests_before,
            ecs_requests: self.aws.stats.ecs() - ecs_before,
            rules: self.rules().2,
            namespaces: self.namespace_reports(),
        }
    }

    /// Reads the rules parameter through the process's keeper, which keeps the
    /// last good rules; returns the SSM call's error, for the cycle's errors.
    async fn load_rules(&self) -> Option<String> {
        self.opts.rules.as_ref()?.refresh(&self.aws.ssm).await
    }

    /// The rules in force, whether the parameter was answered (nothing is
    /// published for the first time before), and the last reading's report.
    /// Without a rules parameter: none, answered.
    fn rules(&self) -> (Arc<Rules>, bool, Option<RulesReport>) {
        match &self.opts.rules {
            Some(keeper) => keeper.snapshot(),
            None => (Arc::default(), true, None),
        }
    }

    /// Aligns the per-namespace state with the configured names and the index.
    fn resolve_namespaces(&mut self, names: Vec<String>, index: HashMap<String, NamespaceRef>) {
        let wanted: BTreeSet<&String> = names.iter().collect();
        let before = self.namespaces.len();
        self.namespaces.retain(|name, _| wanted.contains(name));
        if self.namespaces.len() != before {
            self.changed = true;
        }
        self.missing.retain(|name| wanted.contains(name));
        for name in &names {
            match index.get(name) {
                None => {
                    if self.missing.insert(name.clone()) {
                        tracing::warn!(
                            namespace = %name,
                            "Cloud Map namespace {name:?} does not exist in region {}: check the \
                             namespace list; it is skipped until it appears",
                            self.aws.region
                        );
                    }
                    if self.namespaces.remove(name).is_some() {
                        self.changed = true;
                    }
                }
                Some(ns) => {
                    if self.missing.remove(name) {
                        tracing::info!(namespace = %name, "Cloud Map namespace {name:?} now exists");
                    }
                    let replaced = self
                        .namespaces
                        .get(name)
                        .is_some_and(|state| state.ns.id != ns.id);
                    if replaced || !self.namespaces.contains_key(name) {
                        self.changed = true;
                        self.namespaces.insert(
                            name.clone(),
                            NamespaceState {
                                ns: ns.clone(),
                                services: None,
                                unconfirmed: 0,
                                stale: false,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Lists the services of every namespace, confirming each new service's namespace.
    async fn list_services(&mut self, errors: &mut Vec<AwsCallError>) {
        let cm = self.aws.cloudmap.clone();
        let pacer = self.aws.pacer.clone();
        for state in self.namespaces.values_mut() {
            let listed = match cloudmap::list_services(&cm, &pacer, &state.ns).await {
                Ok(listed) => listed,
                Err(err) => {
                    errors.push(err);
                    state.stale = true;
                    continue;
                }
            };
            state.stale = false;
            state.unconfirmed = 0;
            let first_listing = state.services.is_none();
            let mut previous = state.services.take().unwrap_or_default();
            let mut changed = first_listing;
            let mut services = BTreeMap::new();
            for svc in listed {
                let ns_id = match self.service_namespace.get(&svc.id) {
                    Some(id) => id.clone(),
                    None => match cloudmap::service_namespace(&cm, &pacer, &svc).await {
                        Ok(id) => {
                            self.service_namespace.insert(svc.id.clone(), id.clone());
                            id
                        }
                        Err(err) => {
                            // Unread, not absent: a cycle with it is not complete.
                            errors.push(err);
                            state.stale = true;
                            state.unconfirmed += 1;
                            continue;
                        }
                    },
                };
                if ns_id != state.ns.id {
                    continue;
                }
                let entry = match previous.remove(&svc.id) {
                    Some(mut known) => {
                        if known.svc != svc {
                            known.built = None;
                            changed = true;
                        }
                        known.svc = svc;
                        known
                    }
                    None => {
                        changed = true;
                        ServiceState::new(svc)
                    }
                };
                services.insert(entry.svc.id.clone(), entry);
            }
            // A service added, gone or changed, or the first listing.
            if changed || !previous.is_empty() {
                self.changed = true;
            }
            state.services = Some(services);
        }
    }

    /// Refreshes tags and instances of every known service, `concurrency` at a time.
    /// Once discovery is complete, the services' turns are spread over
    /// [`SPREAD_FRACTION`] of the refresh interval instead of bursting at its
    /// start; until then they go as fast as the pacer allows. Each answer is kept
    /// as it arrives; `progress` is called after a service changed, at most once
    /// per [`PROGRESS_SPACING`] (more when building takes long), once discovery is
    /// complete, so that a registration is published within about a second of
    /// its service's turn instead of at the end of the cycle.
    async fn refresh_services(&mut self, errors: &mut Vec<AwsCallError>, progress: Progress<'_>) {
        let spread = self.opts.spread
            && self.settled_once
            && self.is_complete()
            && !self.opts.interval.is_zero();
        // Copies: what is known stays in place, complete, while the turns run.
        let mut work = Vec::new();
        for (ns_name, state) in &self.namespaces {
            for (id, svc) in state.services.iter().flatten() {
                work.push((ns_name.clone(), id.clone(), svc.clone()));
            }
        }
        let step = if spread && !work.is_empty() {
            self.opts.interval.mul_f64(SPREAD_FRACTION) / work.len() as u32
        } else {
            Duration::ZERO
        };
        let start = tokio::time::Instant::now();
        // Until everything has been read once (nothing is published before),
        // the host ports of bridge-mode tasks are asked for once the sweep is
        // over, all services' tasks together: the fewest ECS calls.
        let defer_ports = !self.settled_once;
        let mut turn = self.turn_context();
        turn.defer_ports = defer_ports;
        let turn = &turn;
        let mut answers = stream::iter(work.into_iter().enumerate())
            .map(|(i, (ns_name, id, svc))| async move {
                tokio::time::sleep_until(start + step * i as u32).await;
                let (svc, errs) = refresh_service(turn, &ns_name, svc, false).await;
                (ns_name, id, svc, errs)
            })
            .buffer_unordered(self.opts.concurrency.max(1));
        let mut last_progress: Option<(tokio::time::Instant, Duration)> = None;
        // A change not published yet (it came before its turn was due).
        let mut pending = false;
        while let Some((ns_name, id, mut svc, errs)) = answers.next().await {
            // A service read at last, or read again with something new.
            let changed = svc.built.is_none() && svc.is_settled();
            self.changed |= changed;
            if let Some(state) = self.namespaces.get_mut(&ns_name) {
                state.stale |= !errs.is_empty();
                let services = state.services.get_or_insert_with(BTreeMap::new);
                // Unchanged: where its targets stand now, which a build during
                // the cycle may have moved, not where they stood at its start.
                if let (false, Some(known)) = (changed, services.get_mut(&id)) {
                    svc.built = known.built.take();
                }
                services.insert(id, svc);
            }
            errors.extend(errs);
            let due = last_progress.is_none_or(|(at, took)| {
                at.elapsed() >= PROGRESS_SPACING.max(took * PROGRESS_COST_FACTOR)
            });
            pending |= changed;
            if pending && due && self.is_complete() {
                let started = tokio::time::Instant::now();
                progress(self);
                pending = false;
                last_progress = Some((started, started.elapsed()));
            }
        }
        drop(answers);
        if defer_ports {
            errors.extend(self.resolve_ports().await);
        }
        lock(&self.strings).prune();
    }

    /// Asks ECS about the bridge-mode tasks of every service that it has not
    /// answered for, per cluster, up to 100 tasks per call whatever their
    /// service. A service is built again once none of its tasks waits for an
    /// answer; until then it keeps its last targets. Returns the calls that failed.
    async fn resolve_ports(&mut self) -> Vec<AwsCallError> {
        let now = std::time::Instant::now();
        let mut asks: BTreeMap<String, Vec<Arc<str>>> = BTreeMap::new();
        // The services each task belongs to (one task may be in several).
        let mut owners: HashMap<Arc<str>, Vec<ServiceKey>> = HashMap::new();
        let mut changed: BTreeSet<ServiceKey> = BTreeSet::new();
        for (ns, state) in &mut self.namespaces {
            for (id, svc) in state.services.iter_mut().flatten() {
                let (Some(settings), Some(instances)) = (&svc.settings, &svc.instances) else {
                    continue;
                };
                if !wants_ports(settings) {
                    continue;
                }
                let (due, entries_changed) = ecs::due(&mut svc.tasks, instances, now);
                if entries_changed {
                    changed.insert((ns.clone(), id.clone()));
                }
                for (cluster, ids) in due {
                    for task in ids {
                        let owned = owners.entry(task.clone()).or_default();
                        if owned.is_empty() {
                            asks.entry(cluster.clone()).or_default().push(task);
                        }
                        owned.push((ns.clone(), id.clone()));
                    }
                }
            }
        }
        let mut errors = Vec::new();
        for (cluster, ids) in asks {
            let (answers, errs) = ecs::ask(&self.aws.ecs, &cluster, &ids, now).await;
            errors.extend(errs);
            for (task, entry) in answers {
                for key in owners.get(&task).into_iter().flatten() {
                    let Some(svc) = self
                        .namespaces
                        .get_mut(&key.0)
                        .and_then(|s| s.services.as_mut())
                        .and_then(|s| s.get_mut(&key.1))
                    else {
                        continue;
                    };
                    if ecs::store(&mut svc.tasks, [(task.clone(), entry.clone())]) {
                        changed.insert(key.clone());
                    }
                }
            }
        }
        let now = std::time::Instant::now();
        for (ns, state) in &mut self.namespaces {
            for (id, svc) in state.services.iter_mut().flatten() {
                let Some(instances) = &svc.instances else {
                    continue;
                };
                let was_pending = svc.ports_pending;
                svc.ports_pending = svc.settings.as_deref().is_some_and(wants_ports)
                    && ecs::pending(&svc.tasks, instances, now);
                let key = (ns.clone(), id.clone());
                if !svc.ports_pending && (was_pending || changed.contains(&key)) {
                    svc.built = None;
                    self.changed = true;
                }
            }
        }
        errors
    }

    /// The services whose instances name the ECS service `ecs` (their
    /// `ECS_SERVICE_NAME`, and `ECS_CLUSTER_NAME` when the event named a cluster),
    /// as (namespace, service id).
    pub fn services_of(&self, ecs: &EcsService) -> Vec<ServiceKey> {
        let named = |i: &Instance| {
            i.attributes.get(targets::ATTR_SERVICE) == Some(ecs.service.as_str())
                && ecs.cluster.as_deref().is_none_or(|cluster| {
                    i.attributes
                        .get(targets::ATTR_CLUSTER)
                        .is_none_or(|c| c == cluster)
                })
        };
        self.all_services()
            .filter(|(_, svc)| svc.instances.iter().flatten().any(|i| named(i)))
            .map(|(ns, svc)| (ns.to_owned(), svc.svc.id.clone()))
            .collect()
    }

    /// For an ECS service no instance names yet: lists every namespace's
    /// services again, and returns those that may hold its first instance (new,
    /// or without instances).
    pub async fn services_without_instances(&mut self) -> (Vec<ServiceKey>, Vec<AwsCallError>) {
        let mut errors = Vec::new();
        if self.names.is_some() && self.index.is_some() {
            self.list_services(&mut errors).await;
        }
        let keys = self
            .all_services()
            .filter(|(_, svc)| svc.instances.as_ref().is_none_or(Vec::is_empty))
            .map(|(ns, svc)| (ns.to_owned(), svc.svc.id.clone()))
            .collect();
        (keys, errors)
    }

    /// Re-reads each of `wanted` at once: its tags when due and its instances
    /// (not only when the revision moved: a health change does not move it,
    /// and an event says something changed). Returns the calls that failed.
    pub async fn refresh_some(&mut self, wanted: &BTreeSet<ServiceKey>) -> Vec<AwsCallError> {
        // New bridge-mode tasks of all these services are asked about together
        // once their instances are read.
        let mut turn = self.turn_context();
        turn.defer_ports = true;
        let turn = &turn;
        let work: Vec<(ServiceKey, ServiceState)> = wanted
            .iter()
            .filter_map(|(ns, id)| {
                let state = self.namespaces.get(ns)?.services.as_ref()?.get(id)?;
                Some(((ns.clone(), id.clone()), state.clone()))
            })
            .collect();
        let mut answers = stream::iter(work)
            .map(|(key, svc)| async move {
                let (svc, errs) = refresh_service(turn, &key.0, svc, true).await;
                (key, svc, errs)
            })
            .buffer_unordered(self.opts.concurrency.max(1));
        let mut errors = Vec::new();
        while let Some(((ns, id), mut svc, errs)) = answers.next().await {
            let changed = svc.built.is_none() && svc.is_settled();
            self.changed |= changed;
            if let Some(services) = self
                .namespaces
                .get_mut(&ns)
                .and_then(|s| s.services.as_mut())
            {
                if let (false, Some(known)) = (changed, services.get_mut(&id)) {
                    svc.built = known.built.take();
                }
                services.insert(id, svc);
            }
            errors.extend(errs);
        }
        drop(answers);
        errors.extend(self.resolve_ports().await);
        errors
    }

    /// What a service's turn needs, shared by the turns of a cycle.
    fn turn_context(&self) -> Turn {
        Turn {
            cloudmap: self.aws.cloudmap.clone(),
            ecs: self.aws.ecs.clone(),
            pacer: self.aws.pacer.clone(),
            strings: self.strings.clone(),
            health: self.opts.health,
            cycle: self.cycle,
            rules: self.rules().0,
            defer_ports: false,
        }
    }

    /// What keeps discovery from being publishable (complete, the rules read,
    /// no bridge-mode task waiting for ECS), in words; `None` when nothing.
    fn waiting_for(&self) -> Option<String> {
        if !self.is_complete() {
            return Some("every configured namespace and service to be read".to_owned());
        }
        if !self.rules().1 {
            return Some("the discovery rules parameter to be read".to_owned());
        }
        let waiting: Vec<String> = self
            .all_services()
            .filter(|(_, svc)| svc.ports_pending)
            .map(|(ns, svc)| format!("{ns}/{}", svc.svc.name))
            .collect();
        (!waiting.is_empty()).then(|| {
            format!(
                "ECS DescribeTasks to answer for bridge-mode tasks of {} (at most a minute)",
                waiting.join(", ")
            )
        })
    }

    fn is_complete(&self) -> bool {
        self.names.is_some()
            && self.index.is_some()
            && self.namespaces.values().all(|state| {
                state.unconfirmed == 0
                    && state
                        .services
                        .as_ref()
                        .is_some_and(|services| services.values().all(ServiceState::is_read))
            })
    }

    fn refreshed_this_cycle(&self) -> usize {
        self.all_services()
            .filter(|(_, s)| s.instances_cycle == self.cycle)
            .count()
    }

    fn all_services(&self) -> impl Iterator<Item = (&str, &ServiceState)> {
        self.namespaces.iter().flat_map(|(name, state)| {
            state
                .services
                .iter()
                .flat_map(|m| m.values())
                .map(move |svc| (name.as_str(), svc))
        })
    }

    fn namespace_reports(&self) -> Vec<NamespaceReport> {
        let mut out: Vec<NamespaceReport> = self
            .namespaces
            .iter()
            .map(|(name, state)| {
                let services = state.services.as_ref();
                NamespaceReport {
                    name: name.clone(),
                    found: true,
                    id: Some(state.ns.id.clone()),
                    kind: Some(state.ns.kind.clone()),
                    services: services.map_or(0, BTreeMap::len),
                    instances: services.map_or(0, |m| {
                        m.values()
                            .map(|s| s.instances.as_ref().map_or(0, Vec::len))
                            .sum()
                    }),
                    stale: state.stale || services.is_none(),
                }
            })
            .collect();
        out.extend(self.missing.iter().map(|name| NamespaceReport {
            name: name.clone(),
            found: false,
            id: None,
            kind: None,
            services: 0,
            instances: 0,
            stale: false,
        }));
        // Configured order, as the operator wrote it.
        if let Some(names) = &self.names {
            out.sort_by_key(|r| names.iter().position(|n| *n == r.name));
        }
        out
    }

    /// Targets built from everything known now (last good values included). Only
    /// the services whose tags or instances changed are built again, the others'
    /// targets are taken from the last list; when nothing changed, the last list
    /// itself is returned.
    pub fn targets(&mut self) -> Arc<BuildOutput> {
        if let (false, Some(built)) = (self.changed, &self.built) {
            return built.clone();
        }
        let last = self.built.take();
        let mut services: Vec<(&str, &mut ServiceState)> = self
            .namespaces
            .iter_mut()
            .flat_map(|(name, state)| {
                state
                    .services
                    .iter_mut()
                    .flat_map(|m| m.values_mut())
                    .map(move |svc| (name.as_str(), svc))
            })
            .collect();
        // In (namespace, service) order, each service's own sorted list appended
        // to the others is the whole sorted list.
        services.sort_by(|a, b| (a.0, &a.1.svc.name).cmp(&(b.0, &b.1.svc.name)));
        let mut list: Vec<targets::Target> =
            Vec::with_capacity(last.as_ref().map_or(0, |l| l.targets.len()));
        let mut all = BuildOutput::default();
        for (ns, state) in services {
            let (Some(settings), Some(instances)) = (&state.settings, &state.instances) else {
                continue;
            };
            let start = list.len();
            let kept = state
                .built
                .as_ref()
                .zip(last.as_ref())
                .and_then(|(b, last)| last.targets.get(b.range.clone()));
            let part = match kept {
                Some(targets) => {
                    list.extend_from_slice(targets);
                    state.built.clone()
                }
                None => None,
            };
            let part = part.unwrap_or_else(|| {
                let tasks = &state.tasks;
                let lookup = |inst: &Instance, port: u16| ecs::host_port(tasks, inst, port);
                let built = targets::build_all([ServiceData {
                    namespace: ns,
                    service: &state.svc.name,
                    tags: &settings.values,
                    instances,
                    rule: settings
                        .rule
                        .as_ref()
                        .map(|r| (r.index, r.settings.as_slice())),
                    host_ports: Some(HostPorts(&lookup)),
                }]);
                list.extend(built.targets.iter().cloned());
                ServiceBuilt {
                    range: 0..0,
                    problems: built.problems,
                    skipped_without_ipv4: built.skipped_without_ipv4,
                }
            });
            all.problems.extend(part.problems.iter().cloned());
            all.skipped_without_ipv4 += part.skipped_without_ipv4;
            state.built = Some(ServiceBuilt {
                range: start..list.len(),
                ..part
            });
        }
        drop(last);
        all.targets = Arc::new(list);
        // Sorted by construction; should two services ever share a name, sort.
        let all = if all.targets.windows(2).all(|w| w[0] <= w[1]) {
            all.problems.sort_unstable();
            all.problems.dedup();
            all
        } else {
            for state in self.all_services_mut() {
                state.built = None;
            }
            all.finish()
        };
        let all = Arc::new(all);
        self.built = Some(all.clone());
        self.changed = false;
        all
    }

    fn all_services_mut(&mut self) -> impl Iterator<Item = &mut ServiceState> {
        self.namespaces
            .values_mut()
            .flat_map(|state| state.services.iter_mut().flat_map(|m| m.values_mut()))
    }

    /// Configured namespace names that do not exist.
    pub fn missing_namespaces(&self) -> impl Iterator<Item = &str> {
        self.missing.iter().map(String::as_str)
    }
}

/// One WARN line per cycle however many calls failed (an unreachable AWS fails
/// every service's call): counts per error kind and the first few failures.
/// Each failure is logged at debug.
fn log_failures(cycle: u64, other: &[String], errors: &[AwsCallError]) {
    const SHOWN: usize = 3;
    if other.is_empty() && errors.is_empty() {
        return;
    }
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for err in errors {
        let kind = err.code.clone().unwrap_or_else(|| "no answer".to_owned());
        *kinds
            .entry(format!("{} {kind}", err.operation))
            .or_default() += 1;
    }
    if !other.is_empty() {
        kinds.insert("SSM parameter".to_owned(), other.len());
    }
    let all: Vec<String> = other
        .iter()
        .cloned()
        .chain(errors.iter().map(ToString::to_string))
        .collect();
    for msg in &all {
        tracing::debug!(cycle, "{msg}");
    }
    let counts: Vec<String> = kinds.iter().map(|(k, n)| format!("{n} x {k}")).collect();
    let first: Vec<&str> = all.iter().take(SHOWN).map(String::as_str).collect();
    tracing::warn!(
        cycle,
        failed_calls = all.len(),
        "discovery cycle: {} calls failed ({}); previous results kept. First: {}{}",
        all.len(),
        counts.join(", "),
        first.join("; "),
        if all.len() > SHOWN { "; ..." } else { "" }
    );
}

/// Refreshes one service's tags (every [`TAG_REFRESH_CYCLES`]) and instances (when
/// the revision moved, every [`FULL_REFRESH_CYCLES`], or when `force_instances`).
/// Failed parts keep their value.
async fn refresh_service(
    turn: &Turn,
    namespace: &str,
    mut state: ServiceState,
    force_instances: bool,
) -> (ServiceState, Vec<AwsCallError>) {
    let (cm, pacer, strings) = (&turn.cloudmap, &*turn.pacer, &*turn.strings);
    let (health, cycle) = (turn.health, turn.cycle);
    let mut errors = Vec::new();
    if state.tags.is_none() || cycle >= state.tags_cycle + TAG_REFRESH_CYCLES {
        match cloudmap::service_tags(cm, pacer, &state.svc).await {
            Ok(tags) => {
                if state.tags.as_ref() != Some(&tags) {
                    state.built = None;
                }
                state.tags = Some(tags);
                state.tags_cycle = cycle;
            }
            Err(err) => errors.push(err),
        }
    }
    let full = force_instances
        || state.instances.is_none()
        || cycle >= state.instances_cycle + FULL_REFRESH_CYCLES;
    let changed = full
        || match cloudmap::instances_revision(cm, pacer, namespace, &state.svc.name).await {
            Ok(rev) => rev.is_none() || rev != state.revision,
            Err(err) => {
                errors.push(err);
                false
            }
        };
    if changed {
        match cloudmap::discover_instances(cm, pacer, namespace, &state.svc.name, health).await {
            Ok((read, revision)) => {
                let instances = share(read, state.instances.as_deref(), strings);
                if state.instances.as_ref() != Some(&instances) {
                    state.built = None;
                }
                if instances.len() >= DISCOVER_MAX_RESULTS as usize && !state.warned_truncated {
                    tracing::warn!(
                        "service {:?} in namespace {namespace:?} has {} or more instances, the most \
                         DiscoverInstances returns; instances beyond it are not discovered",
                        state.svc.name,
                        DISCOVER_MAX_RESULTS
                    );
                    state.warned_truncated = true;
                }
                state.instances = Some(instances);
                state.revision = revision;
                state.instances_cycle = cycle;
            }
            Err(err) => errors.push(err),
        }
    }
    if let Some(tags) = &state.tags {
        let settings = turn.rules.settings(namespace, &state.svc.name, tags);
        if state.settings.as_deref() != Some(&settings) {
            state.built = None;
            state.settings = Some(Arc::new(settings));
        }
    }
    if let (Some(settings), Some(instances)) = (&state.settings, &state.instances) {
        let wanted = wants_ports(settings);
        let was_pending = state.ports_pending;
        if wanted && turn.defer_ports {
            // Asked for after the sweep (see `Discoverer::resolve_ports`).
            let now = std::time::Instant::now();
            if ecs::due(&mut state.tasks, instances, now).1 {
                state.built = None;
            }
            state.ports_pending = ecs::pending(&state.tasks, instances, now);
        } else {
            let refreshed = ecs::refresh(&turn.ecs, &mut state.tasks, instances, wanted).await;
            if refreshed.changed {
                state.built = None;
            }
            state.ports_pending = refreshed.pending;
            errors.extend(refreshed.errors);
        }
        // Waiting no more (answered, or waited long enough): built again.
        if was_pending && !state.ports_pending {
            state.built = None;
        }
    }
    (state, errors)
}

/// Whether a service's tasks are in bridge mode with container ports to map.
fn wants_ports(settings: &Settings) -> bool {
    targets::mapped_ports(&settings.values).is_some_and(|ports| !ports.is_empty())
}

/// What a service's turn works with: clients, shared strings, and the cycle's
/// settings.
struct Turn {
    cloudmap: aws_sdk_servicediscovery::Client,
    ecs: aws_sdk_ecs::Client,
    pacer: Arc<Pacer>,
    strings: Arc<Mutex<Interner>>,
    health: HealthStatus,
    cycle: u64,
    rules: Arc<Rules>,
    /// Leave bridge-mode tasks' host ports to the end of the sweep.
    defer_ports: bool,
}

fn lock(strings: &Mutex<Interner>) -> std::sync::MutexGuard<'_, Interner> {
    strings.lock().unwrap_or_else(|e| e.into_inner())
}

/// Instances as read, sharing what they can: an instance unchanged since the last
/// read is the very same `Arc` (so its targets compare equal at once), and the
/// strings of new ones are shared with every other instance's.
fn share(
    read: Vec<cloudmap::RawInstance>,
    known: Option<&[Arc<Instance>]>,
    strings: &Mutex<Interner>,
) -> Vec<Arc<Instance>> {
    let known: HashMap<&str, &Arc<Instance>> =
        known.into_iter().flatten().map(|i| (&*i.id, i)).collect();
    let mut strings = lock(strings);
    let mut instances: Vec<Arc<Instance>> = read
        .into_iter()
        .map(|raw| {
            let same = known.get(raw.id.as_str()).filter(|k| raw.is(k));
            match same {
                Some(k) => Arc::clone(k),
                None => Arc::new(strings.instance(
                    &raw.id,
                    raw.attributes.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                )),
            }
        })
        .collect();
    // In id order: the same instances read in another order are the same list.
    instances.sort_by(|a, b| a.id.cmp(&b.id));
    instances
}
