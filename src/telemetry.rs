//! Telemetry of shard-sd itself: structured logs through `tracing`, human-readable
//! by default and JSON (one object per line, for CloudWatch Logs) with
//! `LOG_FORMAT=json`, filtered by `RUST_LOG` (default `info`); and the metrics
//! served on `/metrics` through `prometheus-client`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tracing_subscriber::EnvFilter;

use crate::aws::RequestStats;

/// Installs the global log subscriber. Logs go to stderr so that stdout stays
/// free for command output.
/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// As `LOG_FORMAT` names them.
    pub const NAMES: &'static [&'static str] = &["text", "json"];

    pub fn from_name(name: &str) -> Option<LogFormat> {
        match name.to_ascii_lowercase().as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
}

pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // A subscriber already installed (tests) is fine.
    drop(result);
}

/// Labels of `shard_sd_role`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: String,
}

/// Labels of `shard_sd_events_received_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

/// Labels of `shard_sd_http_sd_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

/// shard-sd's own metrics, served on `GET /metrics` in the Prometheus text format.
/// Gauges describing the current state (role, term, generation, slots, shard
/// size) are refreshed from the shared state at each scrape; counters and the
/// histogram are updated where the events happen.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub role: Family<RoleLabels, Gauge>,
    pub term: Gauge,
    pub generation: Gauge,
    pub live_slots: Gauge,
    pub shard_targets: Gauge,
    pub shard_stale: Gauge,
    pub drop_hold: Gauge,
    pub targets_discovered: Gauge,
    pub targets_moved: Counter,
    pub discovery_cycle_seconds: Histogram,
    pub last_discovery_success: Gauge<f64, AtomicU64>,
    pub discovery_cycle_stretch_seconds: Gauge<f64, AtomicU64>,
    pub aws_pace_rps: Gauge<f64, AtomicU64>,
    pub peer_bytes_received: Counter,
    pub lease_renewal_failures: Counter,
    pub http_sd_requests: Family<CodeLabels, Counter>,
    pub events_received: Family<OutcomeLabels, Counter>,
    pub event_to_published_seconds: Histogram,
    pub targeted_refreshes: Counter,
    pub events_fallback: Gauge,
    pub discovery_rules: Gauge,
    pub discovery_rules_refused: Gauge,
}

impl Metrics {
    /// Registers every metric; `aws` carries the AWS request counters.
    pub fn new(aws: &RequestStats) -> Metrics {
        let mut registry = Registry::with_prefix("shard_sd");
        let metrics = Metrics {
            role: Family::default(),
            term: Gauge::default(),
            generation: Gauge::default(),
            live_slots: Gauge::default(),
            shard_targets: Gauge::default(),
            shard_stale: Gauge::default(),
            drop_hold: Gauge::default(),
            targets_discovered: Gauge::default(),
            targets_moved: Counter::default(),
            discovery_cycle_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            last_discovery_success: Gauge::default(),
            discovery_cycle_stretch_seconds: Gauge::default(),
            aws_pace_rps: Gauge::default(),
            peer_bytes_received: Counter::default(),
            lease_renewal_failures: Counter::default(),
            http_sd_requests: Family::default(),
            events_received: Family::default(),
            event_to_published_seconds: Histogram::new(exponential_buckets(0.25, 2.0, 10)),
            targeted_refreshes: Counter::default(),
            events_fallback: Gauge::default(),
            discovery_rules: Gauge::default(),
            discovery_rules_refused: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "role",
            "1 for this replica's current role (single, leader, follower, standby)",
            metrics.role.clone(),
        );
        registry.register(
            "term",
            "Leader term this replica knows",
            metrics.term.clone(),
        );
        registry.register(
            "generation",
            "Generation of the shard this replica serves",
            metrics.generation.clone(),
        );
        registry.register(
            "live_slots",
            "Slots the leader sees alive (0 on other replicas)",
            metrics.live_slots.clone(),
        );
        registry.register(
            "shard_targets",
            "Targets this replica serves on /prometheus-targets",
            metrics.shard_targets.clone(),
        );
        registry.register(
            "shard_stale",
            "1 while this replica serves the last shard of a slot whose lease lapsed because \
             its own renewals failed (nobody else is known to hold it)",
            metrics.shard_stale.clone(),
        );
        registry.register(
            "drop_hold",
            "1 while a discovery result that would drop more than MAX_DROP_FRACTION of the \
             published targets is held back until it is confirmed",
            metrics.drop_hold.clone(),
        );
        registry.register(
            "targets_discovered",
            "Targets found by the last discovery cycle (leader or single replica)",
            metrics.targets_discovered.clone(),
        );
        registry.register(
            "targets_moved",
            "Targets that changed slot in the leader's assignments",
            metrics.targets_moved.clone(),
        );
        registry.register_with_unit(
            "discovery_cycle_duration",
            "Duration of discovery cycles",
            Unit::Seconds,
            metrics.discovery_cycle_seconds.clone(),
        );
        registry.register_with_unit(
            "discovery_cycle_stretch",
            "How much longer than CONFIG_RELOAD_FREQUENCY the last discovery cycle took \
             (AWS_MAX_RPS could not fit its calls in the interval); 0 when it fit",
            Unit::Seconds,
            metrics.discovery_cycle_stretch_seconds.clone(),
        );
        registry.register(
            "aws_pace_rps",
            "Cloud Map calls per second allowed now: AWS_MAX_RPS, less while AWS throttles",
            metrics.aws_pace_rps.clone(),
        );
        registry.register(
            "peer_bytes_received",
            "Bytes of shards and assignments received from the leader",
            metrics.peer_bytes_received.clone(),
        );
        registry.register(
            "last_successful_discovery_timestamp_seconds",
            "Unix time of the last discovery cycle without any error",
            metrics.last_discovery_success.clone(),
        );
        registry.register(
            "lease_renewal_failures",
            "Lease renewals that failed (lost or errored)",
            metrics.lease_renewal_failures.clone(),
        );
        registry.register(
            "http_sd_requests",
            "Requests to /prometheus-targets by status code",
            metrics.http_sd_requests.clone(),
        );
        registry.register(
            "events_received",
            "ECS task events read from EVENTS_QUEUE_URL, by outcome: fresh, duplicate (a \
             version already seen), ignored (not a service task's state change), malformed",
            metrics.events_received.clone(),
        );
        registry.register_with_unit(
            "event_to_published",
            "From an ECS task event's time to the publication of the change it triggered \
             (leader or single replica)",
            Unit::Seconds,
            metrics.event_to_published_seconds.clone(),
        );
        registry.register(
            "targeted_refreshes",
            "Cloud Map services re-read because an ECS task event named them (checks \
             again included)",
            metrics.targeted_refreshes.clone(),
        );
        registry.register(
            "events_fallback",
            "1 while EVENTS_QUEUE_URL cannot be read and discovery polls every \
             EVENTS_FALLBACK_FREQUENCY",
            metrics.events_fallback.clone(),
        );
        registry.register(
            "discovery_rules",
            "Discovery rules in force (the last good reading of \
             DISCOVERY_RULES_PARAMETER_NAME)",
            metrics.discovery_rules.clone(),
        );
        registry.register(
            "discovery_rules_refused",
            "1 while the last reading of DISCOVERY_RULES_PARAMETER_NAME was refused (missing, \
             not JSON, a bad rule) and the last good rules stay in force",
            metrics.discovery_rules_refused.clone(),
        );
        registry.register(
            "aws_requests",
            "HTTP attempts to AWS by service, operation and outcome",
            aws.by_operation.clone(),
        );
        registry.register(
            "aws_throttles",
            "AWS attempts answered with a throttling error",
            aws.throttles.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }

    /// Counts an event read from the queue.
    pub fn event(&self, outcome: &str) {
        self.events_received
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Sets the state gauges and renders every metric.
    pub fn render(
        &self,
        role: &str,
        term: u64,
        generation: u64,
        live_slots: usize,
        shard_targets: usize,
        stale: bool,
    ) -> String {
        for r in ["single", "leader", "follower", "standby"] {
            self.role
                .get_or_create(&RoleLabels { role: r.to_owned() })
                .set(i64::from(r == role));
        }
        self.term.set(i64::try_from(term).unwrap_or(i64::MAX));
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        self.live_slots.set(live_slots as i64);
        self.shard_targets.set(shard_targets as i64);
        self.shard_stale.set(i64::from(stale));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
