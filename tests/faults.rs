//! Faults that once blinded the fleet, each reproduced deterministically against
//! real replicas: DynamoDB outages, a leader re-taking its own lease, Cloud Map
//! denying `GetService`, a leader SIGKILL with standbys, a re-elected leader.
//! The rule they hold the code to: prefer duplicates over gaps.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cluster::{log_lines, shards, Cluster, Collectors, HEARTBEAT, LEASE, TOKEN};
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
    // The leader works in its new term: registrations reach their shards within a
    // cycle or two; followers do not wait out a long-poll on the ended term.
    let registered = Instant::now();
    c.register(100..106).await;
    let settled = c
        .settle("the new targets served, every replica ready", 3)
        .await;
    let took = registered.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "new targets reached their shards after {took:?}"
    );
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

/// Confirmations are the leader's record of who has which generation: anyone who
/// reaches the peer port with the token must not be able to forge them.
#[tokio::test(flavor = "multi_thread")]
async fn forged_confirmations_change_nothing() {
    let c = Cluster::start("3", 3, 30).await;
    c.settle("three shards", 3).await;
    let (li, status) = c.leader().await;
    let term = status["term"].as_u64().unwrap();
    let leader = &c.replica(li).sd;
    let assignment = || async {
        http()
            .get(leader.peer_url("/v1/assignment"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let before = assignment().await;
    let slot0 = before["slots"][0].clone();
    let holder = slot0["holder"].as_str().unwrap().to_owned();
    for (slot, who) in [
        (0, "intruder".to_owned()),
        (0, holder.clone()),
        (7, holder.clone()),
        (4_000_000, "intruder".to_owned()),
    ] {
        let url = leader.peer_url(&format!(
            "/v1/shards/{slot}?holder={who}&after_term={term}&after={}&wait_ms=0",
            u64::MAX
        ));
        http().get(url).bearer_auth(TOKEN).send().await.unwrap();
        // The same through the replication stream.
        let url = leader.peer_url(&format!(
            "/v1/changes?holder={who}&slot={slot}&after_term={term}&after={}&wait_ms=0",
            u64::MAX
        ));
        http().get(url).bearer_auth(TOKEN).send().await.unwrap();
    }
    let after = assignment().await;
    let slots = after["slots"].as_array().unwrap();
    assert_eq!(
        slots.len(),
        3,
        "a confirmation grew the assignment: {after}"
    );
    for s in slots {
        assert!(
            s["confirmed_generation"].as_u64() <= after["generation"].as_u64(),
            "a generation never published was confirmed: {s}"
        );
        assert_ne!(s["confirmed_holder"], "intruder", "{s}");
    }
    assert_eq!(
        slots[0]["confirmed_holder"], slot0["confirmed_holder"],
        "{after}"
    );
}

/// ECS kills a task 30 s after SIGTERM: shard-sd is gone within 20 s whatever its
/// clients do, and a client that sends half a request head is cut off.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_within_20s_with_open_long_polls_and_half_sent_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = Cluster::start("1", 1, 5).await;
    c.settle("one shard", 1).await;
    let sd = &c.replica(0).sd;
    // A long-poll of a minute, from a peer that already has the shard.
    let status = sd.status().await;
    let (term, generation) = (
        status["term"].as_u64().unwrap(),
        status["generation"].as_u64().unwrap(),
    );
    let poll = http()
        .get(sd.peer_url(&format!(
            "/v1/shards/0?after_term={term}&after={generation}&wait_ms=60000"
        )))
        .bearer_auth(TOKEN)
        .timeout(Duration::from_secs(70))
        .send();
    let poll = tokio::spawn(poll);
    // Half a request head, on both listeners.
    let mut half = Vec::new();
    for addr in [&sd.addr, &sd.peer_addr] {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /prometheus-targets HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half.push(conn);
    }
    // The header-read timeout closes them without an answer to the request.
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), half[0].read(&mut buf))
        .await
        .expect("the half-sent request was not cut off within 10 s")
        .unwrap_or(0);
    let cut_after = started.elapsed();
    assert!(
        String::from_utf8_lossy(&buf[..n]).find(" 200 ").is_none(),
        "a half-sent request was answered"
    );
    assert!(
        cut_after >= Duration::from_secs(4),
        "cut after {cut_after:?}"
    );
    // A listener holds at most MAX_CONNECTIONS: with that many half-sent heads open,
    // the next client waits until the header-read timeout frees places.
    let cap = shard_sd::output::serve::MAX_CONNECTIONS;
    let mut crowd = Vec::new();
    for _ in 0..cap {
        let mut conn = tokio::net::TcpStream::connect(&sd.addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        crowd.push(conn);
    }
    let crowded = Instant::now();
    let quick = http()
        .get(sd.url("/healthz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(quick.is_err(), "served beyond the connection cap");
    common::wait_for(
        "a place after the header timeout",
        Duration::from_secs(10),
        || async {
            http()
                .get(sd.url("/healthz"))
                .timeout(Duration::from_secs(1))
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
        },
    )
    .await;
    let freed_after = crowded.elapsed();
    drop(crowd);
    // More half-sent heads, then SIGTERM while they and the long-poll are open.
    for _ in 0..5 {
        let mut conn = tokio::net::TcpStream::connect(&sd.addr).await.unwrap();
        conn.write_all(b"GET /metrics HTTP/1.1\r\n").await.unwrap();
        half.push(conn);
    }
    let term_at = Instant::now();
    c.replicas[0]
        .as_ref()
        .unwrap()
        .sd
        .proc
        .signal(libc::SIGTERM);
    let mut replica = c.replicas[0].take().unwrap();
    let code = replica.sd.proc.wait_exit(Duration::from_secs(25));
    let took = term_at.elapsed();
    assert_eq!(code, Some(0), "{}", replica.sd.proc.log_text());
    assert!(
        took < Duration::from_secs(20),
        "exited {took:?} after SIGTERM"
    );
    let answer = poll.await.unwrap();
    assert!(
        answer.is_err() || answer.unwrap().status() == 503,
        "the long-poll was cut at shutdown"
    );
    println!(
        "MEASURE exited {took:?} after SIGTERM; a half-sent head was cut after {cut_after:?}; \
         {cap} connections kept the next client out for {freed_after:?}"
    );
}

/// The shutdown drain waits for a successor that confirmed, not for the slot's
/// old confirmation (its own): an impostor that takes the released slot and never
/// confirms must not end it.
#[tokio::test(flavor = "multi_thread")]
async fn the_drain_waits_for_the_successor_itself_to_confirm() {
    use shard_sd::clock::WallClock;
    use shard_sd::coordination::lease::{HolderInfo, LeaseTable};
    let mut c = Cluster::start("3", 3, 30).await;
    c.settle("three shards", 3).await;
    let statuses = c.statuses().await;
    let victim = statuses
        .iter()
        .position(|s| s["role"] == "follower")
        .expect("a follower");
    let slot = statuses[victim]["slot"].as_u64().unwrap() as u32;
    let sdk = common::sdk_config(&c.moto.endpoint).await;
    let aws = shard_sd::aws::clients_from(&sdk).expect("clients");
    let table = LeaseTable::new(
        aws.dynamodb(Duration::from_millis(500), Duration::from_secs(1)),
        "leases".into(),
        "default".into(),
        WallClock::default(),
    );
    let impostor = HolderInfo {
        id: "impostor".into(),
        incarnation: "i".into(),
        addr: "127.0.0.1:9".into(),
        weight: 1.0,
        lease: LEASE,
    };
    let pk = table.slot_pk(slot);
    let stopping_at = Instant::now();
    c.replica(victim).sd.proc.signal(libc::SIGTERM);
    // Take the released slot at once and keep it alive, never confirming anything.
    let mut held = wait_for("the slot released", Duration::from_secs(5), || async {
        let item = table
            .read(std::slice::from_ref(&pk))
            .await
            .ok()?
            .remove(&pk)?;
        if !item.released {
            return None;
        }
        table.acquire(&pk, Some(&item), 0, &impostor).await.ok()
    })
    .await;
    let mut replica = c.replicas[victim].take().unwrap();
    let exited = loop {
        if let Some(code) = replica.sd.proc.wait_exit(Duration::from_millis(400)) {
            break code;
        }
        held = table.renew(&held, &impostor).await.expect("renew");
        assert!(
            stopping_at.elapsed() < Duration::from_secs(21),
            "did not stop"
        );
    };
    let took = stopping_at.elapsed();
    let log = replica.sd.proc.log_text();
    assert_eq!(exited, 0, "{log}");
    assert!(!log.contains("slot handed over"), "{log}");
    assert!(log.contains("handoff not confirmed"), "{log}");
    // Nobody confirmed: it served until its stop limit, not a moment less.
    assert!(took >= Duration::from_secs(15), "stopped after {took:?}");
}

/// Two processes started with one REPLICA_ID are told apart by their incarnation:
/// neither takes the other's leases, and both say what to fix.
#[tokio::test(flavor = "multi_thread")]
async fn two_processes_with_one_replica_id_do_not_act_as_each_other() {
    let mut c = Cluster::start("3", 1, 10).await;
    c.settle("one replica", 1).await;
    let term = c.leader().await.1["term"].as_u64().unwrap();
    c.extra_env.push(("REPLICA_ID".into(), "r0".into()));
    c.add_replica().await;
    tokio::time::sleep(LEASE * 2).await;
    let statuses = c.statuses().await;
    let leaders: Vec<_> = statuses.iter().filter(|s| s["role"] == "leader").collect();
    assert_eq!(leaders.len(), 1, "{statuses:?}");
    assert_eq!(
        leaders[0]["term"].as_u64(),
        Some(term),
        "the twin took the leader lease: {statuses:?}"
    );
    let slots: BTreeSet<u64> = statuses.iter().filter_map(|s| s["slot"].as_u64()).collect();
    assert_eq!(
        slots.len(),
        2,
        "each process holds a slot of its own: {statuses:?}"
    );
    let twin = log_lines(&c.replica(1).sd, "REPLICA_ID");
    assert!(
        twin.iter().any(|l| l["level"] == "ERROR"),
        "the twin logged no error naming REPLICA_ID"
    );
}

/// A replica whose DynamoDB stalled serves its slot stale; stopped then (SIGTERM),
/// it keeps serving until a successor has the slot instead of leaving at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_stale_holder_stopped_by_sigterm_drains_its_slot() {
    let mut c = Cluster::start("3", 4, 30).await;
    c.settle("three shards and a standby", 3).await;
    let statuses = c.statuses().await;
    let victim = statuses
        .iter()
        .position(|s| s["role"] == "follower")
        .expect("a follower");
    c.replica(victim).dynamodb.set_fault(Fault::Hang);
    wait_for("the slot served stale", LEASE * 2, || async {
        (c.replica(victim).sd.status().await["stale"] == true).then_some(())
    })
    .await;
    let mut collectors = Collectors::new();
    collectors.sample(&c.addrs(), &c.expected).await;
    c.replica(victim).sd.proc.signal(libc::SIGTERM);
    let stopped_at = Instant::now();
    let mut gaps = Vec::new();
    let mut exited = None;
    while exited.is_none() && stopped_at.elapsed() < Duration::from_secs(22) {
        let addrs = c.addrs();
        let missing = collectors.sample(&addrs, &c.expected).await;
        if !missing.is_empty() {
            gaps.push((stopped_at.elapsed(), missing.len()));
        }
        if exited.is_none() {
            if let Some(code) = c.replicas[victim]
                .as_mut()
                .unwrap()
                .sd
                .proc
                .wait_exit(Duration::from_millis(1))
            {
                exited = Some((code, stopped_at.elapsed()));
                let addr = c.replica(victim).sd.addr.clone();
                collectors.forget(&addr);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, took) = exited.expect("the stale holder stopped");
    assert_eq!(code, 0);
    assert!(
        took >= LEASE,
        "it left after {took:?}, before a successor could take the slot"
    );
    assert!(gaps.is_empty(), "targets went uncovered: {gaps:?}");
}

/// A replica that takes a slot while the leader is unreachable to its peers (a
/// partition; DynamoDB still answers) serves the slot from its mirrored copy of
/// the assignment instead of `[]`.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_holder_serves_its_slot_while_the_leader_is_unreachable() {
    let mut c = Cluster::start("3", 4, 30).await;
    c.settle("three shards and a standby", 3).await;
    let (li, _) = c.leader().await;
    let statuses = c.statuses().await;
    let victim = statuses
        .iter()
        .position(|s| s["role"] == "follower")
        .expect("a follower");
    let mut collectors = Collectors::new();
    collectors.sample(&c.addrs(), &c.expected).await;
    c.replica(li).peers.set_fault(Fault::Partition);
    let dead = c.replica(victim).sd.addr.clone();
    c.replica(victim).sd.proc.signal(libc::SIGKILL);
    c.replicas[victim] = None;
    collectors.forget(&dead);
    let killed = Instant::now();
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    while killed.elapsed() < LEASE * 3 {
        let missing = collectors.sample(&c.addrs(), &c.expected).await;
        match (missing.is_empty(), since) {
            (false, None) => since = Some(Instant::now()),
            (true, Some(s)) => {
                longest = longest.max(s.elapsed());
                since = None;
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open = since.map_or(Duration::ZERO, |s| s.elapsed());
    assert!(
        open.is_zero(),
        "targets still uncovered {open:?} into the partition"
    );
    assert!(
        longest <= LEASE + HEARTBEAT + Duration::from_secs(1),
        "uncovered for {longest:?}"
    );
    c.replica(li).peers.set_fault(Fault::None);
    c.settle("settled after the partition", 3).await;
    println!("MEASURE dead slot uncovered {longest:?} with the leader unreachable");
}

/// A leader paused past its lease comes back as a follower of its successor and
/// re-takes its own slot; with the successor unreachable it keeps serving the
/// shard it served as leader instead of starting the slot over empty.
#[tokio::test(flavor = "multi_thread")]
async fn a_deposed_leader_that_regains_its_slot_keeps_serving_it() {
    let c = Cluster::start("3", 3, 30).await;
    let before = c.settle("three shards", 3).await;
    let (li, status) = c.leader().await;
    let term = status["term"].as_u64().unwrap();
    let old = c.replica(li);
    let served = before[&old.sd.addr].clone();
    assert!(!served.is_empty());
    old.sd.proc.signal(libc::SIGSTOP);
    let (lj, _) = wait_for("a new leader", LEASE * 3, || async {
        for (i, r) in c.replicas.iter().enumerate() {
            let Some(r) = r.as_ref().filter(|_| i != li) else {
                continue;
            };
            let s = r.sd.status().await;
            if s["role"] == "leader" && s["term"].as_u64() > Some(term) {
                return Some((i, s));
            }
        }
        None
    })
    .await;
    c.replica(lj).peers.set_fault(Fault::Partition);
    old.sd.proc.signal(libc::SIGCONT);
    wait_for(
        "the old leader to hold its slot again",
        LEASE * 2,
        || async {
            let s = old.sd.status().await;
            (s["role"] == "follower" && s["slot"].is_u64()).then_some(())
        },
    )
    .await;
    let resumed = Instant::now();
    while resumed.elapsed() < LEASE {
        let now = shards(std::slice::from_ref(&old.sd.addr)).await;
        assert_eq!(
            now.get(&old.sd.addr),
            Some(&served),
            "{:?} after it regained its slot",
            resumed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.replica(lj).peers.set_fault(Fault::None);
    c.settle("settled after the partition", 3).await;
}

/// Terms only grow, even if the leader item is deleted (a table reset): the next
/// acquisition goes above the highest term seen, and followers take its shards.
#[tokio::test(flavor = "multi_thread")]
async fn terms_keep_growing_when_the_leader_item_is_deleted() {
    let mut c = Cluster::start("3", 3, 30).await;
    c.settle("three shards", 3).await;
    let term = c.leader().await.1["term"].as_u64().unwrap();
    let sdk = common::sdk_config(&c.moto.endpoint).await;
    let ddb = aws_sdk_dynamodb::Client::new(&sdk);
    ddb.delete_item()
        .table_name("leases")
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S("default#leader".into()),
        )
        .send()
        .await
        .expect("DeleteItem");
    let after = wait_for("a leader again", LEASE * 3, || async {
        let statuses = c.statuses().await;
        statuses
            .into_iter()
            .find(|s| s["role"] == "leader")
            .filter(|s| s["term"].as_u64().is_some_and(|t| t > term))
    })
    .await;
    assert!(after["term"].as_u64() > Some(term), "{after}");
    c.register(100..106).await;
    c.settle("new targets served under the new term", 3).await;
}

/// A leader whose lease steps are slow (DynamoDB latency, or renewals whose
/// first answer is lost and retried) publishes each renewal late: its own view
/// shows the old deadline passing while the lease is in fact held. Its work must
/// neither stop nor start over within the term: a restart began its generations
/// again from zero, and followers, holding a higher generation of the same term,
/// waited on the leader for ever (new registrations never reached them).
#[tokio::test(flavor = "multi_thread")]
async fn slow_lease_steps_never_restart_the_leaders_work_within_a_term() {
    let slow_steps = [
        Fault::Delay {
            op: None,
            by: Duration::from_millis(400),
        },
        Fault::DropResponse {
            op: Some("UpdateItem".into()),
            remaining: 40,
        },
    ];
    for fault in slow_steps {
        let mut c = Cluster::start("3", 3, 30).await;
        c.settle("three shards", 3).await;
        // Followers' generations well above anything a restarted leader would reach.
        for batch in 0..8 {
            c.register(30 + batch..31 + batch).await;
            c.settle("one more target served", 3).await;
        }
        let (li, before) = c.leader().await;
        let term = before["term"].as_u64().unwrap();
        c.replica(li).dynamodb.set_fault(fault.clone());
        tokio::time::sleep(Duration::from_secs(6)).await;
        c.replica(li).dynamodb.set_fault(Fault::None);
        let registered = Instant::now();
        c.register(100..106).await;
        c.settle("targets registered after the slow steps served", 3)
            .await;
        let took = registered.elapsed();
        let (lj, after) = c.leader().await;
        let starts: Vec<(String, u64)> = c
            .alive()
            .iter()
            .flat_map(|r| common::leading_starts(&r.id, &r.sd.proc.log_text()))
            .collect();
        if let Err(twice) = common::each_term_led_once(&starts) {
            panic!("{fault:?}: {twice}: {starts:?}");
        }
        assert!(
            took < Duration::from_secs(5),
            "{fault:?}: new targets reached their shards after {took:?}"
        );
        println!(
            "MEASURE {fault:?} on the leader for 6 s: term {term} (r{li}) -> {} (r{lj}); \
             registration served after {took:?}; leading starts {starts:?}",
            after["term"]
        );
    }
}
