//! Event-driven refresh on moto: ECS task state changes put on EventBridge's
//! default bus reach an SQS queue through a rule (both moto, through the real
//! protocols), shard-sd reads the queue and re-reads the services they name.
//! With a 5-minute safety net, a registration followed by its event is served
//! within seconds; an event ahead of its registration, a lost one, duplicates,
//! reordering, malformed messages, a queue that cannot be read and a leader's
//! SIGKILL all still end with the target served.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::cloudmap::{CloudMap, Service};
use common::cluster::{shards, start_replica, LEASE};
use common::events::{task_event, EventQueue, CLUSTER};
use common::proxy::{AwsProxy, Fault, CLOUD_MAP_OPERATIONS};
use common::{addresses, aws_env, wait_for, Moto, ShardSd};

const PORT: &str = "8080";

struct Account {
    moto: Moto,
    cm: CloudMap,
    services: Vec<Service>,
    queue: EventQueue,
}

impl Account {
    /// `services` services (`svc-<i>`, ECS service `app-<i>`), one task each.
    async fn start(services: usize) -> Account {
        let moto = Moto::start().await;
        let cm = CloudMap::new(&moto.sdk_config().await);
        let ns = cm.dns_namespace("ecs-services").await;
        let mut list = Vec::new();
        for i in 0..services {
            let svc = cm
                .service(
                    &ns,
                    &format!("svc-{i}"),
                    &[("METRICS_PATH", "/metrics"), ("METRICS_PORT", PORT)],
                )
                .await;
            list.push(svc);
        }
        let queue = EventQueue::create(&moto.endpoint, "shard-sd-events", 2).await;
        let account = Account {
            moto,
            cm,
            services: list,
            queue,
        };
        for i in 0..services {
            account.register(i, &format!("seed-{i}"), &ip(i, 0)).await;
        }
        account
    }

    /// Registers task `task` of service `i` at `addr` as ECS does.
    async fn register(&self, i: usize, task: &str, addr: &str) {
        let service = format!("app-{i}");
        self.cm
            .register(
                &self.services[i].id,
                task,
                &[
                    ("AWS_INSTANCE_IPV4", addr),
                    ("ECS_CLUSTER_NAME", CLUSTER),
                    ("ECS_SERVICE_NAME", &service),
                    ("ECS_TASK_DEFINITION_FAMILY", "app"),
                ],
            )
            .await;
    }

    fn env(&self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        self.env_through(&self.moto.endpoint, extra)
    }

    /// [`Account::env`], reaching AWS through `endpoint` (a proxy).
    fn env_through(&self, endpoint: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = aws_env(endpoint);
        env.push(("DISCOVERY_NAMESPACES".into(), "ecs-services".into()));
        env.push(("EVENTS_QUEUE_URL".into(), self.queue.url.clone()));
        env.push(("CONFIG_RELOAD_FREQUENCY".into(), "5m".into()));
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        env
    }
}

/// A distinct address per (service, task).
fn ip(service: usize, task: usize) -> String {
    format!("127.{}.{}.{}", 1 + task, service / 200, service % 200 + 1)
}

fn target(addr: &str) -> String {
    format!("{addr}:{PORT}")
}

async fn served(addrs: &[String]) -> BTreeSet<String> {
    shards(addrs).await.into_values().flatten().collect()
}

/// How long until `addrs` together serve `t` (or, `gone`, no longer do).
async fn until(addrs: &[String], t: &str, gone: bool, limit: Duration) -> Duration {
    let start = Instant::now();
    wait_for(&format!("{t} served: {}", !gone), limit, || async {
        (served(addrs).await.contains(t) != gone).then_some(())
    })
    .await;
    start.elapsed()
}

/// The value of `name{labels}` in a `/metrics` text, 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_and_their_events_are_served_within_seconds() {
    let account = Account::start(100).await;
    let sd = ShardSd::start("events", &account.env(&[])).await;
    let addrs = vec![sd.addr.clone()];
    sd.wait_targets("first cycle", Duration::from_secs(30), |t| t.len() == 100)
        .await;
    let before = sd.metrics().await;

    let mut up = Vec::new();
    let mut down = Vec::new();
    for n in 0..10 {
        let i = (n * 37) % 100;
        let (task, addr) = (format!("new-{n}"), ip(i, 1));
        account.register(i, &task, &addr).await;
        account
            .queue
            .put_task_event(&task, &format!("app-{i}"), "RUNNING", 1)
            .await;
        up.push(until(&addrs, &target(&addr), false, Duration::from_secs(10)).await);
        account.cm.deregister(&account.services[i].id, &task).await;
        account
            .queue
            .put_task_event(&task, &format!("app-{i}"), "STOPPED", 2)
            .await;
        down.push(until(&addrs, &target(&addr), true, Duration::from_secs(10)).await);
    }
    up.sort();
    down.sort();
    println!(
        "MEASURE registration + event -> served (100 services, safety net 5 min): p50 {:?}, max {:?}",
        percentile(&up, 0.5),
        up[up.len() - 1]
    );
    println!(
        "MEASURE deregistration + STOPPED event -> gone: p50 {:?}, max {:?}",
        percentile(&down, 0.5),
        down[down.len() - 1]
    );
    assert!(
        percentile(&up, 0.5) <= Duration::from_millis(1500),
        "{up:?}"
    );
    assert!(up[up.len() - 1] <= Duration::from_secs(3), "{up:?}");
    assert!(down[down.len() - 1] <= Duration::from_secs(3), "{down:?}");

    let after = sd.metrics().await;
    let fresh = "shard_sd_events_received_total{outcome=\"fresh\"}";
    assert_eq!(metric(&after, fresh) - metric(&before, fresh), 20.0);
    assert!(metric(&after, "shard_sd_event_to_published_seconds_count") >= 20.0);
    // Every handled message was deleted.
    wait_for("queue drained", Duration::from_secs(10), || async {
        (account.queue.depth().await == 0).then_some(())
    })
    .await;
    let status = sd.status().await;
    assert_eq!(status["events"]["state"], "consuming", "{status}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_ahead_of_its_registration_ends_served_by_the_checks_after_it() {
    let account = Account::start(3).await;
    let sd = ShardSd::start("early", &account.env(&[])).await;
    let addrs = vec![sd.addr.clone()];
    sd.wait_targets("first cycle", Duration::from_secs(20), |t| t.len() == 3)
        .await;
    let addr = ip(1, 1);
    account
        .queue
        .put_task_event("early", "app-1", "RUNNING", 1)
        .await;
    // The registration trails the event by 1.5 s: the read at once finds
    // nothing new, the check 3 s after it does.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let registered = Instant::now();
    account.register(1, "early", &addr).await;
    until(&addrs, &target(&addr), false, Duration::from_secs(12)).await;
    println!(
        "MEASURE registration 1.5 s after its event: served {:?} after the registration",
        registered.elapsed()
    );
    assert!(registered.elapsed() <= Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_event_is_caught_by_the_safety_net() {
    let account = Account::start(3).await;
    let sd = ShardSd::start("lost", &account.env(&[("CONFIG_RELOAD_FREQUENCY", "6s")])).await;
    let addrs = vec![sd.addr.clone()];
    sd.wait_targets("first cycle", Duration::from_secs(20), |t| t.len() == 3)
        .await;
    let addr = ip(2, 1);
    account.register(2, "unannounced", &addr).await;
    let took = until(&addrs, &target(&addr), false, Duration::from_secs(15)).await;
    println!("MEASURE registration without its event, safety net 6 s: served after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicated_reordered_and_malformed_messages_change_nothing_and_are_deleted() {
    let account = Account::start(3).await;
    let sd = ShardSd::start("messy", &account.env(&[])).await;
    let addrs = vec![sd.addr.clone()];
    sd.wait_targets("first cycle", Duration::from_secs(20), |t| t.len() == 3)
        .await;
    let q = &account.queue;
    for body in [
        "not json",
        "{}",
        r#"{"detail":{"group":"service:app-0"}}"#,
        "[]",
    ] {
        q.send_raw(body).await;
    }
    // Not a service's task: ignored.
    q.send_raw(
        &task_event("batch", "app-0", "RUNNING", 1).replace("service:app-0", "family:batch"),
    )
    .await;
    let addr = ip(0, 1);
    account.register(0, "t", &addr).await;
    // Version 3, then 3 again (a duplicate delivery) and 2 (overtaken).
    for version in [3, 3, 2] {
        q.send_raw(&task_event("t", "app-0", "RUNNING", version))
            .await;
    }
    until(&addrs, &target(&addr), false, Duration::from_secs(10)).await;
    wait_for("every message deleted", Duration::from_secs(15), || async {
        (q.depth().await == 0).then_some(())
    })
    .await;
    let text = sd.metrics().await;
    let count = |outcome: &str| {
        metric(
            &text,
            &format!("shard_sd_events_received_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("malformed"), 4.0, "{text}");
    assert_eq!(count("ignored"), 1.0);
    // SQS may hand the three over in any order: 3, 3, 2 is one fresh and two
    // duplicates; 2, 3, 3 two fresh and one.
    assert_eq!(count("fresh") + count("duplicate"), 3.0);
    assert!(count("duplicate") >= 1.0);
    // Each kind of malformed message is logged once.
    let warned = sd
        .proc
        .log_text()
        .matches("is not an ECS task event")
        .count();
    assert!((1..=4).contains(&warned), "{warned}");
    assert_eq!(addresses(&sd.targets().await.unwrap()).len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_that_cannot_be_read_falls_back_to_polling_and_recovers() {
    let account = Account::start(3).await;
    let sqs = AwsProxy::start(&account.moto.endpoint).await;
    sqs.set_fault(Fault::Error {
        op: Some("ReceiveMessage".into()),
        code: "AccessDenied".into(),
    });
    let sd = ShardSd::start(
        "fallback",
        &account.env(&[
            ("AWS_ENDPOINT_URL_SQS", &sqs.endpoint),
            ("EVENTS_FALLBACK_FREQUENCY", "2s"),
        ]),
    )
    .await;
    let addrs = vec![sd.addr.clone()];
    sd.wait_targets("first cycle", Duration::from_secs(20), |t| t.len() == 3)
        .await;
    let status = wait_for("fallback", Duration::from_secs(10), || async {
        let s = sd.status().await;
        (s["events"]["state"] == "fallback").then_some(s)
    })
    .await;
    assert!(
        status["events"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("AccessDenied") && e.contains("sqs:ReceiveMessage")),
        "{status}"
    );
    assert_eq!(metric(&sd.metrics().await, "shard_sd_events_fallback"), 1.0);
    assert_eq!(
        sd.proc
            .log_text()
            .matches("cannot read EVENTS_QUEUE_URL")
            .count(),
        1,
        "one WARN line"
    );
    // Polling every 2 s serves a registration nobody announces.
    let addr = ip(0, 1);
    account.register(0, "polled", &addr).await;
    let took = until(&addrs, &target(&addr), false, Duration::from_secs(8)).await;
    println!("MEASURE queue denied: registration served by fallback polling (2 s) after {took:?}");

    // Readable again: back to events by itself.
    sqs.set_fault(Fault::None);
    wait_for("consuming again", Duration::from_secs(40), || async {
        (sd.status().await["events"]["state"] == "consuming").then_some(())
    })
    .await;
    let addr = ip(1, 1);
    account.register(1, "announced", &addr).await;
    account
        .queue
        .put_task_event("announced", "app-1", "RUNNING", 1)
        .await;
    until(&addrs, &target(&addr), false, Duration::from_secs(5)).await;

    // A receive that never answers is a stall: fallback within one long poll
    // and its margin.
    sqs.set_fault(Fault::Hang);
    let stalled = Instant::now();
    wait_for("fallback on a stall", Duration::from_secs(60), || async {
        (sd.status().await["events"]["state"] == "fallback").then_some(())
    })
    .await;
    println!(
        "MEASURE queue stalled: fallback engaged after {:?}",
        stalled.elapsed()
    );
    assert!(stalled.elapsed() <= Duration::from_secs(26));
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_reads_events_and_a_sigkill_of_it_loses_none() {
    let account = Account::start(6).await;
    let cloud = AwsProxy::start(&account.moto.endpoint).await;
    let env: Vec<(String, String)> = [
        ("DISCOVERY_NAMESPACES", "ecs-services"),
        ("EVENTS_QUEUE_URL", account.queue.url.as_str()),
        ("CONFIG_RELOAD_FREQUENCY", "5m"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(Some(
            start_replica(&account.moto, &cloud, &format!("r{i}"), "3", &env).await,
        ));
    }
    let addrs = |replicas: &[Option<common::cluster::Replica>]| -> Vec<String> {
        replicas
            .iter()
            .flatten()
            .map(|r| r.sd.addr.clone())
            .collect()
    };
    let all = addrs(&replicas);
    wait_for("six targets served", Duration::from_secs(30), || async {
        (served(&all).await.len() == 6).then_some(())
    })
    .await;
    let addr = ip(0, 1);
    account.register(0, "a", &addr).await;
    account
        .queue
        .put_task_event("a", "app-0", "RUNNING", 1)
        .await;
    until(&all, &target(&addr), false, Duration::from_secs(5)).await;
    // The leader alone read it.
    let mut leader = None;
    for (i, r) in replicas.iter().enumerate() {
        let r = r.as_ref().unwrap();
        let read = metric(
            &r.sd.metrics().await,
            "shard_sd_events_received_total{outcome=\"fresh\"}",
        );
        let status = r.sd.status().await;
        if status["role"] == "leader" {
            assert_eq!(read, 1.0, "the leader read the event");
            assert_eq!(status["events"]["state"], "consuming");
            leader = Some(i);
        } else {
            assert_eq!(read, 0.0, "{} read events", r.id);
            assert!(status["events"].is_null(), "{status}");
        }
    }
    let leader = leader.expect("a leader");

    // An event the leader read but could not act on (Cloud Map fails) stays
    // in the queue; the leader dies; the next one reads it again.
    cloud.set_fault(Fault::Fail {
        op: Some("DiscoverInstances".into()),
    });
    let addr = ip(1, 1);
    account.register(1, "b", &addr).await;
    account
        .queue
        .put_task_event("b", "app-1", "RUNNING", 1)
        .await;
    let dying = replicas[leader].as_ref().unwrap();
    wait_for("the leader read it", Duration::from_secs(10), || async {
        let text = dying.sd.metrics().await;
        (metric(&text, "shard_sd_events_received_total{outcome=\"fresh\"}") >= 2.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        account.queue.depth().await >= 1,
        "deleted though not handled"
    );
    dying.sd.proc.signal(libc::SIGKILL);
    replicas[leader] = None;
    let killed = Instant::now();
    cloud.set_fault(Fault::None);
    let survivors = addrs(&replicas);
    let successor = wait_for("a new leader reading events", LEASE * 4, || async {
        for r in replicas.iter().flatten() {
            let s = r.sd.status().await;
            if s["role"] == "leader" && s["events"]["state"] == "consuming" {
                return Some(r.sd.addr.clone());
            }
        }
        None
    })
    .await;
    let successor = replicas
        .iter()
        .flatten()
        .find(|r| r.sd.addr == successor)
        .expect("successor");
    wait_for("the event read again", Duration::from_secs(40), || async {
        let text = successor.sd.metrics().await;
        (metric(&text, "shard_sd_events_received_total{outcome=\"fresh\"}") >= 1.0).then_some(())
    })
    .await;
    println!(
        "MEASURE leader SIGKILL with an event read but not handled: the next leader read it {:?} after the kill",
        killed.elapsed()
    );
    until(&survivors, &target(&addr), false, Duration::from_secs(5)).await;
    wait_for("queue drained", Duration::from_secs(20), || async {
        (account.queue.depth().await == 0).then_some(())
    })
    .await;
    // And its own events drive discovery: a registration announced now is
    // served long before any cycle (5 minutes) would find it.
    let addr = ip(2, 1);
    account.register(2, "c", &addr).await;
    account
        .queue
        .put_task_event("c", "app-2", "RUNNING", 1)
        .await;
    let took = until(&survivors, &target(&addr), false, Duration::from_secs(5)).await;
    println!("MEASURE after the failover: registration + event served in {took:?}");
}

/// Cloud Map requests counted by `proxy` (every operation but SSM and SQS).
fn cloud_map_requests(proxy: &AwsProxy) -> u64 {
    proxy
        .counts()
        .iter()
        .filter(|(op, _)| CLOUD_MAP_OPERATIONS.contains(&op.as_str()))
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_cloud_map_requests_fall_tenfold_with_events() {
    // Scaled down tenfold: polling every 3 s against events with a 30 s safety
    // net, as 30 s against 5 minutes.
    let account = Account::start(100).await;
    let (polling, events) = (
        AwsProxy::start(&account.moto.endpoint).await,
        AwsProxy::start(&account.moto.endpoint).await,
    );
    // Through its own proxy, with its own queue or none.
    let env_via = |proxy: &AwsProxy, reload: &str, queue: Option<&str>| {
        let mut env = account.env_through(&proxy.endpoint, &[("CONFIG_RELOAD_FREQUENCY", reload)]);
        env.retain(|(k, _)| k != "EVENTS_QUEUE_URL");
        env.extend(queue.map(|q| ("EVENTS_QUEUE_URL".to_owned(), q.to_owned())));
        env
    };
    let a = ShardSd::start("polling", &env_via(&polling, "3s", None)).await;
    a.wait_targets("first cycle", Duration::from_secs(30), |t| t.len() == 100)
        .await;
    let own = EventQueue::create(&account.moto.endpoint, "idle-events", 2).await;
    let b = ShardSd::start("events-idle", &env_via(&events, "30s", Some(&own.url))).await;
    b.wait_targets("first cycle", Duration::from_secs(30), |t| t.len() == 100)
        .await;
    let (a0, b0) = (cloud_map_requests(&polling), cloud_map_requests(&events));
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let (a1, b1) = (
        cloud_map_requests(&polling) - a0,
        cloud_map_requests(&events) - b0,
    );
    let per_hour = |n: u64| n as f64 * 3600.0 / window.as_secs_f64() / 10.0;
    println!(
        "MEASURE idle Cloud Map requests over {window:?}, 100 services: polling every 3 s {a1}, events with a 30 s safety net {b1} ({:.1}x fewer); at full scale (30 s against 5 min) about {:.0} and {:.0} per hour",
        a1 as f64 / b1.max(1) as f64,
        per_hour(a1),
        per_hour(b1)
    );
    assert!(b1 > 0, "the safety net ran");
    // 10 times at full scale by the intervals; cycles stretched on a loaded
    // machine shave a little off the polling side here.
    assert!(a1 >= 9 * b1, "{a1} against {b1}");
    drop((a, b));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_whose_services_cannot_be_read_is_kept_until_they_can() {
    let account = Account::start(3).await;
    let cloud = AwsProxy::start(&account.moto.endpoint).await;
    let env = account.env_through(
        &cloud.endpoint,
        &[("AWS_CALL_TIMEOUT", "1s"), ("AWS_MAX_ATTEMPTS", "1")],
    );
    let sd = ShardSd::start("kept", &env).await;
    let addrs = vec![sd.addr.clone()];
    sd.wait_targets("first cycle", Duration::from_secs(20), |t| t.len() == 3)
        .await;
    // Cloud Map fails for longer than the checks after an event last (10 s).
    cloud.set_fault(Fault::Fail {
        op: Some("DiscoverInstances".into()),
    });
    let addr = ip(2, 1);
    account.register(2, "late", &addr).await;
    account
        .queue
        .put_task_event("late", "app-2", "RUNNING", 1)
        .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(!served(&addrs).await.contains(&target(&addr)));
    // The message was not deleted: delivered again once Cloud Map answers, it
    // is fresh again, and the target is served long before the 5-minute net.
    assert!(account.queue.depth().await >= 1);
    cloud.set_fault(Fault::None);
    let took = until(&addrs, &target(&addr), false, Duration::from_secs(10)).await;
    println!(
        "MEASURE event kept through 12 s of Cloud Map failures: served {took:?} after they ended"
    );
    wait_for("queue drained", Duration::from_secs(10), || async {
        (account.queue.depth().await == 0).then_some(())
    })
    .await;
}

/// With events the safety net is minutes apart; a first cycle that met an AWS
/// blip is still tried again within seconds, whatever the queue's health does
/// meanwhile (its start-up check moves it from starting to consuming).
#[tokio::test(flavor = "multi_thread")]
async fn a_first_cycle_that_failed_is_retried_soon_with_events() {
    let account = Account::start(2).await;
    let proxy = AwsProxy::start(&account.moto.endpoint).await;
    proxy.set_fault(Fault::Fail {
        op: Some("ListNamespaces".into()),
    });
    let env = account.env_through(&proxy.endpoint, &[("AWS_MAX_ATTEMPTS", "1")]);
    let sd = ShardSd::start("events-first-retry", &env).await;
    wait_for("a failed first cycle", Duration::from_secs(10), || async {
        let status = sd.status().await;
        (status["last_discovery"]["outcome"] == "failed"
            && status["events"]["state"] == "consuming")
            .then_some(())
    })
    .await;
    proxy.set_fault(Fault::None);
    // Within the backoff (1 s, 2 s, 4 s, ...), far before the 5-minute safety net.
    sd.wait_targets("targets after the blip", Duration::from_secs(10), |t| {
        t.len() == 2
    })
    .await;
}
