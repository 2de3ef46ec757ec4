//! Coordination with real processes sharing a DynamoDB table on moto: contention,
//! SIGKILL, SIGSTOP/SIGCONT, clock skew and SIGTERM.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{aws_env, wait_for, Moto, ShardSd};

const LEASE: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_millis(500);

async fn replica(moto: &Moto, id: &str, shard_count: &str, extra: &[(&str, &str)]) -> ShardSd {
    replica_at(&moto.endpoint, id, shard_count, extra).await
}

async fn replica_at(
    endpoint: &str,
    id: &str,
    shard_count: &str,
    extra: &[(&str, &str)],
) -> ShardSd {
    let mut env = aws_env(endpoint);
    env.retain(|(k, _)| k != "RUST_LOG");
    for (k, v) in [
        ("LEASE_TABLE", "leases"),
        ("CREATE_TABLE", "true"),
        ("CLUSTER_NAME", "test"),
        ("SHARD_COUNT", shard_count),
        ("REPLICA_ID", id),
        ("LEASE_DURATION", "3s"),
        ("HEARTBEAT_INTERVAL", "500ms"),
        ("HANDOFF_GRACE", "2s"),
        ("DISCOVERY_NAMESPACES", "ecs-services"),
        ("CONFIG_RELOAD_FREQUENCY", "5"),
        ("LOG_FORMAT", "json"),
        ("RUST_LOG", "info,leader_action=debug"),
    ] {
        env.push((k.into(), v.into()));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ShardSd::start(id, &env).await
}

#[derive(Clone, Debug, PartialEq)]
struct Seen {
    role: String,
    slot: Option<u64>,
    term: Option<u64>,
}

async fn observe(replicas: &[&ShardSd]) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    for r in replicas {
        let s = r.status().await;
        out.insert(
            s["replica_id"].as_str().unwrap_or_default().to_owned(),
            Seen {
                role: s["role"].as_str().unwrap_or_default().to_owned(),
                slot: s["slot"].as_u64(),
                term: s["term"].as_u64(),
            },
        );
    }
    out
}

fn leaders(seen: &BTreeMap<String, Seen>) -> Vec<&String> {
    seen.iter()
        .filter(|(_, s)| s.role == "leader")
        .map(|(id, _)| id)
        .collect()
}

/// Checks the invariants of one observation and returns whether it is settled:
/// one leader, `slots` distinct slots held, the rest standbys.
fn check(seen: &BTreeMap<String, Seen>, slots: usize) -> bool {
    assert!(leaders(seen).len() <= 1, "two leaders at once: {seen:?}");
    let mut held: Vec<u64> = seen.values().filter_map(|s| s.slot).collect();
    let n = held.len();
    held.sort();
    held.dedup();
    assert_eq!(held.len(), n, "a slot held twice: {seen:?}");
    assert!(
        held.iter().all(|s| (*s as usize) < slots),
        "slot out of range: {seen:?}"
    );
    // Settled: one leader, all slots held, and every replica has read the leader's term.
    leaders(seen).len() == 1
        && n == slots.min(seen.len())
        && seen.values().all(|s| s.term.is_some())
}

async fn settle(replicas: &[&ShardSd], slots: usize) -> BTreeMap<String, Seen> {
    wait_for(
        "one leader and all slots held",
        Duration::from_secs(20),
        || async {
            let seen = observe(replicas).await;
            check(&seen, slots).then_some(seen)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn three_then_five_replicas_contend_for_three_slots() {
    let moto = Moto::start().await;
    let mut rs = Vec::new();
    for i in 0..3 {
        rs.push(replica(&moto, &format!("r{i}"), "3", &[]).await);
    }
    let refs: Vec<&ShardSd> = rs.iter().collect();
    settle(&refs, 3).await;
    for _ in 0..20 {
        let seen = observe(&refs).await;
        assert!(check(&seen, 3), "not settled: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for i in 3..5 {
        rs.push(replica(&moto, &format!("r{i}"), "3", &[]).await);
    }
    let refs: Vec<&ShardSd> = rs.iter().collect();
    let mut last = settle(&refs, 3).await;
    for _ in 0..30 {
        let seen = observe(&refs).await;
        assert!(check(&seen, 3), "not settled: {seen:?}");
        assert_eq!(
            seen.values().filter(|s| s.role == "standby").count(),
            2,
            "{seen:?}"
        );
        // Nothing moves in a steady state.
        assert_eq!(seen, last);
        last = seen;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The leader sees the three live slots.
    let leader = rs
        .iter()
        .find(|r| last[&r.proc.name_id()].role == "leader")
        .unwrap();
    let status = leader.status().await;
    assert_eq!(
        status["live_slots"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
}

trait NameId {
    fn name_id(&self) -> String;
}

impl NameId for common::Proc {
    /// The replica id this harness gave the process (`shard-sd-<id>-<port>`).
    fn name_id(&self) -> String {
        self.name.split('-').nth(2).unwrap_or_default().to_owned()
    }
}

/// Polls `replicas` until one is leader with a term above `old_term`; returns (id, term).
async fn new_leader(replicas: &[&ShardSd], old_term: u64, timeout: Duration) -> (String, u64) {
    wait_for("a new leader", timeout, || async {
        let seen = observe(replicas).await;
        assert!(leaders(&seen).len() <= 1, "two leaders: {seen:?}");
        seen.into_iter()
            .find(|(_, s)| s.role == "leader" && s.term.is_some_and(|t| t > old_term))
            .map(|(id, s)| (id, s.term.unwrap_or(0)))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_leader_or_a_slot_holder_is_taken_over_within_lease_plus_heartbeat() {
    let moto = Moto::start().await;
    let mut rs = Vec::new();
    for i in 0..4 {
        rs.push(Some(replica(&moto, &format!("r{i}"), "3", &[]).await));
    }
    let all: Vec<&ShardSd> = rs.iter().flatten().collect();
    let seen = settle(&all, 3).await;
    let leader_id = leaders(&seen)[0].clone();
    let old_term = seen[&leader_id].term.unwrap();

    // SIGKILL the leader.
    let idx = rs
        .iter()
        .position(|r| r.as_ref().is_some_and(|r| r.proc.name_id() == leader_id))
        .unwrap();
    let killed_at = Instant::now();
    rs[idx].as_ref().unwrap().proc.signal(libc::SIGKILL);
    let rest: Vec<&ShardSd> = rs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .filter_map(|(_, r)| r.as_ref())
        .collect();
    let (new_id, new_term) = new_leader(&rest, old_term, LEASE * 3).await;
    let leader_gap = killed_at.elapsed();
    println!("MEASURE leader SIGKILL -> new leader {new_id} term {new_term}: {leader_gap:?}");
    assert!(new_term > old_term);
    // Bound: lease + one heartbeat, plus the 50 ms status polling of this test.
    assert!(
        leader_gap <= LEASE + HEARTBEAT + Duration::from_millis(300),
        "{leader_gap:?}"
    );
    // The dead leader's slot went to the standby.
    let seen = settle(&rest, 3).await;
    assert_eq!(seen.values().filter(|s| s.slot.is_some()).count(), 3);
    rs[idx] = None;

    // SIGKILL a slot holder that is not the leader: no standby left, so start one.
    rs.push(Some(replica(&moto, "r4", "3", &[]).await));
    let all: Vec<&ShardSd> = rs.iter().flatten().collect();
    let seen = settle(&all, 3).await;
    let (victim, victim_slot) = seen
        .iter()
        .find(|(_, s)| s.role == "follower")
        .map(|(id, s)| (id.clone(), s.slot.unwrap()))
        .unwrap();
    let idx = rs
        .iter()
        .position(|r| r.as_ref().is_some_and(|r| r.proc.name_id() == victim))
        .unwrap();
    let killed_at = Instant::now();
    rs[idx].as_ref().unwrap().proc.signal(libc::SIGKILL);
    let rest: Vec<&ShardSd> = rs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .filter_map(|(_, r)| r.as_ref())
        .collect();
    let taker = wait_for("the standby to take the slot", LEASE * 3, || async {
        let seen = observe(&rest).await;
        check(&seen, 3);
        seen.into_iter()
            .find(|(_, s)| s.slot == Some(victim_slot))
            .map(|(id, _)| id)
    })
    .await;
    let slot_gap = killed_at.elapsed();
    println!("MEASURE slot holder SIGKILL -> slot {victim_slot} taken by {taker}: {slot_gap:?}");
    assert!(
        slot_gap <= LEASE + HEARTBEAT + Duration::from_millis(300),
        "{slot_gap:?}"
    );
}

/// Leader actions logged by a replica: (timestamp, replica, term).
/// No action carries a term older than one a newer leader already used.
fn assert_terms_never_go_back(replicas: &[&ShardSd]) -> usize {
    let actions = replicas
        .iter()
        .flat_map(|r| common::leader_actions(&r.proc.name_id(), &r.proc.log_text()))
        .collect();
    common::terms_never_go_back(actions).unwrap_or_else(|violation| panic!("{violation}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_notices_its_loss_before_acting_again() {
    let moto = Moto::start().await;
    let mut rs = Vec::new();
    for i in 0..3 {
        rs.push(replica(&moto, &format!("r{i}"), "3", &[]).await);
    }
    let all: Vec<&ShardSd> = rs.iter().collect();
    let seen = settle(&all, 3).await;
    let leader_id = leaders(&seen)[0].clone();
    let old_term = seen[&leader_id].term.unwrap();
    let paused = rs.iter().find(|r| r.proc.name_id() == leader_id).unwrap();
    let others: Vec<&ShardSd> = rs
        .iter()
        .filter(|r| r.proc.name_id() != leader_id)
        .collect();

    paused.proc.signal(libc::SIGSTOP);
    let (_, new_term) = new_leader(&others, old_term, LEASE * 3).await;
    // Stay stopped well past the lease, so the new leader acts for a while.
    tokio::time::sleep(LEASE).await;
    paused.proc.signal(libc::SIGCONT);

    // It steps down (and takes no further action with its old term).
    wait_for(
        "the paused leader to step down",
        Duration::from_secs(5),
        || async {
            let s = paused.status().await;
            (s["role"] != "leader").then_some(())
        },
    )
    .await;
    tokio::time::sleep(HEARTBEAT * 4).await;
    let seen = observe(&all).await;
    assert_eq!(leaders(&seen).len(), 1, "{seen:?}");
    assert_eq!(
        seen[&leader_id].term,
        Some(new_term),
        "it sees the new term: {seen:?}"
    );
    assert!(paused
        .proc
        .log_text()
        .contains("no longer acting as leader"));
    let n = assert_terms_never_go_back(&all);
    assert!(
        n > 10,
        "too few leader actions logged ({n}) for the check to mean anything"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_skewed_wall_clock_neither_steals_nor_keeps_a_lease() {
    let moto = Moto::start().await;
    // A fast clock must not make a live lease look expired.
    let a = replica(&moto, "a", "2", &[]).await;
    settle(&[&a], 1).await;
    let fast = replica(&moto, "fast", "2", &[("CLOCK_OFFSET", "+10m")]).await;
    let deadline = Instant::now() + LEASE * 3;
    while Instant::now() < deadline {
        let seen = observe(&[&a, &fast]).await;
        check(&seen, 2);
        assert_eq!(seen["a"].role, "leader", "{seen:?}");
        assert_eq!(seen["a"].slot, Some(0), "{seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(observe(&[&fast]).await["fast"].slot, Some(1));

    // A slow clock must not make a lost lease look valid.
    drop(a);
    let (_, slow_term) = {
        let slow = replica(&moto, "slow", "2", &[("CLOCK_OFFSET", "-10m")]).await;
        let seen = settle(&[&fast, &slow], 2).await;
        let leader = leaders(&seen)[0].clone();
        let (leader, other) = if leader == "slow" {
            (&slow, &fast)
        } else {
            (&fast, &slow)
        };
        // Make the skewed one the leader: pause the other until it has lost leadership.
        if leader.proc.name_id() != "slow" {
            leader.proc.signal(libc::SIGSTOP);
            new_leader(
                &[other],
                seen[&leader.proc.name_id()].term.unwrap(),
                LEASE * 3,
            )
            .await;
            leader.proc.signal(libc::SIGCONT);
        }
        let seen = settle(&[&fast, &slow], 2).await;
        assert_eq!(leaders(&seen), ["slow"]);
        let term = seen["slow"].term.unwrap();
        slow.proc.signal(libc::SIGSTOP);
        let taken = new_leader(&[&fast], term, LEASE * 3).await;
        tokio::time::sleep(LEASE).await;
        slow.proc.signal(libc::SIGCONT);
        wait_for(
            "the slow-clocked leader to step down",
            Duration::from_secs(5),
            || async { (slow.status().await["role"] != "leader").then_some(()) },
        )
        .await;
        assert_terms_never_go_back(&[&fast, &slow]);
        taken
    };
    assert!(slow_term > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_hands_over_leadership_and_slot_in_well_under_a_lease() {
    let moto = Moto::start().await;
    let mut rs = Vec::new();
    for i in 0..4 {
        rs.push(replica(&moto, &format!("r{i}"), "3", &[]).await);
    }
    let all: Vec<&ShardSd> = rs.iter().collect();
    let seen = settle(&all, 3).await;
    // Pick the leader if it holds a slot, else a follower.
    let (victim_id, victim) = seen
        .iter()
        .find(|(_, s)| s.role == "leader" && s.slot.is_some())
        .or_else(|| seen.iter().find(|(_, s)| s.role == "follower"))
        .map(|(id, s)| (id.clone(), s.clone()))
        .unwrap();
    let idx = rs
        .iter()
        .position(|r| r.proc.name_id() == victim_id)
        .unwrap();
    let mut stopping = rs.remove(idx);
    let rest: Vec<&ShardSd> = rs.iter().collect();

    let started = Instant::now();
    stopping.proc.signal(libc::SIGTERM);
    let handed = wait_for("slot handed over", Duration::from_secs(5), || async {
        let seen = observe(&rest).await;
        check(&seen, 3);
        let slot_taken = seen.values().any(|s| s.slot == victim.slot);
        let led = victim.role != "leader"
            || seen
                .values()
                .any(|s| s.role == "leader" && s.term > victim.term);
        (slot_taken && led).then_some(seen)
    })
    .await;
    let gap = started.elapsed();
    println!(
        "MEASURE SIGTERM of {victim_id} ({}) -> handed over in {gap:?}: {handed:?}",
        victim.role
    );
    assert!(gap < LEASE / 2, "handover took {gap:?}");
    assert_eq!(stopping.proc.wait_exit(Duration::from_secs(5)), Some(0));
    let log = stopping.proc.log_text();
    assert!(log.contains("released slot"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_is_reported_once_with_the_fix() {
    let moto = Moto::start().await;
    let sd = replica(
        &moto,
        "r0",
        "3",
        &[("CREATE_TABLE", "false"), ("LEASE_TABLE", "absent-table")],
    )
    .await;
    // A first call may time out on a loaded machine: wait for the table's error.
    let status = wait_for("the error in status", Duration::from_secs(10), || async {
        let s = sd.status().await;
        s["coordination_error"]
            .as_str()
            .is_some_and(|e| e.contains("does not exist"))
            .then_some(s)
    })
    .await;
    let err = status["coordination_error"].as_str().unwrap();
    assert!(
        err.contains("\"absent-table\"") && err.contains("CREATE_TABLE"),
        "{err}"
    );
    assert_eq!(status["role"], "standby");
    tokio::time::sleep(HEARTBEAT * 6).await;
    let logged = sd
        .proc
        .log_text()
        .matches("does not exist in this region")
        .count();
    assert_eq!(logged, 1, "the error is logged once, not every heartbeat");
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_comes_from_the_ecs_task_metadata_endpoint() {
    use axum::response::IntoResponse;
    use axum::routing::get;
    use std::sync::atomic::{AtomicU32, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let meta_addr = listener.local_addr().unwrap();
    // The endpoint fails twice, as it may while ECS is still starting the task.
    let calls = std::sync::Arc::new(AtomicU32::new(0));
    let counted = calls.clone();
    let app = axum::Router::new().route(
        "/v4/abc/task",
        get(move || async move {
            if counted.fetch_add(1, Ordering::SeqCst) < 2 {
                return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            axum::Json(serde_json::json!({
                "TaskARN": "arn:aws:ecs:us-east-1:123456789012:task/ecs-adot-cluster/0dc5c05b56df432ab6ff2f52f4019000",
                "Containers": [{"Name": "shard-sd", "Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["127.0.0.9"]}]}]
            }))
            .into_response()
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let moto = Moto::start().await;
    let mut env = aws_env(&moto.endpoint);
    env.push(("DISCOVERY_NAMESPACES".into(), "x".into()));
    env.push((
        "ECS_CONTAINER_METADATA_URI_V4".into(),
        format!("http://{meta_addr}/v4/abc"),
    ));
    let sd = ShardSd::start("meta", &env).await;
    let status = sd.status().await;
    assert_eq!(
        status["replica_id"],
        "arn:aws:ecs:us-east-1:123456789012:task/ecs-adot-cluster/0dc5c05b56df432ab6ff2f52f4019000"
    );
    let port = sd.peer_addr.rsplit(':').next().unwrap();
    assert_eq!(status["advertise_addr"], format!("127.0.0.9:{port}"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "retried after two failures"
    );
}

#[test]
fn a_sharded_replica_without_a_routable_address_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shard-sd"))
        .env_clear()
        .envs([
            ("AWS_REGION", "us-east-1"),
            ("LEASE_TABLE", "leases"),
            ("DISCOVERY_NAMESPACES", "x"),
            ("LISTEN_ADDR", "127.0.0.1:0"),
            ("PEER_LISTEN_ADDR", "127.0.0.1:0"),
        ])
        .output()
        .expect("run shard-sd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("ADVERTISE_ADDR") && stderr.contains("ECS_CONTAINER_METADATA_URI_V4"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn auto_slots_take_the_lowest_free_index_and_nothing_reshuffles() {
    let moto = Moto::start().await;
    let mut rs = Vec::new();
    for i in 0..3 {
        rs.push(replica(&moto, &format!("r{i}"), "auto", &[]).await);
    }
    let all: Vec<&ShardSd> = rs.iter().collect();
    let seen = settle(&all, 3).await;
    assert_eq!(
        seen.values().filter(|s| s.role == "standby").count(),
        0,
        "auto mode has no standbys"
    );
    let holder_of_0 = seen
        .iter()
        .find(|(_, s)| s.slot == Some(0))
        .map(|(id, _)| id.clone())
        .unwrap();

    let idx = rs
        .iter()
        .position(|r| r.proc.name_id() == holder_of_0)
        .unwrap();
    let mut stopped = rs.remove(idx);
    stopped.proc.signal(libc::SIGTERM);
    assert_eq!(stopped.proc.wait_exit(Duration::from_secs(5)), Some(0));
    rs.push(replica(&moto, "r9", "auto", &[]).await);
    let all: Vec<&ShardSd> = rs.iter().collect();
    let after = settle(&all, 3).await;
    assert_eq!(
        after["r9"].slot,
        Some(0),
        "the newcomer takes the lowest free slot: {after:?}"
    );
    for (id, s) in &after {
        if id != "r9" {
            assert_eq!(s.slot, seen[id].slot, "{id} kept its slot");
        }
    }
    // The leader sees exactly the three live slots.
    let leader = rs
        .iter()
        .find(|r| after[&r.proc.name_id()].role == "leader")
        .unwrap();
    let live = wait_for("three live slots", Duration::from_secs(10), || async {
        let s = leader.status().await;
        let live: Vec<u64> = s["live_slots"]
            .as_array()?
            .iter()
            .filter_map(|l| l["slot"].as_u64())
            .collect();
        (live == [0, 1, 2]).then_some(live)
    })
    .await;
    assert_eq!(live, [0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_table_makes_the_holder_step_down_at_its_deadline() {
    let moto = Moto::start().await;
    let proxy = common::proxy::AwsProxy::start(&moto.endpoint).await;
    let sd = replica_at(&proxy.endpoint, "r0", "1", &[]).await;
    let seen = settle(&[&sd], 1).await;
    assert_eq!(seen["r0"].role, "leader");

    proxy.set_fault(common::proxy::Fault::Hang);
    let cut = Instant::now();
    wait_for("step down", LEASE * 2, || async {
        let s = sd.status().await;
        (s["role"] == "standby" && s["slot"].is_null()).then_some(())
    })
    .await;
    let stepped = cut.elapsed();
    println!(
        "MEASURE table unreachable -> stepped down after {stepped:?} (deadline 2/3 of {LEASE:?})"
    );
    assert!(
        stepped <= LEASE * 2 / 3 + Duration::from_millis(200),
        "{stepped:?}"
    );

    proxy.set_fault(common::proxy::Fault::None);
    settle(&[&sd], 1).await;
}
