//! State shared between the writers of what this replica serves (the discovery
//! loop in single mode, the leader or follower task in sharded mode) and the
//! outputs: the published target list, pre-rendered once per change so that
//! serving it is a pointer copy, the coordination view, the leader's assignment
//! while leading, and the status shown on `/v1/status`.

use std::sync::{Arc, RwLock};

use serde::Serialize;
use tokio::sync::watch;

use crate::cluster::leader::LeaderHandle;
use crate::cluster::mirror::Mirror;
use crate::coordination::{CoordinationView, Role};
use crate::discovery::NamespaceReport;
use crate::targets::{Body, MetaLabels};
use crate::telemetry::Metrics;

/// A rendered target list: the exact bytes every reader serves (gzip-compressed,
/// see [`Body`]).
#[derive(Debug)]
pub struct Published {
    pub body: Body,
    /// Sharded mode: the slot, leader term and generation this shard belongs to.
    pub shard: Option<ShardStamp>,
    /// The JSON, inflated when a client without gzip first asks (Prometheus's
    /// http_sd sends no `Accept-Encoding`) and kept while this list is served:
    /// one inflation per change, whatever the number of clients.
    json: tokio::sync::OnceCell<bytes::Bytes>,
    /// Longest JSON kept so (see [`MAX_KEPT_JSON`]).
    keep_up_to: u64,
}

/// Lists whose JSON is longer than this (about 20,000 targets) are not kept
/// inflated: each client without gzip gets theirs inflated as it is sent, which
/// costs CPU per request instead of hundreds of MiB held.
pub const MAX_KEPT_JSON: u64 = 16 << 20;

impl Published {
    pub fn keeping_json_up_to(body: Body, shard: Option<ShardStamp>, bytes: u64) -> Published {
        Published {
            body,
            shard,
            json: tokio::sync::OnceCell::new(),
            keep_up_to: bytes,
        }
    }

    /// The JSON (see the field), or `None` for a list too long to keep: it is
    /// then sent inflated as it goes ([`Body::json_chunks`]). Concurrent first
    /// askers wait for one inflation, which runs off the async workers.
    pub async fn kept_json(&self) -> Result<Option<bytes::Bytes>, crate::targets::BodyError> {
        if self.body.json_len().is_none_or(|len| len > self.keep_up_to) {
            return Ok(None);
        }
        self.json
            .get_or_try_init(|| {
                let body = self.body.clone();
                async move {
                    match tokio::task::spawn_blocking(move || body.json()).await {
                        Ok(json) => json.map(bytes::Bytes::from),
                        Err(join) => {
                            Err(crate::targets::BodyError::Gzip(std::io::Error::other(join)))
                        }
                    }
                }
            })
            .await
            .cloned()
            .map(Some)
    }
}

/// See [`Shared::serving`].
#[derive(Clone, Debug)]
pub enum Serving {
    List(Arc<Published>),
    /// A shard of a slot this replica no longer serves: `[]`.
    SomeoneElses,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardStamp {
    pub slot: Option<u32>,
    pub term: u64,
    pub generation: u64,
}

/// The latest discovery cycle, as `/v1/status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct LastDiscovery {
    pub time: String,
    pub outcome: &'static str,
    pub duration_ms: u64,
    /// How much longer than CONFIG_RELOAD_FREQUENCY the cycle took.
    pub stretch_ms: u64,
    /// The pace of Cloud Map calls at the end of the cycle, in calls per second.
    pub pace_rps: Option<f64>,
    pub aws_requests: u64,
    /// ECS `DescribeTasks` attempts: bridge-mode tasks never seen before.
    pub ecs_requests: u64,
    pub services_refreshed: usize,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DiscoveryStatus {
    pub last_discovery: Option<LastDiscovery>,
    /// Time of the last cycle without any error.
    pub last_success: Option<String>,
    pub namespaces: Vec<NamespaceReport>,
    /// Data problems that make shard-sd skip targets (bad tags, bad attributes).
    pub problems: Vec<String>,
    /// Instances without an `AWS_INSTANCE_IPV4` attribute (not ECS tasks).
    pub skipped_instances: usize,
    /// A result held back because it would drop most published targets.
    pub drop_hold: Option<crate::discovery::guard::DropHold>,
    /// Whether ECS task events are read (with `EVENTS_QUEUE_URL`, on the leader).
    pub events: Option<EventsStatus>,
    /// The discovery rules in force and the last reading's fault, with
    /// `DISCOVERY_RULES_PARAMETER_NAME`.
    pub rules: Option<crate::discovery::rules::RulesReport>,
}

/// The events queue, as `/v1/status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct EventsStatus {
    /// `starting`, `consuming` or `fallback` (polling every
    /// `EVENTS_FALLBACK_FREQUENCY` while the queue cannot be read).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl EventsStatus {
    pub fn of(health: &crate::events::Health) -> EventsStatus {
        use crate::events::Health;
        match health {
            Health::Starting => EventsStatus {
                state: "starting",
                since: None,
                error: None,
            },
            Health::Consuming => EventsStatus {
                state: "consuming",
                since: None,
                error: None,
            },
            Health::Fallback { since, error } => EventsStatus {
                state: "fallback",
                since: Some(humantime::format_rfc3339_millis(*since).to_string()),
                error: Some(error.clone()),
            },
        }
    }
}

/// Shared between tasks behind an `Arc`.
#[derive(Debug)]
pub struct Shared {
    pub replica_id: String,
    pub advertise_addr: String,
    pub metrics: Arc<Metrics>,
    coordination: watch::Receiver<CoordinationView>,
    leader: std::sync::RwLock<Option<Arc<LeaderHandle>>>,
    /// The copy of the leader's assignment (followers and standbys), or this
    /// replica's own as its last term left it.
    mirror: RwLock<Option<Arc<Mirror>>>,
    /// Stopping: keep serving the last shard while its slot is handed over.
    draining: std::sync::atomic::AtomicBool,
    targets: watch::Sender<Option<Arc<Published>>>,
    status: RwLock<DiscoveryStatus>,
    /// [`MAX_KEPT_JSON`] unless told otherwise.
    kept_json_limit: std::sync::atomic::AtomicU64,
    /// Which `__meta_cloudmap_*` labels this replica's bodies carry.
    pub meta_labels: MetaLabels,
}

impl Shared {
    /// `coordination` is the coordinator's view, or a fixed single-replica view.
    pub fn new(
        replica_id: String,
        advertise_addr: String,
        coordination: watch::Receiver<CoordinationView>,
        metrics: Arc<Metrics>,
        meta_labels: MetaLabels,
    ) -> Arc<Self> {
        Arc::new(Shared {
            replica_id,
            advertise_addr,
            metrics,
            coordination,
            leader: std::sync::RwLock::new(None),
            draining: std::sync::atomic::AtomicBool::new(false),
            mirror: RwLock::new(None),
            targets: watch::Sender::new(None),
            kept_json_limit: std::sync::atomic::AtomicU64::new(MAX_KEPT_JSON),
            status: RwLock::new(DiscoveryStatus::default()),
            meta_labels,
        })
    }

    /// What every output (HTTP and file alike) serves now: `None` until the
    /// first complete discovery; `[]` for the shard of a slot this replica no
    /// longer serves, which is someone else's now (checked when asked, so a
    /// replica resuming from a pause never serves it again). A slot whose lease
    /// lapsed while nobody else took it is still served (stale), and so is the
    /// last shard while stopping.
    pub fn serving(&self) -> Option<Serving> {
        let published = self.targets()?;
        if let Some(stamp) = published.shard {
            let serving = self.coordination().serving_slot();
            if stamp.slot.is_some() && stamp.slot != serving && !self.is_draining() {
                return Some(Serving::SomeoneElses);
            }
        }
        Some(Serving::List(published))
    }

    /// The current list; `None` until the first complete discovery.
    pub fn targets(&self) -> Option<Arc<Published>> {
        self.targets.borrow().clone()
    }

    /// Notified on every change of the published list.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Published>>> {
        self.targets.subscribe()
    }

    /// Publishes a rendered list; returns whether it differs from the current one.
    pub fn publish(&self, body: Body) -> bool {
        self.publish_stamped(body, None)
    }

    /// Publishes this replica's shard (sharded mode). Nothing changes while
    /// stopping: the last shard is served until its slot is handed over.
    pub fn publish_shard(&self, slot: Option<u32>, term: u64, generation: u64, body: Body) -> bool {
        if self.is_draining() {
            return false;
        }
        let stamp = ShardStamp {
            slot,
            term,
            generation,
        };
        self.publish_stamped(body, Some(stamp))
    }

    fn publish_stamped(&self, body: Body, shard: Option<ShardStamp>) -> bool {
        let unchanged = self
            .targets
            .borrow()
            .as_ref()
            .is_some_and(|p| p.body.etag() == body.etag() && p.shard == shard);
        if unchanged {
            return false;
        }
        let keep_up_to = self
            .kept_json_limit
            .load(std::sync::atomic::Ordering::Relaxed);
        self.targets
            .send_replace(Some(Arc::new(Published::keeping_json_up_to(
                body, shard, keep_up_to,
            ))));
        true
    }

    /// Lists published from now on keep their JSON only up to `bytes` long.
    pub fn keep_json_up_to(&self, bytes: u64) {
        self.kept_json_limit
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The leader's assignment while this replica leads.
    pub fn leader(&self) -> Option<Arc<LeaderHandle>> {
        self.leader
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_leader(&self, handle: Option<Arc<LeaderHandle>>) {
        *self.leader.write().unwrap_or_else(|e| e.into_inner()) = handle;
    }

    pub fn mirror(&self) -> Option<Arc<Mirror>> {
        self.mirror
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_mirror(&self, mirror: Option<Mirror>) {
        *self.mirror.write().unwrap_or_else(|e| e.into_inner()) = mirror.map(Arc::new);
    }

    /// Puts back a mirror taken (see [`Shared::take_mirror`]) and not used.
    pub fn restore_mirror(&self, mirror: Arc<Mirror>) {
        *self.mirror.write().unwrap_or_else(|e| e.into_inner()) = Some(mirror);
    }

    /// The mirror, no longer kept here: a new leader starts from it once and then
    /// holds only its own assignment.
    pub fn take_mirror(&self) -> Option<Arc<Mirror>> {
        self.mirror
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stopping: the last shard is served even after its slot was released.
    pub fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn coordination_receiver(&self) -> watch::Receiver<CoordinationView> {
        self.coordination.clone()
    }

    /// The coordination view as of now (expired leases are not held).
    pub fn coordination(&self) -> CoordinationView {
        self.coordination.borrow().at(std::time::Instant::now())
    }

    /// Ready to be scraped through: single mode after the first complete discovery;
    /// sharded, when serving no slot, or when serving a shard of the slot it serves.
    /// A shard of an older term still counts: during a leader change or an outage the
    /// last shard is exactly what should be served, and a replica replaced for it
    /// would serve less.
    pub fn is_ready(&self) -> bool {
        let published = self.targets.borrow().clone();
        let view = self.coordination();
        match (view.role, view.serving_slot()) {
            (Role::Single, _) => published.is_some(),
            (_, None) => true,
            (_, Some(slot)) => published
                .and_then(|p| p.shard)
                .is_some_and(|stamp| stamp.slot == Some(slot) && stamp.term > 0),
        }
    }

    pub fn status(&self) -> DiscoveryStatus {
        self.status
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn update_status(&self, f: impl FnOnce(&mut DiscoveryStatus)) {
        f(&mut self.status.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// The discovery rules as last read, on `/v1/status` and `/metrics`: by the
    /// leader's cycles, and by every sharded replica's own reading.
    pub fn record_rules(&self, report: &crate::discovery::rules::RulesReport) {
        self.metrics.discovery_rules.set(report.rules as i64);
        self.metrics
            .discovery_rules_refused
            .set(i64::from(report.refusal.is_some()));
        self.update_status(|status| status.rules = Some(report.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        let registry = crate::aws::RequestStats::default();
        Shared::new(
            "r".into(),
            "127.0.0.1:9002".into(),
            watch::channel(CoordinationView::single()).1,
            Arc::new(Metrics::new(&registry)),
            MetaLabels::All,
        )
    }

    #[test]
    fn a_shard_of_a_slot_served_no_more_is_someone_elses() {
        let (tx, rx) = watch::channel(CoordinationView {
            role: Role::Follower,
            slot: Some(1),
            slot_until: Some(std::time::Instant::now() + std::time::Duration::from_secs(60)),
            ..CoordinationView::single()
        });
        let registry = crate::aws::RequestStats::default();
        let s = Shared::new(
            "r".into(),
            "127.0.0.1:9002".into(),
            rx,
            Arc::new(Metrics::new(&registry)),
            MetaLabels::All,
        );
        assert!(s.serving().is_none(), "nothing published yet");
        s.publish_shard(Some(1), 3, 7, Body::from_json(b"[1]", 1));
        assert!(matches!(s.serving(), Some(Serving::List(_))));
        // Another replica holds slot 1 now; this one holds slot 2.
        tx.send_modify(|v| v.slot = Some(2));
        assert!(matches!(s.serving(), Some(Serving::SomeoneElses)));
        // Its lease lapsed with nobody else seen holding it: still served (stale).
        tx.send_modify(|v| {
            v.slot = None;
            v.slot_until = None;
            v.stale_slot = Some(1);
        });
        assert!(matches!(s.serving(), Some(Serving::List(_))));
        // Stopping: the last shard is served until it is handed over.
        tx.send_modify(|v| v.stale_slot = None);
        assert!(matches!(s.serving(), Some(Serving::SomeoneElses)));
        s.set_draining();
        assert!(matches!(s.serving(), Some(Serving::List(_))));
    }

    #[test]
    fn nothing_replaces_the_served_shard_while_stopping() {
        let s = shared();
        assert!(s.publish_shard(Some(1), 3, 7, Body::from_json(b"[1]", 1)));
        s.set_draining();
        assert!(!s.publish_shard(None, 3, 0, Body::empty()));
        let served = s.targets().expect("published");
        assert_eq!(served.body.json().unwrap(), b"[1]");
        assert_eq!(served.shard.and_then(|st| st.slot), Some(1));
    }
}
