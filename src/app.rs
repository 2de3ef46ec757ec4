//! Wiring: starts the discovery loop and the outputs, and stops them cleanly on
//! SIGTERM/SIGINT. The loop is the only writer of the shared state; everything
//! else reads it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::aws::{self, AwsClients, AwsOptions, AwsSetupError};
use crate::clock::WallClock;
use crate::config::{Config, ConfigError, DiscoveryMode};
use crate::coordination::lease::{HolderInfo, LeaseTable};
use crate::coordination::{CoordinationConfig, CoordinationView, Coordinator};
use crate::discovery::{CycleReport, Discoverer, DiscoveryOptions};
use crate::identity::{self, Identity};
use crate::output;
use crate::state::{LastDiscovery, Shared};
use crate::targets;

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
    let coordination = match &config.lease_table {
        None => tokio::sync::watch::channel(CoordinationView::single()).1,
        Some(table) => {
            let coordinator = coordinator(&config, &aws, table, &replica_id, &advertise_addr);
            let view = coordinator.subscribe();
            tasks.spawn(coordinator.run(shutdown.clone()));
            view
        }
    };
    let shared = Shared::new(replica_id, advertise_addr, coordination);
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

    let discoverer = Discoverer::new(
        aws,
        DiscoveryOptions {
            source,
            health: config.health_status,
            concurrency: config.discovery_concurrency.into(),
        },
    );
    tasks.spawn(discovery_loop(
        discoverer,
        shared.clone(),
        config.config_reload_frequency,
        shutdown.clone(),
    ));
    if config.service_discovery_mode == DiscoveryMode::FileBased {
        tasks.spawn(output::file::run(
            config.file_sd_path(),
            shared.subscribe(),
            shutdown.clone(),
        ));
    }

    let app = output::http::router(shared);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    tracing::info!("shard-sd stopped");
    served.map_err(RunError::Serve)
}

fn coordinator(
    config: &Config,
    aws: &AwsClients,
    table: &str,
    replica_id: &str,
    advertise_addr: &str,
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

/// Runs discovery cycles every `interval` and publishes their targets.
async fn discovery_loop(
    mut discoverer: Discoverer,
    shared: Arc<Shared>,
    interval: Duration,
    shutdown: CancellationToken,
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
        publish_cycle(&discoverer, &report, &shared, &mut known_problems);
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

    let previous = shared.targets().map(|p| p.targets);
    let may_publish = previous.is_some() || report.complete;
    let changed =
        may_publish && shared.publish(targets::render(&built.targets), built.targets.len());
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
