//! Sharded discovery end to end: real replicas on loopback sharing DynamoDB and
//! Cloud Map on moto, sample-app processes as targets, a real Prometheus with one
//! http_sd job per replica. Coverage is sampled every 200 ms across all replicas'
//! `/prometheus-targets` while replicas are added, replaced, killed and paused.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cloudmap::{CloudMap, Service};
use common::cluster::shards;
use common::proxy::AwsProxy;
use common::{aws_env, free_port, http, wait_for, Moto, Prometheus, SampleApp, ShardSd};

const LEASE: Duration = Duration::from_secs(3);
const HEARTBEAT: Duration = Duration::from_millis(500);
const GRACE: Duration = Duration::from_secs(2);
const TOKEN: &str = "s3cret-peer-token";

struct Cluster {
    _moto: Moto,
    proxy: AwsProxy,
    cm: CloudMap,
    bulk: Service,
    _apps: Vec<SampleApp>,
    replicas: Vec<Option<ShardSd>>,
    shard_count: String,
    /// `DISCOVERY_NAMESPACES` and `CONFIG_RELOAD_FREQUENCY` of new replicas.
    namespaces: String,
    reload: String,
    expected: BTreeSet<String>,
}

impl Cluster {
    /// `live` sample apps (app + exporter targets each) and `bulk` more registered targets.
    async fn start(shard_count: &str, replicas: usize, live: usize, bulk: usize) -> Cluster {
        let moto = Moto::start().await;
        let proxy = AwsProxy::start(&moto.endpoint).await;
        let cm = CloudMap::new(&moto.sdk_config().await);
        let ns = cm.dns_namespace("ecs-services").await;
        let (app_port, exporter_port) = (free_port(), free_port());
        let (a, e) = (app_port.to_string(), exporter_port.to_string());
        let web = cm
            .service(
                &ns,
                "webapp-svc",
                &[
                    ("METRICS_PATH", "/metrics"),
                    ("METRICS_PORT", &a),
                    ("ECS_METRICS_PATH", "/metrics"),
                    ("ECS_METRICS_PORT", &e),
                ],
            )
            .await;
        let bulk_svc = cm
            .service(
                &ns,
                "bulk-svc",
                &[("METRICS_PATH", "/metrics"), ("METRICS_PORT", "3000")],
            )
            .await;
        let mut apps = Vec::new();
        let mut expected = BTreeSet::new();
        for i in 0..live {
            let ip = format!("127.0.0.{}", i + 2);
            apps.push(SampleApp::start(&ip, app_port, Some(exporter_port), 0.0).await);
            cm.register_task(&web.id, &format!("web-{i}"), &ip).await;
            expected.insert(format!("{ip}:{app_port}"));
            expected.insert(format!("{ip}:{exporter_port}"));
        }
        for i in 0..bulk {
            let ip = format!("127.0.{}.{}", 100 + i / 200, i % 200 + 1);
            cm.register_task(&bulk_svc.id, &format!("bulk-{i}"), &ip)
                .await;
            expected.insert(format!("{ip}:3000"));
        }
        let mut cluster = Cluster {
            _moto: moto,
            proxy,
            cm,
            bulk: bulk_svc,
            _apps: apps,
            replicas: Vec::new(),
            shard_count: shard_count.into(),
            namespaces: "ecs-services".into(),
            reload: "1".into(),
            expected,
        };
        for _ in 0..replicas {
            cluster.add_replica().await;
        }
        cluster
    }

    async fn add_replica(&mut self) -> usize {
        let i = self.replicas.len();
        let mut env = aws_env(&self.proxy.endpoint);
        env.retain(|(k, _)| k != "RUST_LOG");
        for (k, v) in [
            ("LEASE_TABLE", "leases"),
            ("CREATE_TABLE", "true"),
            ("SHARD_COUNT", self.shard_count.as_str()),
            ("REPLICA_ID", &format!("r{i}")),
            ("LEASE_DURATION", "3s"),
            ("HEARTBEAT_INTERVAL", "500ms"),
            ("HANDOFF_GRACE", "2s"),
            ("MEMBERSHIP_GRACE", "1s"),
            ("PEER_TOKEN", TOKEN),
            ("DISCOVERY_NAMESPACES", self.namespaces.as_str()),
            ("CONFIG_RELOAD_FREQUENCY", self.reload.as_str()),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "info,leader_action=debug"),
        ] {
            env.push((k.into(), v.into()));
        }
        self.replicas
            .push(Some(ShardSd::start(&format!("r{i}"), &env).await));
        i
    }

    fn alive(&self) -> Vec<&ShardSd> {
        self.replicas.iter().flatten().collect()
    }

    fn addrs(&self) -> Vec<String> {
        self.alive().iter().map(|r| r.addr.clone()).collect()
    }

    async fn statuses(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for r in self.alive() {
            out.push(r.status().await);
        }
        out
    }

    fn by_id(&self, id: &str) -> usize {
        self.replicas
            .iter()
            .position(|r| {
                r.as_ref()
                    .is_some_and(|r| r.proc.name.starts_with(&format!("shard-sd-{id}-")))
            })
            .unwrap_or_else(|| panic!("no replica {id}"))
    }

    async fn leader(&self) -> (usize, serde_json::Value) {
        for s in self.statuses().await {
            if s["role"] == "leader" {
                return (self.by_id(s["replica_id"].as_str().unwrap()), s);
            }
        }
        panic!("no leader");
    }

    /// Waits until every replica is ready and the shards cover the expected set exactly once.
    async fn settle(&self, what: &str) -> BTreeMap<String, Vec<String>> {
        self.settle_on(what, 0).await
    }

    /// [`settle`], with at least `serving` replicas serving a non-empty shard.
    async fn settle_on(&self, what: &str, serving: usize) -> BTreeMap<String, Vec<String>> {
        let expected = self.expected.clone();
        wait_for(what, Duration::from_secs(30), || async {
            let shards = shards(&self.addrs()).await;
            let all: Vec<String> = shards.values().flatten().cloned().collect();
            let union: BTreeSet<String> = all.iter().cloned().collect();
            let ready = self.statuses().await.iter().all(|s| s["ready"] == true);
            let busy = shards.values().filter(|s| !s.is_empty()).count();
            (ready && union == expected && all.len() == expected.len() && busy >= serving)
                .then_some(shards)
        })
        .await
    }
}

/// When, which targets were missing, and which were served twice.
type Sample = (Instant, BTreeSet<String>, BTreeSet<String>);

/// Coverage sampled every 200 ms: per sample, targets missing and targets served twice.
struct Sampler {
    addrs: Arc<Mutex<Vec<String>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Sampler {
    fn start(addrs: Vec<String>, expected: BTreeSet<String>) -> Sampler {
        let sampler = Sampler {
            addrs: Arc::new(Mutex::new(addrs)),
            samples: Arc::new(Mutex::new(Vec::new())),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let (addrs, samples, stop) = (
            sampler.addrs.clone(),
            sampler.samples.clone(),
            sampler.stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let at = Instant::now();
                let list = addrs.lock().unwrap().clone();
                let shards = shards(&list).await;
                let mut seen = BTreeSet::new();
                let mut twice = BTreeSet::new();
                for t in shards.values().flatten() {
                    if !seen.insert(t.clone()) {
                        twice.insert(t.clone());
                    }
                }
                let missing: BTreeSet<String> = expected.difference(&seen).cloned().collect();
                samples.lock().unwrap().push((at, missing, twice));
                tokio::time::sleep_until((at + Duration::from_millis(200)).into()).await;
            }
        });
        sampler
    }

    fn set_addrs(&self, addrs: Vec<String>) {
        *self.addrs.lock().unwrap() = addrs;
    }

    /// Longest run of consecutive samples with some target missing.
    fn longest_gap(&self) -> Duration {
        let samples = self.samples.lock().unwrap().clone();
        let (mut start, mut longest) = (None::<Instant>, Duration::ZERO);
        for (at, missing, _) in &samples {
            if missing.is_empty() {
                start = None;
            } else {
                let s = *start.get_or_insert(*at);
                longest = longest.max(at.duration_since(s) + Duration::from_millis(200));
            }
        }
        longest
    }

    /// Stops and returns (samples, samples with a missing target, longest a target stayed doubled).
    fn finish(self) -> (usize, Vec<BTreeSet<String>>, Duration) {
        self.stop.cancel();
        let samples = self.samples.lock().unwrap().clone();
        let missing: Vec<BTreeSet<String>> = samples
            .iter()
            .filter(|s| !s.1.is_empty())
            .map(|s| s.1.clone())
            .collect();
        // Longest run of consecutive samples in which one target was served twice.
        let mut since: BTreeMap<String, Instant> = BTreeMap::new();
        let mut longest = Duration::ZERO;
        for (at, _, twice) in &samples {
            since.retain(|t, _| twice.contains(t));
            for t in twice {
                let start = *since.entry(t.clone()).or_insert(*at);
                longest = longest.max(at.duration_since(start));
            }
        }
        (samples.len(), missing, longest)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn steady_state_registrations_and_prometheus() {
    let c = Cluster::start("3", 3, 4, 30).await;
    let steady = c
        .settle_on("three shards covering every target once", 3)
        .await;
    assert_eq!(steady.len(), 3);
    assert!(steady.values().all(|s| !s.is_empty()), "{steady:?}");

    // The leader's view of the assignment.
    let (li, _) = c.leader().await;
    let leader = c.replicas[li].as_ref().unwrap();
    let public = http()
        .get(leader.url("/v1/assignment"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        public.status(),
        404,
        "the peer endpoints are on PEER_LISTEN_ADDR only"
    );
    let unauth = http()
        .get(leader.peer_url("/v1/assignment"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        unauth.status(),
        401,
        "PEER_TOKEN guards the internal endpoints"
    );
    let assignment: serde_json::Value = http()
        .get(leader.peer_url("/v1/assignment"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slots = assignment["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 3, "{assignment}");
    let total: u64 = slots.iter().map(|s| s["targets"].as_u64().unwrap()).sum();
    assert_eq!(total as usize, c.expected.len());
    assert!(slots.iter().all(|s| s["holder"].is_string()));
    for s in c.statuses().await {
        assert!(
            s["generation"].is_u64() && s["shard_targets"].is_u64(),
            "{s}"
        );
        if s["role"] != "leader" {
            assert!(
                s["last_discovery"].is_null(),
                "only the leader discovers: {s}"
            );
        }
    }

    // Each replica's /metrics tells its role; the leader's also the live slots.
    for r in c.alive() {
        let status = r.status().await;
        let text = r.metrics().await;
        let role = status["role"].as_str().unwrap();
        assert!(
            text.contains(&format!("shard_sd_role{{role=\"{role}\"}} 1")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "shard_sd_shard_targets {}",
                status["shard_targets"]
            )),
            "{text}"
        );
        if role == "leader" {
            assert!(text.contains("shard_sd_live_slots 3"), "{text}");
            assert!(
                text.contains(&format!("shard_sd_targets_discovered {}", c.expected.len())),
                "{text}"
            );
        }
    }

    // The peer token never reaches the logs.
    for r in c.alive() {
        assert!(
            !r.proc.log_text().contains(TOKEN),
            "{} logged the peer token",
            r.proc.name
        );
    }

    // A real Prometheus with one http_sd job per replica sees every target once.
    let mut cfg =
        String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n");
    for (i, r) in c.alive().iter().enumerate() {
        cfg.push_str(&format!(
            "  - job_name: shard{i}\n    http_sd_configs:\n      - url: http://{}/prometheus-targets\n        refresh_interval: 1s\n",
            r.addr
        ));
    }
    let prom = Prometheus::start(&cfg).await;
    let live: BTreeSet<String> = c
        .expected
        .iter()
        .filter(|t| t.starts_with("127.0.0."))
        .cloned()
        .collect();
    wait_for(
        "prometheus to scrape the live targets",
        Duration::from_secs(30),
        || async {
            let active = prom.active_targets().await;
            let urls: Vec<String> = active
                .iter()
                .filter_map(|t| t["labels"]["instance"].as_str().map(str::to_owned))
                .collect();
            let up: BTreeSet<String> = active
                .iter()
                .filter(|t| t["health"] == "up")
                .filter_map(|t| {
                    t["discoveredLabels"]["__address__"]
                        .as_str()
                        .map(str::to_owned)
                })
                .collect();
            (active.len() == c.expected.len()
                && urls.len() == c.expected.len()
                && live.is_subset(&up))
            .then_some(())
        },
    )
    .await;

    // A registration reaches exactly one replica within one refresh (1 s) plus 1 s.
    let registered = Instant::now();
    c.cm.register_task(&c.bulk.id, "bulk-new", "127.0.9.9")
        .await;
    let holder = wait_for("the new target", Duration::from_secs(10), || async {
        let s = shards(&c.addrs()).await;
        let holders: Vec<String> = s
            .iter()
            .filter(|(_, t)| t.contains(&"127.0.9.9:3000".to_string()))
            .map(|(a, _)| a.clone())
            .collect();
        (holders.len() == 1).then(|| holders[0].clone())
    })
    .await;
    let convergence = registered.elapsed();
    println!("MEASURE registration -> served by {holder} after {convergence:?}");
    assert!(convergence <= Duration::from_secs(2), "{convergence:?}");
    let deregistered = Instant::now();
    c.cm.deregister(&c.bulk.id, "bulk-new").await;
    wait_for("the target gone", Duration::from_secs(10), || async {
        let s = shards(&c.addrs()).await;
        (!s.values().flatten().any(|t| t == "127.0.9.9:3000")).then_some(())
    })
    .await;
    println!(
        "MEASURE deregistration -> gone after {:?}",
        deregistered.elapsed()
    );
    assert!(deregistered.elapsed() <= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn scale_out_and_in_move_about_a_quarter_with_no_gap() {
    let mut c = Cluster::start("auto", 3, 2, 76).await; // 80 targets
    let before = c.settle_on("three shards", 3).await;
    let sampler = Sampler::start(c.addrs(), c.expected.clone());

    let i = c.add_replica().await;
    sampler.set_addrs(c.addrs());
    let after = c.settle_on("four shards", 4).await;
    assert_eq!(
        after.values().filter(|s| !s.is_empty()).count(),
        4,
        "{after:?}"
    );
    let owner = |m: &BTreeMap<String, Vec<String>>| -> BTreeMap<String, String> {
        m.iter()
            .flat_map(|(a, ts)| ts.iter().map(move |t| (t.clone(), a.clone())))
            .collect()
    };
    let (o1, o2) = (owner(&before), owner(&after));
    let moved_out = o1.iter().filter(|(t, a)| o2.get(*t) != Some(a)).count();
    let fraction = moved_out as f64 / c.expected.len() as f64;
    println!(
        "MEASURE scale-out 3->4: {moved_out} of {} targets moved ({fraction:.3}; optimum 0.25)",
        c.expected.len()
    );
    assert!((0.12..=0.40).contains(&fraction), "{fraction}");

    // Scale in: the fourth replica stops; its slot is released and its targets go back.
    let mut stopping = c.replicas[i].take().unwrap();
    stopping.proc.signal(libc::SIGTERM);
    assert_eq!(stopping.proc.wait_exit(Duration::from_secs(15)), Some(0));
    // Nobody takes the released slot: it served until the leader reassigned its
    // targets and their new holders confirmed them.
    assert!(
        stopping.proc.log_text().contains("slot handed over"),
        "{}",
        stopping.proc.log_text()
    );
    sampler.set_addrs(c.addrs());
    let back = c.settle_on("three shards again", 3).await;
    let o3 = owner(&back);
    let moved_back = o2.iter().filter(|(t, a)| o3.get(*t) != Some(a)).count();
    println!("MEASURE scale-in 4->3: {moved_back} targets moved");
    assert_eq!(o3, o1, "scale-in restores the three-slot assignment");

    let (n, missing, doubled) = sampler.finish();
    println!(
        "MEASURE scale out/in: {n} samples, {} with a gap, longest overlap {doubled:?}",
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "uncovered targets: {:?}",
        missing.first()
    );
    assert!(doubled <= GRACE + Duration::from_secs(2), "{doubled:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rolling_replacement_moves_nothing_and_leaves_no_gap() {
    let mut c = Cluster::start("3", 4, 2, 40).await; // 3 slots + 1 standby
    let before = c.settle_on("three shards and a standby", 3).await;
    let statuses = c.statuses().await;
    let by_slot = |statuses: &[serde_json::Value]| -> BTreeMap<u64, u64> {
        statuses
            .iter()
            .filter_map(|s| Some((s["slot"].as_u64()?, s["shard_targets"].as_u64()?)))
            .collect()
    };
    let slots_before = by_slot(&statuses);
    let victim = statuses
        .iter()
        .find(|s| s["role"] == "follower")
        .map(|s| s["replica_id"].as_str().unwrap().to_owned())
        .unwrap();
    let sampler = Sampler::start(c.addrs(), c.expected.clone());
    let vi = c.by_id(&victim);
    let mut stopping = c.replicas[vi].take().unwrap();
    stopping.proc.signal(libc::SIGTERM);
    assert_eq!(stopping.proc.wait_exit(Duration::from_secs(15)), Some(0));
    sampler.set_addrs(c.addrs());
    let after = c.settle_on("the standby serving the slot", 3).await;
    let (n, missing, doubled) = sampler.finish();
    println!(
        "MEASURE rolling replacement: {n} samples, {} with a gap, longest overlap {doubled:?}",
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "uncovered targets: {:?}",
        missing.first()
    );
    assert_eq!(
        by_slot(&c.statuses().await),
        slots_before,
        "every slot serves what it served"
    );
    // The shards themselves are unchanged: the same target sets, one of them on a new replica.
    let sets = |m: &BTreeMap<String, Vec<String>>| m.values().cloned().collect::<BTreeSet<_>>();
    assert_eq!(
        sets(&after),
        sets(&before)
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect()
    );
    assert!(stopping.proc.log_text().contains("slot handed over"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_of_the_leader_bounds_the_gap_to_its_slot() {
    let mut c = Cluster::start("3", 4, 2, 40).await;
    let before = c.settle_on("steady", 3).await;
    let (li, leader) = c.leader().await;
    assert!(
        leader["slot"].is_u64(),
        "the first replica leads and holds a slot: {leader}"
    );
    let old_term = leader["term"].as_u64().unwrap();
    let leader_addr = c.replicas[li].as_ref().unwrap().addr.clone();
    let dead_targets: BTreeSet<String> = before[&leader_addr].iter().cloned().collect();
    let followers: Vec<String> = c
        .addrs()
        .into_iter()
        .filter(|a| *a != leader_addr)
        .collect();
    let sampler = Sampler::start(followers.clone(), c.expected.clone());

    let killed = Instant::now();
    c.replicas[li].as_ref().unwrap().proc.signal(libc::SIGKILL);
    c.replicas[li] = None;
    // Followers keep serving what they served (never empty) while the leader is gone.
    let mut recovered = None;
    while killed.elapsed() < LEASE * 4 {
        let s = shards(&followers).await;
        for a in &followers {
            if let Some(t) = before.get(a).filter(|t| !t.is_empty()) {
                assert!(
                    s.get(a).is_some_and(|now| !now.is_empty()),
                    "{a} served nothing after the leader died"
                );
                let _ = t;
            }
        }
        let union: BTreeSet<String> = s.values().flatten().cloned().collect();
        if recovered.is_none() && dead_targets.is_subset(&union) {
            recovered = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gap = recovered.expect("the dead leader's targets were never served again");
    println!(
        "MEASURE leader SIGKILL: its slot's {} targets uncovered for {gap:?}",
        dead_targets.len()
    );
    // Lease + heartbeat, plus this loop's 100 ms polling and the HTTP round trips.
    assert!(
        gap <= LEASE + HEARTBEAT + Duration::from_millis(400),
        "{gap:?}"
    );
    let (ni, new_leader) = c.leader().await;
    assert!(new_leader["term"].as_u64().unwrap() > old_term);
    let log = c.replicas[ni].as_ref().unwrap().proc.log_text();
    assert!(
        log.contains("starting from the previous leader's assignment"),
        "the new leader did not start from the mirror"
    );
    c.settle_on("steady after failover", 3).await;
    let (_, missing, _) = sampler.finish();
    // Only the dead leader's targets were ever missing.
    for m in missing {
        assert!(
            m.is_subset(&dead_targets),
            "a follower's targets went missing: {m:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_follower_loses_its_slot_and_never_doubles_for_long() {
    let c = Cluster::start("3", 4, 2, 40).await;
    c.settle_on("steady", 3).await;
    let victim = c
        .statuses()
        .await
        .into_iter()
        .find(|s| s["role"] == "follower")
        .map(|s| s["replica_id"].as_str().unwrap().to_owned())
        .unwrap();
    let vi = c.by_id(&victim);
    let sampler = Sampler::start(c.addrs(), c.expected.clone());
    let paused = c.replicas[vi].as_ref().unwrap();
    paused.proc.signal(libc::SIGSTOP);
    tokio::time::sleep(LEASE + Duration::from_secs(2)).await;
    paused.proc.signal(libc::SIGCONT);
    wait_for(
        "the paused replica to rejoin",
        Duration::from_secs(10),
        || async {
            let s = paused.status().await;
            (s["ready"] == true).then_some(s)
        },
    )
    .await;
    c.settle_on("steady after the pause", 3).await;
    let rejoined = paused.status().await;
    assert!(
        rejoined["role"] == "standby" || rejoined["slot"].is_u64(),
        "{rejoined}"
    );
    let gap = sampler.longest_gap();
    println!("MEASURE follower SIGSTOP: its targets uncovered for at most {gap:?} (sampled every 200 ms)");
    assert!(
        gap <= LEASE + HEARTBEAT + Duration::from_millis(1500),
        "{gap:?}"
    );
    let (n, missing, doubled) = sampler.finish();
    println!(
        "MEASURE follower SIGSTOP {:?}: {n} samples, {} with a gap, longest overlap {doubled:?}",
        LEASE + Duration::from_secs(2),
        missing.len()
    );
    assert!(
        doubled <= GRACE + Duration::from_secs(1),
        "a target was served twice for {doubled:?}"
    );
}

/// Leader only: Cloud Map and SSM requests do not grow with the number of replicas.
#[tokio::test(flavor = "multi_thread")]
async fn aws_requests_do_not_grow_with_replicas() {
    let mut c = Cluster::start("auto", 1, 0, 20).await;
    let discovery_ops = |counts: BTreeMap<String, u64>| -> u64 {
        counts
            .iter()
            .filter(|(op, _)| {
                matches!(
                    op.as_str(),
                    "GetParameter"
                        | "ListNamespaces"
                        | "ListServices"
                        | "GetService"
                        | "ListTagsForResource"
                        | "DiscoverInstances"
                        | "DiscoverInstancesRevision"
                )
            })
            .map(|(_, n)| n)
            .sum()
    };
    let window = Duration::from_secs(10);
    let mut per_minute = Vec::new();
    for n in [1usize, 3, 5] {
        while c.alive().len() < n {
            c.add_replica().await;
        }
        c.settle("steady").await;
        c.proxy.reset_counts();
        tokio::time::sleep(window).await;
        let ops = discovery_ops(c.proxy.counts());
        let rate = ops as f64 * 60.0 / window.as_secs_f64();
        println!("MEASURE {n} replicas: {ops} Cloud Map + SSM requests in {window:?} ({rate:.0}/min at CONFIG_RELOAD_FREQUENCY=1s)");
        per_minute.push(rate);
    }
    for r in &per_minute[1..] {
        assert!(*r <= per_minute[0] * 1.3, "{per_minute:?}");
    }
}

fn cpu_seconds_and_rss(pid: i32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu, rss_kb * 1024)
}

/// Leader CPU and memory with 10,000 targets (10 services x 500 tasks x 2 targets).
/// A measurement, not run in CI: `cargo nextest run --test sharded_e2e leader_cost --run-ignored only --no-capture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn leader_cost_with_10k_targets() {
    let mut c = Cluster::start("3", 0, 0, 0).await;
    let ns = c.cm.http_namespace("big").await;
    let tags = [
        ("METRICS_PATH", "/metrics"),
        ("METRICS_PORT", "3000"),
        ("ECS_METRICS_PATH", "/metrics"),
        ("ECS_METRICS_PORT", "9779"),
    ];
    c.expected.clear();
    for s in 0..10 {
        let svc = c.cm.service(&ns, &format!("svc-{s}"), &tags).await;
        for i in 0..500 {
            let ip = format!("10.{s}.{}.{}", i / 250, i % 250 + 1);
            c.cm.register_task(&svc.id, &format!("t{s}-{i}"), &ip).await;
            c.expected.insert(format!("{ip}:3000"));
            c.expected.insert(format!("{ip}:9779"));
        }
    }
    c.namespaces = "big".into();
    c.reload = "30".into();
    for _ in 0..3 {
        c.add_replica().await;
    }
    let started = Instant::now();
    c.settle_on("10k targets in three shards", 3).await;
    println!(
        "MEASURE 10k targets served by 3 shards {:?} after start",
        started.elapsed()
    );
    let (li, _) = c.leader().await;
    let pid = c.replicas[li].as_ref().unwrap().proc.pid();
    let (cpu0, _) = cpu_seconds_and_rss(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (cpu1, rss) = cpu_seconds_and_rss(pid);
    let wall = t0.elapsed().as_secs_f64();
    println!(
        "MEASURE leader with 10k targets, CONFIG_RELOAD_FREQUENCY=30: {:.2}% of one core over {wall:.0}s, RSS {:.1} MiB",
        100.0 * (cpu1 - cpu0) / wall,
        rss as f64 / 1048576.0
    );
    for r in c.alive() {
        let (_, rss) = cpu_seconds_and_rss(r.proc.pid());
        println!(
            "MEASURE {}: RSS {:.1} MiB",
            r.proc.name,
            rss as f64 / 1048576.0
        );
    }
}
