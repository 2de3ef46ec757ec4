//! Wiring only: build, spawn, shut down in order. Single-replica mode: the
//! discovery loop publishes what the outputs serve. Sharded mode: the coordinator
//! decides roles; the leader work (discovery and assignment) runs whenever this
//! replica is elected, the follower work otherwise (see [`crate::cluster`]). On
//! SIGTERM/SIGINT the tasks stop, leases are released, and the HTTP server keeps
//! serving the released slot until its new holder has it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::aws::{self, AwsClients, AwsOptions, AwsSetupError};
use crate::clock::WallClock;
use crate::cluster::leader::{self, LeaderConfig};
use crate::cluster::{follower, handoff, protocol, routes};
use crate::config::{Config, ConfigError, DiscoveryMode};
use crate::coordination::lease::{HolderInfo, LeaseTable};
use crate::coordination::{CoordinationConfig, CoordinationView, Coordinator};
use crate::discovery::guard::DropGuard;
use crate::discovery::publish::{discovery_loop, DiscoverySettings, Publisher, Sink};
use crate::discovery::{Discoverer, DiscoveryOptions};
use crate::events::EventsSource;
use crate::identity::{self, Identity, NoAdvertiseAddr};
use crate::output;
use crate::state::Shared;
use crate::telemetry::Metrics;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Aws(#[from] AwsSetupError),
    #[error(transparent)]
    Identity(#[from] NoAdvertiseAddr),
    #[error("cannot listen on {addr} ({variable}): {source}")]
    Bind {
        variable: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// ECS kills a task 30 s after SIGTERM by default: everything after the signal
/// (releasing leases, handing the slot over, finishing requests) fits in this.
pub const STOP_LIMIT: Duration = Duration::from_secs(20);

async fn bind(variable: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind {
            variable,
            addr,
            source,
        })
}

/// Runs the sidecar until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let source = config.namespace_source()?;
    let aws = aws::connect(&AwsOptions {
        region: config.aws_region.clone(),
        endpoint_url: config.aws_endpoint_url.clone(),
        call_timeout: config.aws_call_timeout,
        max_attempts: config.aws_max_attempts,
        max_rps: config.aws_max_rps,
    })
    .await?;
    let sharded = config.lease_table.is_some();
    let Identity {
        replica_id,
        advertise_addr,
    } = identity::resolve(
        config.replica_id.as_deref(),
        config.advertise_addr.as_deref(),
        config.peer_listen_addr.port(),
        sharded,
    )
    .await?;
    // Bind before joining the cluster: a replica that cannot serve must not take a slot.
    let listener = bind("LISTEN_ADDR", config.listen_addr).await?;
    let peer_listener = match sharded {
        true => Some(bind("PEER_LISTEN_ADDR", config.peer_listen_addr).await?),
        false => None,
    };
    let mut tasks = tokio::task::JoinSet::new();
    // Cancelled after SIGTERM, before the HTTP server stops (see `stop`).
    let tasks_token = CancellationToken::new();
    let metrics = Arc::new(Metrics::new(&aws.stats));
    let lease_table = config
        .lease_table
        .as_deref()
        .map(|table| lease_table(&config, &aws, table));
    let coordination = match &lease_table {
        None => tokio::sync::watch::channel(CoordinationView::single()).1,
        Some(table) => {
            let coordinator = coordinator(
                &config,
                table.clone(),
                &replica_id,
                &advertise_addr,
                metrics.lease_renewal_failures.clone(),
            );
            let view = coordinator.subscribe();
            tasks.spawn(coordinator.run(tasks_token.clone()));
            view
        }
    };
    let shared = Shared::new(
        replica_id,
        advertise_addr,
        coordination,
        metrics,
        config.meta_labels,
    );
    tracing::info!(
        addr = %config.listen_addr,
        peer_addr = peer_listener.as_ref().map(|_| config.peer_listen_addr.to_string()),
        mode = ?config.service_discovery_mode,
        replica_id = %shared.replica_id,
        advertise_addr = %shared.advertise_addr,
        region = %aws.region,
        lease_table = config.lease_table.as_deref().unwrap_or("-"),
        "shard-sd started"
    );
    spawn_work(&config, source, aws, &shared, &mut tasks, &tasks_token);

    let stop_serving = CancellationToken::new();
    let mut server = tokio::spawn(output::serve::serve(
        listener,
        output::http::router(shared.clone()),
        stop_serving.clone(),
    ));
    let peer_server = peer_listener.map(|peer| {
        let routes = routes::router(
            shared.clone(),
            config.peer_token.clone(),
            tasks_token.clone(),
        );
        tokio::spawn(output::serve::serve(peer, routes, tasks_token.clone()))
    });
    tokio::select! {
        _ = shutdown.cancelled() => {}
        // The server task ended by itself (it only does on a panic): stop everything.
        _ = &mut server => {
            tasks.shutdown().await;
            return Ok(());
        }
    }
    let running = Running {
        shared,
        tasks,
        tasks_token,
        lease_table,
        stop_serving,
        servers: std::iter::once(server).chain(peer_server).collect(),
    };
    stop(running, config.peer_token.as_deref()).await;
    Ok(())
}

/// Spawns the work of the mode: the discovery loop (single mode), or the
/// follower and the leader work for each term this replica is elected in
/// (sharded); and the file output.
fn spawn_work(
    config: &Config,
    source: crate::discovery::namespaces::NamespaceSource,
    aws: AwsClients,
    shared: &Arc<Shared>,
    tasks: &mut tokio::task::JoinSet<()>,
    token: &CancellationToken,
) {
    let discovery = DiscoveryOptions {
        source,
        health: config.health_status,
        concurrency: config.discovery_concurrency.into(),
        interval: config.config_reload_frequency,
        spread: config.events_queue_url.is_none(),
        rules: config
            .rules_parameter()
            .map(|name| crate::discovery::rules::RulesKeeper::new(&name)),
    };
    let guard = DropGuard::new(config.max_drop_fraction, config.drop_confirm_cycles);
    let events = config
        .events_queue_url
        .clone()
        .map(|queue_url| EventsSource {
            sqs: aws.sqs(crate::events::LONG_POLL, crate::events::STALL_MARGIN),
            queue_url,
            fallback: config.events_fallback_frequency,
        });
    if config.lease_table.is_none() {
        tasks.spawn(discovery_loop(
            Discoverer::new(aws, discovery),
            shared.clone(),
            config.config_reload_frequency,
            token.clone(),
            Publisher::new(Sink::Serve, guard, None),
            events,
        ));
    } else {
        // Every replica keeps the last good rules for when it is elected.
        if let Some(keeper) = discovery.rules.clone() {
            let shared = shared.clone();
            let seen =
                move |report: &crate::discovery::rules::RulesReport| shared.record_rules(report);
            tasks.spawn(crate::discovery::rules::keep_reading(
                keeper,
                aws.ssm.clone(),
                config.config_reload_frequency,
                seen,
                token.clone(),
            ));
        }
        tasks.spawn(follower::run(
            shared.clone(),
            shared.coordination_receiver(),
            config.peer_token.clone(),
            token.clone(),
        ));
        tasks.spawn(leader::lead_when_elected(
            leader_config(config),
            aws,
            DiscoverySettings {
                options: discovery,
                interval: config.config_reload_frequency,
                events,
            },
            guard,
            shared.clone(),
            token.clone(),
        ));
    }
    if config.service_discovery_mode == DiscoveryMode::FileBased {
        tasks.spawn(output::file::run(
            config.file_sd_path(),
            shared.clone(),
            token.clone(),
        ));
    }
}

/// What `stop` shuts down.
struct Running {
    shared: Arc<Shared>,
    tasks: tokio::task::JoinSet<()>,
    tasks_token: CancellationToken,
    lease_table: Option<LeaseTable>,
    stop_serving: CancellationToken,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

/// Stops in order within [`STOP_LIMIT`], whatever peers, AWS or clients do: the
/// tasks (leases released), then the drain of the slot served (its collector
/// scrapes it until a successor has it), then the listeners.
async fn stop(mut running: Running, peer_token: Option<&str>) {
    let deadline = tokio::time::Instant::now() + STOP_LIMIT;
    let shared = &running.shared;
    let last_view = shared.coordination();
    shared.set_draining();
    running.tasks_token.cancel();
    let tasks = &mut running.tasks;
    let joined = tokio::time::timeout_at(deadline - Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!("background tasks did not stop in time; stopping anyway");
        running.tasks.abort_all();
    }
    // The slot held, or served stale after its lease lapsed. The drain is bounded
    // by the stop limit alone, not by HANDOFF_GRACE: ending it before a successor
    // has the slot would leave its targets unserved.
    if let (Some(slot), Some(table)) = (last_view.serving_slot(), &running.lease_table) {
        let limit = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .saturating_sub(Duration::from_secs(1));
        handoff::drain(shared, slot, table, peer_token, limit).await;
    }
    running.stop_serving.cancel();
    let servers = futures::future::join_all(running.servers);
    if tokio::time::timeout_at(deadline, servers).await.is_err() {
        tracing::warn!("open connections did not finish in time; closing them");
    }
    tracing::info!("shard-sd stopped");
}

fn lease_table(config: &Config, aws: &AwsClients, table: &str) -> LeaseTable {
    // A renewal must fail before its renew deadline (2/3 of the lease), not after.
    let dynamodb = aws.dynamodb(config.heartbeat_interval, config.lease_duration / 3);
    LeaseTable::new(
        dynamodb,
        table.trim().to_owned(),
        config.cluster_name.clone(),
        WallClock::with_offset_ms(config.clock_offset),
    )
}

fn coordinator(
    config: &Config,
    table: LeaseTable,
    replica_id: &str,
    advertise_addr: &str,
    renewal_failures: prometheus_client::metrics::counter::Counter,
) -> Coordinator {
    Coordinator::new(
        table,
        CoordinationConfig {
            shard_count: config.shard_count,
            lease: config.lease_duration,
            heartbeat: config.heartbeat_interval,
            create_table: config.create_table,
            me: HolderInfo {
                id: replica_id.to_owned(),
                incarnation: crate::coordination::lease::new_rvn(),
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
        // A mirror is confirmed by each long-poll answer (at least every LONG_POLL);
        // its leader's death and the election take about two leases more.
        seed_max_age: protocol::LONG_POLL + config.lease_duration * 2,
    }
}
