//! Faults that once blinded the fleet, each reproduced deterministically against
//! real replicas: DynamoDB outages, a leader re-taking its own lease, Cloud Map
//! denying `GetService`, a leader SIGKILL with standbys, a re-elected leader.
//! The rule they hold the code to: prefer duplicates over gaps.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{log_lines, shards, Cluster, Collectors, HEARTBEAT, LEASE};
use common::proxy::Fault;
use common::{aws_env, http, wait_for, Moto, ShardSd};

/// Samples what collectors hold every 100 ms for `duration` while `expected`
/// must stay covered; returns the samples in which some target was held by nobody.
async fn uncovered_during(
    c: &Cluster,
    duration: Duration,
    collectors: &mut Collectors,
) -> Vec<(Duration, Vec<String>)> {
    let start = Instant::now();
    let mut gaps = Vec::new();
    while start.elapsed() < duration {
        let missing = collectors.sample(&c.addrs(), &c.expected).await;
        if !missing.is_empty() {
            gaps.push((start.elapsed(), missing));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gaps
}

/// A lease table that stalls (or fails) for longer than a lease must not empty
/// any collector: each holder keeps serving its last shard, flagged stale.
#[tokio::test(flavor = "multi_thread")]
async fn a_dynamodb_outage_keeps_every_shard_served() {
    for fault in [Fault::Hang, Fault::Fail { op: None }] {
        let c = Cluster::start("3", 3, 30).await;
        c.settle("three shards", 3).await;
        let mut collectors = Collectors::new();
        // The strict reading: every 200 answer must still cover everything.
        assert!(collectors.sample(&c.addrs(), &c.expected).await.is_empty());
        c.dynamodb_fault(fault.clone());
        let outage = LEASE * 2 + Duration::from_secs(2);
        let started = Instant::now();
        let mut stale_seen = false;
        while started.elapsed() < outage {
            let served = shards(&c.addrs()).await;
            let union: BTreeSet<&String> = served.values().flatten().collect();
            let missing: Vec<&String> = c.expected.iter().filter(|t| !union.contains(t)).collect();
            assert!(
                missing.is_empty(),
                "{fault:?} for {:?}: {} targets served by nobody, e.g. {:?}",
                started.elapsed(),
                missing.len(),
                missing.first()
            );
            if started.elapsed() > LEASE {
                for r in c.alive() {
                    let s = r.sd.status().await;
                    stale_seen |= s["stale"] == true && s["stale_slot"].is_u64();
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(stale_seen, "{fault:?}: no replica reported a stale shard");
        let metrics = c.replica(0).sd.metrics().await;
        assert!(metrics.contains("shard_sd_shard_stale 1"), "{metrics}");
        c.dynamodb_fault(Fault::None);
        let cleared = Instant::now();
        wait_for(
            "every lapsed slot regained",
            LEASE + HEARTBEAT * 2,
            || async {
                let statuses = c.statuses().await;
                statuses
                    .iter()
                    .all(|s| s["stale"] == false && s["slot"].is_u64())
                    .then_some(())
            },
        )
        .await;
        let regained = cleared.elapsed();
        c.settle("every shard once after the outage", 3).await;
        println!(
            "MEASURE {fault:?} for {outage:?}: no gap; every slot regained {regained:?} after"
        );
    }
}

/// Makes the replica's lease renewals (UpdateItem) fail just past the renew
/// deadline but within the lease, so it re-takes its own items (term + 1) in one step.
async fn force_retake(c: &Cluster, i: usize) {
    c.replica(i).dynamodb.set_fault(Fault::Fail {
        op: Some("UpdateItem".into()),
    });
    tokio::time::sleep(LEASE * 2 / 3 + Duration::from_millis(600)).await;
    c.replica(i).dynamodb.set_fault(Fault::None);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_leader_that_retakes_its_own_lease_keeps_assigning() {
    let mut c = Cluster::start("3", 3, 30).await;
    c.settle("three shards", 3).await;
    let (li, before) = c.leader().await;
    let old_term = before["term"].as_u64().unwrap();
    force_retake(&c, li).await;
    let (lj, after) = wait_for("a new term", Duration::from_secs(10), || async {
        let (lj, s) = c.leader().await;
        (s["term"].as_u64() > Some(old_term)).then_some((lj, s))
    })
    .await;
    assert_eq!(lj, li, "the same replica re-took the lease: {after}");
    // The leader works in its new term: a registration reaches exactly one replica.
    c.register(100..101).await;
    let settled = c
        .settle("the new target served, every replica ready", 3)
        .await;
    let new_term = after["term"].as_u64().unwrap();
    for s in c.statuses().await {
        assert_eq!(s["term"].as_u64(), Some(new_term), "{s}");
    }
    println!("MEASURE leader re-took term {old_term} -> {new_term}; then served {settled:?}");
}

/// A service whose namespace cannot be confirmed is unread: a new leader keeps
/// the assignment it inherited instead of publishing a smaller one.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_keeps_its_inherited_assignment_while_get_service_fails() {
    let mut c = Cluster::start("3", 3, 30).await;
    c.settle("three shards", 3).await;
    c.cloud.set_fault(Fault::Error {
        op: Some("GetService".into()),
        code: "AccessDeniedException".into(),
    });
    let (li, _) = c.leader().await;
    c.replica(li).sd.proc.signal(libc::SIGKILL);
    c.replicas[li] = None;
    // A new leader is elected and runs cycles that cannot confirm the service.
    let new_leader = wait_for(
        "a new leader's first cycle",
        Duration::from_secs(10),
        || async {
            for r in c.alive() {
                let s = r.sd.status().await;
                if s["role"] == "leader" && s["last_discovery"].is_object() {
                    return Some(s);
                }
            }
            None
        },
    )
    .await;
    assert_eq!(
        new_leader["last_discovery"]["outcome"], "failed",
        "a cycle that could not read a service is not complete: {new_leader}"
    );
    // The dead slot's targets go to the survivors, from the inherited assignment.
    let mut collectors = Collectors::new();
    wait_for(
        "the survivors to cover every target",
        Duration::from_secs(10),
        || async {
            shards(&c.addrs())
                .await
                .values()
                .flatten()
                .cloned()
                .collect::<BTreeSet<String>>()
                .eq(&c.expected)
                .then_some(())
        },
    )
    .await;
    let gaps = uncovered_during(&c, Duration::from_secs(4), &mut collectors).await;
    assert!(
        gaps.is_empty(),
        "the new leader's cycles dropped targets: {gaps:?}"
    );
    c.cloud.set_fault(Fault::None);
    c.settle("two shards after GetService recovers", 2).await;
    println!(
        "MEASURE new leader {} kept its inherited assignment while GetService was denied",
        new_leader["replica_id"]
    );
}

/// Single mode: a first cycle that cannot confirm a service's namespace is not
/// complete, so nothing (not `[]`) is published until it can.
#[tokio::test(flavor = "multi_thread")]
async fn single_mode_does_not_publish_an_unread_service_as_empty() {
    let moto = Moto::start().await;
    let proxy = common::proxy::AwsProxy::start(&moto.endpoint).await;
    let cm = common::cloudmap::CloudMap::new(&moto.sdk_config().await);
    let ns = cm.dns_namespace("ecs-services").await;
    let svc = cm
        .service(&ns, "webapp-svc", common::cloudmap::POST_TAGS)
        .await;
    cm.register_task(&svc.id, "task-1", "10.0.0.1").await;
    proxy.set_fault(Fault::Error {
        op: Some("GetService".into()),
        code: "AccessDeniedException".into(),
    });
    let mut env = aws_env(&proxy.endpoint);
    env.push(("DISCOVERY_NAMESPACES".into(), "ecs-services".into()));
    env.push(("CONFIG_RELOAD_FREQUENCY".into(), "300ms".into()));
    let sd = ShardSd::start("unread", &env).await;
    wait_for("three failed cycles", Duration::from_secs(10), || async {
        let s = sd.status().await;
        (s["last_discovery"]["outcome"] == "failed"
            && proxy.counts().get("GetService").copied().unwrap_or(0) >= 3)
            .then_some(())
    })
    .await;
    let resp = http()
        .get(sd.url("/prometheus-targets"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503, "an unread service is not an empty one");
    assert!(
        sd.status().await["last_discovery"]["errors"]
            .to_string()
            .contains("servicediscovery:GetService"),
        "the error names the IAM action"
    );
    proxy.set_fault(Fault::None);
    sd.wait_targets("the target", Duration::from_secs(10), |t| t.len() == 2)
        .await;
}

/// Leader SIGKILL with standbys: the new leader starts from the inherited
/// membership, a standby takes the dead slot, and no surviving shard changes.
#[tokio::test(flavor = "multi_thread")]
async fn leader_sigkill_with_standbys_moves_no_surviving_shard() {
    let mut c = Cluster::start("3", 5, 60).await;
    let before = c.settle("three shards and two standbys", 3).await;
    let (li, _) = c.leader().await;
    let dead = c.replica(li).sd.addr.clone();
    let survivors: Vec<(String, Vec<String>)> = before
        .iter()
        .filter(|(a, t)| **a != dead && !t.is_empty())
        .map(|(a, t)| (a.clone(), t.clone()))
        .collect();
    assert_eq!(survivors.len(), 2, "{before:?}");
    c.replica(li).sd.proc.signal(libc::SIGKILL);
    c.replicas[li] = None;
    let killed = Instant::now();
    while killed.elapsed() < LEASE * 3 {
        let now = shards(&c.addrs()).await;
        for (addr, targets) in &survivors {
            if let Some(list) = now.get(addr) {
                assert_eq!(
                    list,
                    targets,
                    "{addr}'s shard changed {:?} after the leader died",
                    killed.elapsed()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = c.settle("the standby serving the dead slot", 3).await;
    let sets = |m: &std::collections::BTreeMap<String, Vec<String>>| -> BTreeSet<Vec<String>> {
        m.values().filter(|t| !t.is_empty()).cloned().collect()
    };
    assert_eq!(sets(&after), sets(&before), "the shards are the same three");
    let (ni, _) = c.leader().await;
    let moved = c.replica(ni).sd.metrics().await;
    assert!(
        moved.contains("shard_sd_targets_moved_total 0"),
        "the new leader moved targets: {moved}"
    );
}

/// A leader that loses and at once regains leadership starts from its own last
/// assignment, never from a mirror of an older term.
#[tokio::test(flavor = "multi_thread")]
async fn a_re_elected_leader_starts_from_its_own_last_assignment() {
    let mut c = Cluster::start("3", 3, 30).await;
    c.settle("three shards", 3).await;
    // Term 2 starts from the mirror of term 1, then learns new targets.
    let (li, _) = c.leader().await;
    c.replica(li).sd.proc.signal(libc::SIGKILL);
    c.replicas[li] = None;
    c.register(30..40).await;
    c.settle("the new targets served by two shards", 2).await;
    let (lj, s) = c.leader().await;
    let term = s["term"].as_u64().unwrap();
    // The leader re-takes its own lease: its own assignment of `term` is the seed.
    let mut collectors = Collectors::new();
    collectors.sample(&c.addrs(), &c.expected).await;
    let retake = force_retake(&c, lj);
    let watch = uncovered_during(&c, LEASE * 2, &mut collectors);
    let ((), gaps) = tokio::join!(retake, watch);
    assert!(gaps.is_empty(), "targets went missing: {gaps:?}");
    let seeds = log_lines(
        &c.replica(lj).sd,
        "starting from the previous leader's assignment",
    );
    let last = seeds
        .last()
        .expect("the re-elected leader started from an assignment");
    assert_eq!(last["term"].as_u64(), Some(term + 1), "{last}");
    assert_eq!(last["previous_term"].as_u64(), Some(term), "{last}");
    c.settle("steady after the re-take", 2).await;
}
