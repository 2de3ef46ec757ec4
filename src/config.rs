//! Configuration: every flag has an environment variable (the way ECS task
//! definitions configure containers), and every value is checked at start-up so a
//! typo stops the process with a message naming the variable and what it accepts,
//! instead of surfacing at 3 a.m. as a panic or an empty target list.
//!
//! The names of the original sidecar's variables are kept, so its task
//! definitions work unchanged.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::clock::parse_offset;
use crate::coordination::ShardCount;
use crate::discovery::namespaces::{parse_namespace_list, NamespaceSource};
use crate::discovery::HealthStatus;
use crate::sharding::{Params, ShardBy};
use crate::targets::MetaLabels;
use crate::telemetry::LogFormat;

/// Name of the file written in `FILE_BASED` mode, as the original sidecar named it.
pub const FILE_SD_NAME: &str = "ecs-services.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DiscoveryMode {
    /// Serve targets on `GET /prometheus-targets` (Prometheus `http_sd_configs`).
    #[value(name = "HTTP_BASED")]
    HttpBased,
    /// Also write them to `CONFIG_FILE_DIR/ecs-services.json` (`file_sd_configs`).
    #[value(name = "FILE_BASED")]
    FileBased,
}

/// A parser for a domain enum named by `names` (matched ignoring case, listed in
/// `--help`): the domain types stay free of the command line.
fn named<T: Clone + Send + Sync + 'static>(
    names: &'static [&'static str],
    from_name: fn(&str) -> Option<T>,
) -> impl clap::builder::TypedValueParser<Value = T> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(names)
        .try_map(move |name| from_name(&name).ok_or_else(|| format!("unknown value {name:?}")))
}

/// The command line: the sidecar by default, or a subcommand.
#[derive(Clone, Debug, Parser)]
#[command(name = "shard-sd", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Offline what-if: assign the targets of an http_sd JSON file to N slots (and M),
    /// and report balance and movement. Honours SHARD_BY, REPLICATION_FACTOR and
    /// BALANCE_TOLERANCE.
    Plan {
        /// http_sd JSON file, e.g. saved from /prometheus-targets.
        #[arg(long)]
        targets: PathBuf,
        /// Number of slots now.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
        slots: u32,
        /// Number of slots to compare with; default the same.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
        to_slots: Option<u32>,
        /// One JSON object instead of the human report.
        #[arg(long)]
        json: bool,
    },
    /// Exits 0 if URL answers 2xx within 3 s, else 1: a container health check
    /// that needs no curl in the image.
    Probe {
        #[arg(default_value = "http://127.0.0.1:9001/readyz")]
        url: String,
    },
}

/// Options of the sidecar. Each `--flag` can also be set by the environment
/// variable shown in `--help`.
#[derive(Clone, Debug, Args)]
pub struct Config {
    /// How targets reach the collector.
    #[arg(
        long,
        env = "SERVICE_DISCOVERY_MODE",
        value_name = "SERVICE_DISCOVERY_MODE",
        value_enum,
        ignore_case = true,
        default_value = "HTTP_BASED"
    )]
    pub service_discovery_mode: DiscoveryMode,

    /// SSM parameter holding the comma-separated Cloud Map namespace names; re-read every cycle.
    #[arg(
        long,
        env = "DISCOVERY_NAMESPACES_PARAMETER_NAME",
        value_name = "DISCOVERY_NAMESPACES_PARAMETER_NAME",
        default_value = "ECS-ServiceDiscovery-Namespaces"
    )]
    pub discovery_namespaces_parameter_name: String,

    /// SSM parameter holding discovery rules: a JSON list of scrape settings for
    /// services matched by namespace and service globs, applied where the
    /// service's tags are silent; re-read every cycle. Unset: no rules.
    #[arg(
        long,
        env = "DISCOVERY_RULES_PARAMETER_NAME",
        value_name = "DISCOVERY_RULES_PARAMETER_NAME",
        value_parser = parse_optional_name
    )]
    pub discovery_rules_parameter_name: Option<String>,

    /// Static comma-separated namespace names, used instead of the SSM parameter.
    #[arg(
        long,
        env = "DISCOVERY_NAMESPACES",
        value_name = "DISCOVERY_NAMESPACES"
    )]
    pub discovery_namespaces: Option<String>,

    /// Directory of `ecs-services.json` in FILE_BASED mode (created if missing).
    #[arg(
        long,
        env = "CONFIG_FILE_DIR",
        value_name = "CONFIG_FILE_DIR",
        default_value = "/etc/config/"
    )]
    pub config_file_dir: PathBuf,

    /// Time between discovery cycles: seconds (`30`) or a duration (`500ms`, `2m`).
    #[arg(long, env = "CONFIG_RELOAD_FREQUENCY", value_name = "CONFIG_RELOAD_FREQUENCY",
          default_value = "30", value_parser = parse_interval)]
    pub config_reload_frequency: Duration,

    /// Which Cloud Map instances are targets, by health status.
    #[arg(
        long,
        env = "HEALTH_STATUS",
        value_name = "HEALTH_STATUS",
        value_parser = named(HealthStatus::NAMES, HealthStatus::from_name),
        ignore_case = true,
        default_value = "HEALTHY_OR_ELSE_ALL"
    )]
    pub health_status: HealthStatus,

    /// Address of the HTTP server (targets, health, status).
    #[arg(
        long,
        env = "LISTEN_ADDR",
        value_name = "LISTEN_ADDR",
        default_value = "0.0.0.0:9001"
    )]
    pub listen_addr: SocketAddr,

    /// Address of the peer listener (sharded mode only): the replicas' internal
    /// endpoints, kept apart so that security groups can open it to replicas only.
    #[arg(
        long,
        env = "PEER_LISTEN_ADDR",
        value_name = "PEER_LISTEN_ADDR",
        default_value = "0.0.0.0:9002"
    )]
    pub peer_listen_addr: SocketAddr,

    /// Hold a discovery result that would drop more than this fraction of the
    /// published targets until it is seen DROP_CONFIRM_CYCLES cycles in a row; 0 turns it off.
    #[arg(long, env = "MAX_DROP_FRACTION", value_name = "MAX_DROP_FRACTION", default_value = "0.5",
          value_parser = parse_fraction)]
    pub max_drop_fraction: f64,

    /// Consecutive cycles a large drop must be seen before it is published; 0 turns the guard off.
    #[arg(long, env = "DROP_CONFIRM_CYCLES", value_name = "DROP_CONFIRM_CYCLES", default_value = "3",
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub drop_confirm_cycles: u32,

    /// AWS region; by default the SDK's chain (ECS sets AWS_REGION).
    #[arg(long, env = "AWS_REGION", value_name = "AWS_REGION")]
    pub aws_region: Option<String>,

    /// Custom AWS endpoint for every service (e.g. a local emulator).
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "AWS_ENDPOINT_URL")]
    pub aws_endpoint_url: Option<String>,

    /// Limit of one HTTP attempt to AWS; a call with its retries gets three times this.
    #[arg(long, env = "AWS_CALL_TIMEOUT", value_name = "AWS_CALL_TIMEOUT", default_value = "10s",
          value_parser = parse_interval)]
    pub aws_call_timeout: Duration,

    /// Attempts per AWS call, the first included (throttling is retried with backoff and jitter).
    #[arg(long, env = "AWS_MAX_ATTEMPTS", value_name = "AWS_MAX_ATTEMPTS", default_value = "5",
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub aws_max_attempts: u32,

    /// Cloud Map calls per second at most, in all, slowed down further while AWS
    /// throttles: the account's quota is shared with the applications' own discovery.
    #[arg(long, env = "AWS_MAX_RPS", value_name = "AWS_MAX_RPS", default_value = "50",
          value_parser = parse_rps)]
    pub aws_max_rps: f64,

    /// Cloud Map services refreshed concurrently.
    #[arg(long, env = "DISCOVERY_CONCURRENCY", value_name = "DISCOVERY_CONCURRENCY", default_value = "8",
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub discovery_concurrency: u16,

    /// What targets are hashed by: `target` (scheme, address, path), `service` or `namespace`.
    #[arg(
        long,
        env = "SHARD_BY",
        value_name = "SHARD_BY",
        value_parser = named(ShardBy::NAMES, ShardBy::from_name),
        ignore_case = true,
        default_value = "target",
        global = true
    )]
    pub shard_by: ShardBy,

    /// Distinct slots each target is assigned to (for HA scraping with deduplication).
    #[arg(long, env = "REPLICATION_FACTOR", value_name = "REPLICATION_FACTOR", default_value = "1",
          value_parser = clap::value_parser!(u16).range(1..=16), global = true)]
    pub replication_factor: u16,

    /// Bounded load: no slot above ceil((1 + tolerance) x its fair share); 0 turns it off.
    #[arg(long, env = "BALANCE_TOLERANCE", value_name = "BALANCE_TOLERANCE", default_value = "0.1",
          value_parser = parse_tolerance, global = true)]
    pub balance_tolerance: f64,

    /// DynamoDB table of the leases; unset: single-replica mode, no DynamoDB at all.
    #[arg(long, env = "LEASE_TABLE", value_name = "LEASE_TABLE")]
    pub lease_table: Option<String>,

    /// Name of this group of replicas; several clusters can share one lease table.
    #[arg(
        long,
        env = "CLUSTER_NAME",
        value_name = "CLUSTER_NAME",
        default_value = "default"
    )]
    pub cluster_name: String,

    /// Number of shard slots, or `auto` (take the lowest free slot index, no cap).
    #[arg(
        long,
        env = "SHARD_COUNT",
        value_name = "SHARD_COUNT",
        default_value = "auto"
    )]
    pub shard_count: ShardCount,

    /// Identity of this replica; default the ECS task ARN, else hostname and pid.
    #[arg(long, env = "REPLICA_ID", value_name = "REPLICA_ID")]
    pub replica_id: Option<String>,

    /// host:port where peers reach this replica's peer listener; default the task's
    /// private IPv4 (from the ECS task metadata) and the PEER_LISTEN_ADDR port.
    #[arg(long, env = "ADVERTISE_ADDR", value_name = "ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// Relative capacity of this replica: a slot of weight 2 gets about twice the targets.
    #[arg(long, env = "REPLICA_WEIGHT", value_name = "REPLICA_WEIGHT", default_value = "1",
          value_parser = parse_weight)]
    pub replica_weight: f64,

    /// Lease duration of the leader and slot leases.
    #[arg(long, env = "LEASE_DURATION", value_name = "LEASE_DURATION", default_value = "10s",
          value_parser = parse_interval)]
    pub lease_duration: Duration,

    /// Time between lease renewals; at most a third of LEASE_DURATION.
    #[arg(long, env = "HEARTBEAT_INTERVAL", value_name = "HEARTBEAT_INTERVAL", default_value = "2s",
          value_parser = parse_interval)]
    pub heartbeat_interval: Duration,

    /// Create the lease table if missing (development; production uses deploy/).
    #[arg(long, env = "CREATE_TABLE", value_name = "CREATE_TABLE", default_value = "false",
          value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub create_table: bool,

    /// How long a slot keeps serving targets that moved away, after their new slot
    /// confirmed them: two collector http_sd refresh intervals is safe. `0s` allowed.
    #[arg(long, env = "HANDOFF_GRACE", value_name = "HANDOFF_GRACE", default_value = "60s",
          value_parser = parse_grace)]
    pub handoff_grace: Duration,

    /// How long the leader keeps a slot that stopped being live in the assignment, so a
    /// slot released in a rolling replacement and taken by a standby moves nothing.
    /// Default: three heartbeats (a standby takes a dead slot within two of its expiry).
    #[arg(long, env = "MEMBERSHIP_GRACE", value_name = "MEMBERSHIP_GRACE", value_parser = parse_grace)]
    pub membership_grace: Option<Duration>,

    /// Shared secret required (as a bearer token) on the replicas' internal endpoints.
    #[arg(
        long,
        env = "PEER_TOKEN",
        value_name = "PEER_TOKEN",
        hide_env_values = true
    )]
    pub peer_token: Option<String>,

    /// Testing aid: shifts the wall clock shard-sd reads (e.g. `+5m`). Lease decisions
    /// never depend on it; it only changes the timestamps written into lease items.
    #[arg(long, env = "CLOCK_OFFSET", value_name = "CLOCK_OFFSET", default_value = "0",
          value_parser = parse_offset)]
    pub clock_offset: i64,

    /// Log format: `text` for people, `json` for CloudWatch Logs. Filter with RUST_LOG.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_name = "LOG_FORMAT",
        value_parser = named(LogFormat::NAMES, LogFormat::from_name),
        ignore_case = true,
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Which `__meta_cloudmap_*` labels targets carry: `all` (one per instance
    /// attribute too), `basic` (namespace, service, instance id) or `none`.
    #[arg(
        long,
        env = "META_LABELS",
        value_name = "META_LABELS",
        value_parser = named(MetaLabels::NAMES, MetaLabels::from_name),
        ignore_case = true,
        default_value = "all"
    )]
    pub meta_labels: MetaLabels,

    /// SQS queue of ECS task state change events (an EventBridge rule fills it):
    /// the leader re-reads the services they touch at once. Unset: polling only.
    #[arg(long, env = "EVENTS_QUEUE_URL", value_name = "EVENTS_QUEUE_URL")]
    pub events_queue_url: Option<String>,

    /// With EVENTS_QUEUE_URL: time between discovery cycles while the queue cannot
    /// be read (CONFIG_RELOAD_FREQUENCY is then the slow safety net).
    #[arg(long, env = "EVENTS_FALLBACK_FREQUENCY", value_name = "EVENTS_FALLBACK_FREQUENCY",
          default_value = "30", value_parser = parse_interval)]
    pub events_fallback_frequency: Duration,
}

/// A configuration error found after parsing; the process exits with code 2.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "DISCOVERY_NAMESPACES is set but names no namespace: give comma-separated Cloud Map \
             namespace names, or unset it to read the SSM parameter"
    )]
    EmptyStaticNamespaces,
    #[error(
        "DISCOVERY_NAMESPACES_PARAMETER_NAME is empty: name the SSM parameter holding the \
             namespace list"
    )]
    EmptyParameterName,
    #[error(
        "LEASE_DURATION ({lease:?}) must be at least 3 x HEARTBEAT_INTERVAL ({heartbeat:?}): a \
         holder renews every heartbeat and must survive missing one or two"
    )]
    LeaseTooShort {
        lease: Duration,
        heartbeat: Duration,
    },
    #[error("CLUSTER_NAME {0:?} is invalid: use 1 to 128 characters, none of them `#`")]
    BadClusterName(String),
    #[error("LEASE_TABLE is set but empty: name the DynamoDB table, or unset it for single-replica mode")]
    EmptyLeaseTable,
}

impl Config {
    /// Where the namespace list comes from.
    pub fn namespace_source(&self) -> Result<NamespaceSource, ConfigError> {
        match &self.discovery_namespaces {
            Some(raw) => {
                let names = parse_namespace_list(raw);
                if names.is_empty() {
                    return Err(ConfigError::EmptyStaticNamespaces);
                }
                Ok(NamespaceSource::Static(names))
            }
            None if self.discovery_namespaces_parameter_name.trim().is_empty() => {
                Err(ConfigError::EmptyParameterName)
            }
            None => Ok(NamespaceSource::Ssm {
                parameter: self.discovery_namespaces_parameter_name.trim().to_owned(),
            }),
        }
    }

    /// Checks what clap cannot check alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.namespace_source()?;
        if self.lease_duration < self.heartbeat_interval * 3 {
            return Err(ConfigError::LeaseTooShort {
                lease: self.lease_duration,
                heartbeat: self.heartbeat_interval,
            });
        }
        let cluster = &self.cluster_name;
        if cluster.is_empty() || cluster.len() > 128 || cluster.contains('#') {
            return Err(ConfigError::BadClusterName(cluster.clone()));
        }
        if self
            .lease_table
            .as_deref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(ConfigError::EmptyLeaseTable);
        }
        Ok(())
    }

    /// The SSM parameter of discovery rules; `None` when unset or empty.
    pub fn rules_parameter(&self) -> Option<String> {
        self.discovery_rules_parameter_name
            .clone()
            .filter(|name| !name.is_empty())
    }

    pub fn membership_grace(&self) -> Duration {
        self.membership_grace.unwrap_or(self.heartbeat_interval * 3)
    }

    pub fn sharding_params(&self) -> Params {
        Params {
            replication: self.replication_factor.into(),
            tolerance: self.balance_tolerance,
        }
    }

    pub fn file_sd_path(&self) -> PathBuf {
        self.config_file_dir.join(FILE_SD_NAME)
    }
}

/// A name that may be given empty (an unset variable in a task definition):
/// trimmed, and empty meaning unset.
fn parse_optional_name(raw: &str) -> Result<String, String> {
    Ok(raw.trim().to_owned())
}

/// Like [`parse_interval`] but `0` / `0s` is allowed.
fn parse_grace(raw: &str) -> Result<Duration, String> {
    match raw.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        other => parse_interval(other),
    }
}

fn parse_fraction(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err("expected a fraction from 0 (off) to 1, e.g. 0.5 for half".into()),
    }
}

fn parse_rps(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(r) if (1.0..=10_000.0).contains(&r) => Ok(r),
        _ => Err("expected calls per second from 1 to 10000, e.g. 50".into()),
    }
}

fn parse_tolerance(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(t) if (0.0..=10.0).contains(&t) => Ok(t),
        _ => Err(
            "expected a number from 0 (off) to 10, e.g. 0.1 for 10% above the fair share".into(),
        ),
    }
}

fn parse_weight(raw: &str) -> Result<f64, String> {
    match raw.trim().parse::<f64>() {
        Ok(w) if w > 0.0 && w <= 1000.0 => Ok(w),
        _ => Err("expected a number greater than 0 and at most 1000".into()),
    }
}

/// Parses a positive interval: plain seconds (`30`, as the original sidecar took)
/// or a humantime duration (`500ms`, `2m`).
pub fn parse_interval(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let parsed = match raw.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(raw).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(d) if d >= Duration::from_millis(10) => Ok(d),
        Ok(_) => Err("must be at least 10ms".into()),
        Err(e) => Err(format!(
            "{e}: expected a number of seconds (e.g. 30) or a duration (e.g. 500ms, 2m)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Cli::try_parse_from(std::iter::once("shard-sd").chain(args.iter().copied()))
            .map(|c| c.config)
    }

    #[test]
    fn intervals() {
        assert_eq!(parse_interval("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_interval(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_interval("0").is_err());
        assert!(parse_interval("-1").is_err());
        assert!(parse_interval("soon")
            .unwrap_err()
            .contains("number of seconds"));
    }

    #[test]
    fn enums_accept_seed_values_in_any_case() {
        let cfg = parse(&[
            "--service-discovery-mode",
            "file_based",
            "--health-status",
            "ALL",
        ])
        .unwrap();
        assert_eq!(cfg.service_discovery_mode, DiscoveryMode::FileBased);
        assert_eq!(cfg.health_status, HealthStatus::All);
        let err = parse(&["--health-status", "SICK"]).unwrap_err().to_string();
        assert!(
            err.contains("HEALTH_STATUS") && err.contains("HEALTHY_OR_ELSE_ALL"),
            "{err}"
        );
    }

    #[test]
    fn lease_settings() {
        let cfg = parse(&["--lease-duration", "5s", "--heartbeat-interval", "2s"]).unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(
            err.contains("LEASE_DURATION") && err.contains("HEARTBEAT_INTERVAL"),
            "{err}"
        );
        let cfg = parse(&[
            "--shard-count",
            "3",
            "--replica-weight",
            "2.5",
            "--create-table",
            "true",
        ])
        .unwrap();
        assert_eq!(cfg.shard_count, ShardCount::Fixed(3));
        assert_eq!(cfg.replica_weight, 2.5);
        assert!(cfg.create_table);
        cfg.validate().unwrap();
        let err = parse(&["--shard-count", "none"]).unwrap_err().to_string();
        assert!(err.contains("SHARD_COUNT") && err.contains("auto"), "{err}");
        assert!(parse(&["--replica-weight", "0"]).is_err());
        assert!(parse(&["--cluster-name", "a#b"])
            .unwrap()
            .validate()
            .is_err());
    }

    #[test]
    fn rules_parameter_is_optional_and_empty_means_unset() {
        assert_eq!(parse(&[]).unwrap().rules_parameter(), None);
        let cfg = parse(&["--discovery-rules-parameter-name", " /x/rules "]).unwrap();
        assert_eq!(cfg.rules_parameter().as_deref(), Some("/x/rules"));
        let empty = parse(&["--discovery-rules-parameter-name", ""]).unwrap();
        assert_eq!(empty.rules_parameter(), None);
    }

    #[test]
    fn namespace_source() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(
            cfg.namespace_source().unwrap(),
            NamespaceSource::Ssm {
                parameter: "ECS-ServiceDiscovery-Namespaces".into()
            }
        );
        let cfg = parse(&["--discovery-namespaces", "a, b,a"]).unwrap();
        assert_eq!(
            cfg.namespace_source().unwrap(),
            NamespaceSource::Static(vec!["a".into(), "b".into()])
        );
        let cfg = parse(&["--discovery-namespaces", " , "]).unwrap();
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("DISCOVERY_NAMESPACES"));
    }
}
