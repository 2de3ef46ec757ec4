//! Wiring. Single-replica mode: the discovery loop publishes what the outputs
//! serve. Sharded mode: the coordinator decides roles; the leader work (discovery
//! and assignment) runs whenever this replica is elected, the follower work
//! otherwise. On SIGTERM/SIGINT the tasks stop, leases are released, and the HTTP
//! server keeps serving the released slot until its new holder has it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::assignment::AssignmentDoc;
use crate::aws::{self, AwsClients, AwsOptions, AwsSetupError};
use crate::clock::WallClock;
use crate::config::{Config, ConfigError, DiscoveryMode};
use crate::coordination::lease::{HolderInfo, LeaseTable};
use crate::coordination::{CoordinationConfig, CoordinationView, Coordinator};
use crate::discovery::guard::{self, DropGuard, Verdict};
use crate::discovery::{CycleReport, Discoverer, DiscoveryOptions};
use crate::follower;
use crate::identity::{self, Identity, NoAdvertiseAddr};
use crate::leader::{self, LeaderConfig};
use crate::output;
use crate::state::{LastDiscovery, Shared};
use crate::targets::{Body, Target};
use crate::telemetry::Metrics;
use tokio::net::TcpListener;
use tokio::sync::watch;

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
    // Cancelled after SIGTERM, before the HTTP server stops (see `drain`).
    let tasks_token = CancellationToken::new();
    let shutdown_tasks = tasks_token.clone();
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
            tasks.spawn(coordinator.run(shutdown_tasks.clone()));
            view
        }
    };
    let shared = Shared::new(replica_id, advertise_addr, coordination, metrics);
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

    let discovery = DiscoveryOptions {
        source,
        health: config.health_status,
        concurrency: config.discovery_concurrency.into(),
        interval: config.config_reload_frequency,
    };
    let guard = DropGuard::new(config.max_drop_fraction, config.drop_confirm_cycles);
    if config.lease_table.is_none() {
        tasks.spawn(discovery_loop(
            Discoverer::new(aws, discovery),
            shared.clone(),
            config.config_reload_frequency,
            shutdown_tasks.clone(),
            Publisher::new(Sink::Serve, guard, None),
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
            guard,
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

    let stop_serving = CancellationToken::new();
    let mut server = tokio::spawn(output::serve::serve(
        listener,
        output::http::router(shared.clone()),
        stop_serving.clone(),
    ));
    let peer_server = peer_listener.map(|peer| {
        let routes = output::http::peer_router(
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
    // Stopping: keep serving the last shard while the slot is handed over, and be
    // gone within STOP_LIMIT whatever peers, AWS or clients do.
    let deadline = tokio::time::Instant::now() + STOP_LIMIT;
    let last_view = shared.coordination();
    shared.set_draining();
    tasks_token.cancel();
    let joined = tokio::time::timeout_at(deadline - Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if joined.is_err() {
        tracing::warn!("background tasks did not stop in time; stopping anyway");
        tasks.abort_all();
    }
    // The slot held, or served stale after its lease lapsed: either way its
    // collector scrapes it until a successor has it.
    // The drain is bounded by the stop limit alone, not by HANDOFF_GRACE: ending it
    // before a successor has the slot would leave its targets unserved.
    if let (Some(slot), Some(table)) = (last_view.serving_slot(), &lease_table) {
        let limit = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .saturating_sub(Duration::from_secs(1));
        drain(&shared, slot, table, config.peer_token.as_deref(), limit).await;
    }
    stop_serving.cancel();
    let servers = async {
        let _ = server.await;
        if let Some(peer) = peer_server {
            let _ = peer.await;
        }
    };
    if tokio::time::timeout_at(deadline, servers).await.is_err() {
        tracing::warn!("open connections did not finish in time; closing them");
    }
    tracing::info!("shard-sd stopped");
    Ok(())
}

/// After releasing `slot` on shutdown, waits until its new holder has confirmed
/// its shard with the leader (so the slot's targets are never unserved), at most
/// `limit` (what is left of [`STOP_LIMIT`]). The leader is
/// looked up in the lease table on every attempt: a stopping leader has just
/// handed leadership over too.
async fn drain(
    shared: &Shared,
    slot: u32,
    table: &LeaseTable,
    token: Option<&str>,
    limit: Duration,
) {
    if limit.is_zero() {
        return;
    }
    let deadline = tokio::time::Instant::now() + limit;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(1))
        .build()
        .ok();
    tracing::info!(
        slot,
        "released slot; serving its targets until the new holder has them (at most {limit:?})"
    );
    let leader_pk = table.leader_pk();
    while tokio::time::Instant::now() < deadline {
        let attempt = async {
            let items = table.read(std::slice::from_ref(&leader_pk)).await.ok()?;
            let leader = items
                .get(&leader_pk)
                .filter(|l| !l.released && l.holder != shared.replica_id)?;
            let mut req = client
                .as_ref()?
                .get(format!("http://{}/v1/assignment", leader.addr));
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            let doc: AssignmentDoc = req.send().await.ok()?.json().await.ok()?;
            Some(doc.handed_over(slot, &shared.replica_id))
        };
        let handed = tokio::time::timeout_at(deadline, attempt).await;
        if handed == Ok(Some(true)) {
            tracing::info!(slot, "slot handed over");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tracing::info!(
        slot,
        "handoff not confirmed within {limit:?}; stopping anyway"
    );
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
        seed_max_age: follower::LONG_POLL + config.lease_duration * 2,
    }
}

/// Whenever this replica becomes leader: runs discovery (fresh caches) and the
/// leader's assignment work for that one term, until the term ends. A re-taken
/// lease is a new term: the work restarts from the assignment the last one left.
/// Each term is worked once: a term is never started again, nor one older than
/// a term already worked.
async fn lead_when_elected(
    cfg: LeaderConfig,
    aws: AwsClients,
    discovery: DiscoveryOptions,
    interval: Duration,
    guard: DropGuard,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let mut view = shared.coordination_receiver();
    let mut last_term = 0;
    loop {
        let term = loop {
            if let Some(term) = leader::leading_term(&shared.coordination()) {
                if term > last_term {
                    break term;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                changed = view.changed() => {
                    if changed.is_err() {
                        return; // the coordinator is gone
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        };
        last_term = term;
        // Taken, not kept: while leading, this replica holds its own assignment only.
        let mirror = shared.take_mirror();
        let seed = leader::seed_for(term, mirror.clone(), cfg.seed_max_age);
        let leading = shutdown.child_token();
        let (targets_tx, targets_rx) = watch::channel(None);
        // The guard's baseline until the first publication: what followers serve,
        // the inherited assignment, or, without one, the last mirrored copy.
        let inherited = crate::cpu_bound(|| {
            mirror
                .as_ref()
                .and_then(|m| m.contents())
                .map(|c| c.targets.clone())
        });
        drop(mirror);
        let discovering = tokio::spawn(discovery_loop(
            Discoverer::new(aws.clone(), discovery.clone()),
            shared.clone(),
            interval,
            leading.clone(),
            Publisher::new(Sink::Leader(targets_tx), guard.clone(), inherited),
        ));
        leader::run(
            cfg.clone(),
            term,
            shared.clone(),
            view.clone(),
            targets_rx,
            seed,
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

/// What a discovery loop carries from cycle to cycle besides the discovery caches.
struct Publisher {
    sink: Sink,
    guard: DropGuard,
    /// The last list this loop published.
    published: Option<Arc<Vec<Target>>>,
    /// What is served before this loop's first publication (a new leader's
    /// inherited assignment): the guard's baseline until then.
    inherited: Option<Arc<Vec<Target>>>,
    known_problems: BTreeSet<String>,
}

impl Publisher {
    fn new(sink: Sink, guard: DropGuard, inherited: Option<Arc<Vec<Target>>>) -> Self {
        Publisher {
            sink,
            guard,
            published: None,
            inherited,
            known_problems: BTreeSet::new(),
        }
    }
}

/// Runs discovery cycles every `interval` and hands their targets to `publisher`.
async fn discovery_loop(
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
        let report = tokio::select! {
            report = discoverer.run_cycle() => report,
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
    // The very list published last, and no drop on hold: nothing to judge or publish.
    let unchanged = publisher
        .published
        .as_ref()
        .is_some_and(|p| Arc::ptr_eq(p, &built.targets))
        && publisher.guard.hold().is_none();
    let problems: BTreeSet<String> = built.problems.iter().map(ToString::to_string).collect();
    for new in problems.difference(&publisher.known_problems) {
        tracing::warn!("{new}");
    }
    for gone in publisher.known_problems.difference(&problems) {
        tracing::info!("resolved: {gone}");
    }
    publisher.known_problems = problems;

    let may_publish = publisher.published.is_some() || report.complete;
    let baseline = publisher
        .published
        .as_ref()
        .or(publisher.inherited.as_ref());
    let verdict = match (may_publish && !unchanged, baseline) {
        (true, Some(baseline)) => publisher.guard.check(baseline, &built.targets),
        _ => Verdict::Publish,
    };
    let previous = baseline.map_or(0, |b| b.len());
    let mut changed = false;
    if may_publish && !unchanged {
        // A held drop serves what was published and what is new, never less.
        let (list, confirmed) = match (&verdict, baseline) {
            (Verdict::Hold(_), Some(baseline)) => {
                (Arc::new(guard::union(baseline, &built.targets)), false)
            }
            _ => (built.targets.clone(), true),
        };
        changed = match &publisher.sink {
            Sink::Serve => shared.publish(crate::cpu_bound(|| Body::render(list.iter()))),
            Sink::Leader(tx) => tx.send_if_modified(|current| {
                let differs = current
                    .as_ref()
                    .is_none_or(|c| !Arc::ptr_eq(c, &list) && **c != *list);
                if differs {
                    *current = Some(list.clone());
                }
                differs
            }),
        };
        if confirmed {
            publisher.published = Some(list);
        }
    }
    if !unchanged {
        // A list was built (and, single, rendered): its transient buffers are free now.
        crate::release_free_memory();
    }
    if changed {
        tracing::info!(
            cycle = report.cycle,
            targets = built.targets.len(),
            previous,
            "targets changed"
        );
    } else if !may_publish {
        tracing::warn!(
            cycle = report.cycle,
            "not serving discovered targets yet: discovery has not read every configured namespace \
             and service"
        );
    }
    let hold = publisher.guard.hold().cloned();
    shared.metrics.drop_hold.set(i64::from(hold.is_some()));
    shared.update_status(|status| status.drop_hold = hold);
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
    let pace = discoverer
        .aws()
        .pacer
        .max_rps()
        .map(|_| discoverer.aws().pacer.rate());
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
