//! Wiring. Single-replica mode: the discovery loop publishes what the outputs
//! serve. Sharded mode: the coordinator decides roles; the leader work (discovery
//! and assignment) runs whenever this replica is elected, the follower work
//! otherwise. On SIGTERM/SIGINT the tasks stop, leases are released, and the HTTP
//! server keeps serving the released slot until its new holder has it.

use std::collections::BTreeSet;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::aws::{self, AwsClients, AwsOptions, AwsSetupError};
use crate::clock::WallClock;
use crate::config::{Config, ConfigError, DiscoveryMode};
use crate::coordination::lease::{HolderInfo, LeaseTable};
use crate::coordination::{CoordinationConfig, CoordinationView, Coordinator, Role};
use crate::discovery::{CycleReport, Discoverer, DiscoveryOptions};
use crate::follower;
use crate::identity::{self, Identity};
use crate::leader::{self, LeaderConfig};
use crate::output;
use crate::state::{LastDiscovery, Shared};
use crate::targets;
use crate::targets::Target;
use crate::telemetry::Metrics;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Aws(#[from] AwsSetupError),
    #[error("cannot listen on {addr} (LISTEN_ADDR): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs the sidecar until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let source = config.namespace_source()?;
    let aws = aws::connect(&AwsOptions {
        region: config.aws_region.clone(),
        endpoint_url: config.aws_endpoint_url.clone(),
        call_timeout: config.aws_call_timeout,
        max_attempts: config.aws_max_attempts,
    })
    .await?;
    let Identity {
        replica_id,
        advertise_addr,
    } = identity::resolve(
        config.replica_id.as_deref(),
        config.advertise_addr.as_deref(),
        config.listen_addr,
    )
    .await;
    let mut tasks = tokio::task::JoinSet::new();
    // Cancelled after SIGTERM, before the HTTP server stops (see `drain`).
    let tasks_token = CancellationToken::new();
    let shutdown_tasks = tasks_token.clone();
    let metrics = Arc::new(Metrics::new(&aws.stats));
    let coordination = match &config.lease_table {
        None => tokio::sync::watch::channel(CoordinationView::single()).1,
        Some(table) => {
            let coordinator = coordinator(
                &config,
                &aws,
                table,
                &replica_id,
                &advertise_addr,
                metrics.lease_renewal_failures.clone(),
            );
            let view = coordinator.subscribe();
            tasks.spawn(coordinator.run(shutdown_tasks.clone()));
            view
        }
    };
    let shared = Shared::new(replica_id, advertise_addr, coordination, metrics);
    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen_addr,
            source,
        })?;
    tracing::info!(
        addr = %config.listen_addr,
        mode = ?config.service_discovery_mode,
        replica_id = %shared.replica_id,
        advertise_addr = %shared.advertise_addr,
        region = %aws.region,
        lease_table = config.lease_table.as_deref().unwrap_or("-"),
        "shard-sd started"
    );

    let discovery = DiscoveryOptions {
        source,
        health: config.health_status,
        concurrency: config.discovery_concurrency.into(),
    };
    if config.lease_table.is_none() {
        tasks.spawn(discovery_loop(
            Discoverer::new(aws, discovery),
            shared.clone(),
            config.config_reload_frequency,
            shutdown_tasks.clone(),
            Sink::Serve,
        ));
    } else {
        tasks.spawn(follower::run(
            shared.clone(),
            shared.coordination_receiver(),
            config.peer_token.clone(),
            shutdown_tasks.clone(),
        ));
        tasks.spawn(follower::mirror(
            shared.clone(),
            shared.coordination_receiver(),
            config.peer_token.clone(),
            shutdown_tasks.clone(),
        ));
        tasks.spawn(lead_when_elected(
            leader_config(&config),
            aws,
            discovery,
            config.config_reload_frequency,
            shared.clone(),
            shutdown_tasks.clone(),
        ));
    }
    if config.service_discovery_mode == DiscoveryMode::FileBased {
        tasks.spawn(output::file::run(
            config.file_sd_path(),
            shared.subscribe(),
            shutdown_tasks.clone(),
        ));
    }

    let app = output::http::router(shared.clone(), config.peer_token.clone());
    let stop_serving = CancellationToken::new();
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_serving.clone().cancelled_owned())
            .into_future(),
    );
    tokio::select! {
        _ = shutdown.cancelled() => {}
        // The server failed: stop everything.
        result = &mut server => {
            tasks.shutdown().await;
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(RunError::Serve(e)),
                Err(e) => Err(RunError::Serve(std::io::Error::other(e))),
            };
        }
    }
    // Stopping: keep serving the last shard while the slot is handed over.
    let last_view = shared.coordination();
    shared.set_draining();
    tasks_token.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(slot) = last_view.slot {
        drain(
            &shared,
            slot,
            &last_view,
            config.peer_token.as_deref(),
            config.handoff_grace,
        )
        .await;
    }
    stop_serving.cancel();
    let served = server.await;
    tracing::info!("shard-sd stopped");
    match served {
        Ok(result) => result.map_err(RunError::Serve),
        Err(e) => Err(RunError::Serve(std::io::Error::other(e))),
    }
}

/// After releasing `slot` on shutdown, waits until its new holder has confirmed
/// its shard with the leader (so the slot's targets are never unserved), at most
/// `HANDOFF_GRACE` and 20 s (ECS kills a task 30 s after SIGTERM by default).
async fn drain(
    shared: &Shared,
    slot: u32,
    last: &CoordinationView,
    token: Option<&str>,
    grace: Duration,
) {
    let limit = grace.min(Duration::from_secs(20));
    if limit.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + limit;
    let leader = last
        .leader_addr
        .clone()
        .filter(|_| last.role != Role::Leader);
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .ok();
    tracing::info!(
        slot,
        "released slot; serving its targets until the new holder has them (at most {limit:?})"
    );
    while tokio::time::Instant::now() < deadline {
        if let (Some(addr), Some(client)) = (&leader, &client) {
            let mut req = client.get(format!("http://{addr}/v1/assignment"));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            let handed = async {
                let v: serde_json::Value = req.send().await.ok()?.json().await.ok()?;
                let s = v["slots"]
                    .as_array()?
                    .iter()
                    .find(|s| s["slot"] == slot)?
                    .clone();
                let taken = s["holder"].as_str().is_some_and(|h| h != shared.replica_id);
                let confirmed = s["confirmed_generation"].as_u64()? >= s["generation"].as_u64()?;
                Some(taken && confirmed)
            };
            if handed.await == Some(true) {
                tracing::info!(slot, "slot handed over");
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn coordinator(
    config: &Config,
    aws: &AwsClients,
    table: &str,
    replica_id: &str,
    advertise_addr: &str,
    renewal_failures: prometheus_client::metrics::counter::Counter,
) -> Coordinator {
    // A renewal must fail before its renew deadline (2/3 of the lease), not after.
    let dynamodb = aws.dynamodb(config.heartbeat_interval, config.lease_duration / 3);
    let table = LeaseTable::new(
        dynamodb,
        table.trim().to_owned(),
        config.cluster_name.clone(),
        WallClock::with_offset_ms(config.clock_offset),
    );
    Coordinator::new(
        table,
        CoordinationConfig {
            shard_count: config.shard_count,
            lease: config.lease_duration,
            heartbeat: config.heartbeat_interval,
            create_table: config.create_table,
            me: HolderInfo {
                id: replica_id.to_owned(),
                addr: advertise_addr.to_owned(),
                weight: config.replica_weight,
                lease: config.lease_duration,
            },
            renewal_failures,
        },
    )
}

/// Cancels `token` on SIGTERM (how ECS stops a task) or SIGINT.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT received, shutting down"),
            _ = term => tracing::info!("SIGTERM received, shutting down"),
        }
        token.cancel();
    });
}

fn leader_config(config: &Config) -> LeaderConfig {
    LeaderConfig {
        shard_by: config.shard_by,
        params: config.sharding_params(),
        handoff_grace: config.handoff_grace,
        membership_grace: config.membership_grace(),
    }
}

/// Whenever this replica becomes leader: runs discovery (fresh caches) and the
/// leader's assignment work until leadership ends.
async fn lead_when_elected(
    cfg: LeaderConfig,
    aws: AwsClients,
    discovery: DiscoveryOptions,
    interval: Duration,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut view = shared.coordination_receiver();
    loop {
        while shared.coordination().role != Role::Leader {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = view.changed() => {}
                _ = shutdown.cancelled() => return,
            }
        }
        let leading = shutdown.child_token();
        let (targets_tx, targets_rx) = watch::channel(None);
        let discovering = tokio::spawn(discovery_loop(
            Discoverer::new(aws.clone(), discovery.clone()),
            shared.clone(),
            interval,
            leading.clone(),
            Sink::Leader(targets_tx),
        ));
        leader::run(
            cfg.clone(),
            shared.clone(),
            view.clone(),
            targets_rx,
            leading.clone(),
        )
        .await;
        leading.cancel();
        let _ = discovering.await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// Where a discovery loop's targets go.
enum Sink {
    /// Single-replica mode: serve them.
    Serve,
    /// Leader: hand each complete result to the assignment.
    Leader(watch::Sender<Option<Arc<Vec<Target>>>>),
}

/// Runs discovery cycles every `interval` and hands their targets to `sink`.
async fn discovery_loop(
    mut discoverer: Discoverer,
    shared: Arc<Shared>,
    interval: Duration,
    shutdown: CancellationToken,
    sink: Sink,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut known_problems = BTreeSet::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let report = tokio::select! {
            report = discoverer.run_cycle() => report,
            _ = shutdown.cancelled() => return,
        };
        publish_cycle(&discoverer, &report, &shared, &mut known_problems, &sink);
    }
}

/// Publishes the targets after a cycle and records its status. The first list is
/// published only once every configured part has been read; after that the list
/// is always published (failed parts keep their previous targets).
fn publish_cycle(
    discoverer: &Discoverer,
    report: &CycleReport,
    shared: &Shared,
    known_problems: &mut BTreeSet<String>,
    sink: &Sink,
) {
    let built = discoverer.targets();
    let problems: BTreeSet<String> = built.problems.iter().map(ToString::to_string).collect();
    for new in problems.difference(known_problems) {
        tracing::warn!("{new}");
    }
    for gone in known_problems.difference(&problems) {
        tracing::info!("resolved: {gone}");
    }
    *known_problems = problems;

    let (previous, may_publish, changed) = match sink {
        Sink::Serve => {
            let previous = shared.targets().map(|p| p.targets);
            let may_publish = previous.is_some() || report.complete;
            let changed =
                may_publish && shared.publish(targets::render(&built.targets), built.targets.len());
            (previous, may_publish, changed)
        }
        Sink::Leader(tx) => {
            let previous = tx.borrow().as_ref().map(|t| t.len());
            let may_publish = previous.is_some() || report.complete;
            let changed = may_publish
                && tx.send_if_modified(|current| {
                    let differs = current.as_deref() != Some(&built.targets);
                    if differs {
                        *current = Some(Arc::new(built.targets.clone()));
                    }
                    differs
                });
            (previous, may_publish, changed)
        }
    };
    if changed {
        tracing::info!(
            cycle = report.cycle,
            targets = built.targets.len(),
            previous = previous.unwrap_or(0),
            "targets changed"
        );
    } else if !may_publish {
        tracing::warn!(
            cycle = report.cycle,
            "not serving targets yet: discovery has not read every configured namespace and service"
        );
    }
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
    if report.errors.is_empty() {
        let unix = report
            .started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        metrics.last_discovery_success.set(unix.as_secs_f64());
    }
    let time = humantime::format_rfc3339_millis(report.started).to_string();
    shared.update_status(|status| {
        status.last_discovery = Some(LastDiscovery {
            time: time.clone(),
            outcome: report.outcome(),
            duration_ms: report.duration_ms,
            aws_requests: report.aws_requests,
            services_refreshed: report.services_refreshed,
            errors: report.errors.clone(),
        });
        if report.errors.is_empty() {
            status.last_success = Some(time);
        }
        status.namespaces = report.namespaces.clone();
        status.problems = known_problems.iter().cloned().collect();
        status.skipped_instances = built.skipped_without_ipv4;
    });
}
