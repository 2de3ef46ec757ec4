//! End to end to a metrics backend: 3 to 4 sharded replicas, each with its own
//! collector (vmagent, or Prometheus in agent mode) reading only its replica's
//! `/prometheus-targets` and remote-writing to one VictoriaMetrics, scraping
//! real `sample-app` processes on 127.0.0.x. What reaches the backend is judged
//! from its raw samples: every target scraped by exactly one collector in steady
//! state, no target without samples longer than the documented bound through
//! scale-out, a rolling replacement and a leader SIGKILL, duplicates only around
//! a handoff, and a service tagged `METRICS_INTERVAL=2s` scraped every 2 s while
//! the others keep the job's interval.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::backend::{Backend, Collector, CollectorKind, ScrapeJob};
use common::cloudmap::CloudMap;
use common::cluster::{shards, start_replica, Replica, HEARTBEAT, LEASE};
use common::proxy::AwsProxy;
use common::{free_port, wait_for, Moto, SampleApp};

const JOB: ScrapeJob = ScrapeJob {
    interval: Duration::from_secs(4),
    timeout: Duration::from_secs(3),
    refresh: Duration::from_secs(2),
};
/// `METRICS_INTERVAL` of the fast service.
const FAST_INTERVAL: Duration = Duration::from_secs(2);
/// How long a collector may take to act on a changed http_sd list after reading
/// it: Prometheus's discovery manager hands changes on at most every 5 s, and
/// its scrape manager reloads at most every 5 s (vmagent applies them at once).
const COLLECTOR_BATCH: Duration = Duration::from_secs(10);
/// A moved target stays with its old slot this long after its new holder
/// confirmed it: as the operations guide advises, enough for the new holder's
/// collector to read http_sd, act on it and scrape once (refresh + batch +
/// interval), so that a move leaves no gap.
const GRACE: Duration = Duration::from_secs(16);
/// Slack for process scheduling and the backend's ingestion.
const SLACK: Duration = Duration::from_millis(1500);

/// The documented bounds on one target's samples over an event, for a target
/// scraped every `interval`.
#[derive(Clone, Copy, Debug)]
enum Bound {
    /// Nothing moves: samples one interval apart, one collector only.
    Steady,
    /// Targets move between live slots: no longer apart than in steady state;
    /// two collectors at once only around the handoff, at most the grace plus
    /// the old collector's next read and batch (and the span of its last
    /// scrape).
    Move,
    /// The task scraping the target stops: its last scrape may be an interval
    /// old, the slot is taken after `lease_wait`, the new collector reads
    /// http_sd within one refresh, acts within one batch and scrapes within one
    /// interval.
    Failover { lease_wait: Duration },
}

impl Bound {
    fn gap(self, interval: Duration) -> Duration {
        match self {
            Bound::Steady | Bound::Move => interval + SLACK,
            Bound::Failover { lease_wait } => {
                2 * interval + JOB.refresh + COLLECTOR_BATCH + lease_wait + SLACK
            }
        }
    }

    fn duplicate(self, interval: Duration) -> Duration {
        match self {
            Bound::Steady => Duration::ZERO,
            Bound::Move | Bound::Failover { .. } => {
                GRACE + JOB.refresh + COLLECTOR_BATCH + interval + SLACK
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// One ECS task: a shard-sd replica and the collector beside it.
struct Task {
    replica: Replica,
    collector: Collector,
}

struct World {
    kind: CollectorKind,
    /// `META_LABELS` of replica `r<i>`: `meta_labels[i % len]`.
    meta_labels: &'static [&'static str],
    moto: Moto,
    cloud: AwsProxy,
    backend: Backend,
    tasks: Vec<Option<Task>>,
    /// (instance, metrics_source) of every registered target.
    expected: BTreeSet<(String, String)>,
    /// `ip:port` of every registered target.
    addresses: BTreeSet<String>,
    fast_ips: BTreeSet<String>,
    _apps: Vec<SampleApp>,
}

impl World {
    async fn start(kind: CollectorKind, meta_labels: &'static [&'static str]) -> World {
        let moto = Moto::start().await;
        let cloud = AwsProxy::start(&moto.endpoint).await;
        let cm = CloudMap::new(&moto.sdk_config().await);
        let backend = Backend::start().await;
        let (app_port, exporter_port) = (free_port(), free_port());
        let (app, exporter) = (app_port.to_string(), exporter_port.to_string());
        let ns = cm.dns_namespace("ecs-services").await;
        let web = cm
            .service(
                &ns,
                "webapp-svc",
                &[
                    ("METRICS_PATH", "/metrics"),
                    ("METRICS_PORT", &app),
                    ("ECS_METRICS_PATH", "/metrics"),
                    ("ECS_METRICS_PORT", &exporter),
                ],
            )
            .await;
        let fast = cm
            .service(
                &ns,
                "fast-svc",
                &[
                    ("METRICS_PATH", "/metrics"),
                    ("METRICS_PORT", &app),
                    ("METRICS_INTERVAL", "2s"),
                ],
            )
            .await;
        let mut world = World {
            kind,
            meta_labels,
            moto,
            cloud,
            backend,
            tasks: Vec::new(),
            expected: BTreeSet::new(),
            addresses: BTreeSet::new(),
            fast_ips: BTreeSet::new(),
            _apps: Vec::new(),
        };
        for i in 0..8 {
            let ip = format!("127.0.0.{}", 10 + i);
            let is_fast = i >= 6;
            let exporter = (!is_fast).then_some(exporter_port);
            world
                ._apps
                .push(SampleApp::start(&ip, app_port, exporter, 2.0).await);
            let (svc, ecs_service) = if is_fast {
                (&fast, "FastService")
            } else {
                (&web, "WebAppService")
            };
            cm.register(
                &svc.id,
                &format!("task-{i}"),
                &[
                    ("AWS_INSTANCE_IPV4", &ip),
                    ("ECS_CLUSTER_NAME", "ecs-adot-cluster"),
                    ("ECS_SERVICE_NAME", ecs_service),
                    ("ECS_TASK_DEFINITION_FAMILY", "WebAppTask"),
                    ("AVAILABILITY_ZONE", "us-east-1a"),
                ],
            )
            .await;
            world.expected.insert((ip.clone(), "app".into()));
            world.addresses.insert(format!("{ip}:{app_port}"));
            if is_fast {
                world.fast_ips.insert(ip);
            } else {
                world.expected.insert((ip.clone(), "ecs-exporter".into()));
                world.addresses.insert(format!("{ip}:{exporter_port}"));
            }
        }
        world
    }

    /// Starts task `r<i>`: a replica over 4 slots and its collector.
    async fn add_task(&mut self) -> usize {
        let i = self.tasks.len();
        let id = format!("r{i}");
        let env: Vec<(String, String)> = [
            ("DISCOVERY_NAMESPACES", "ecs-services"),
            ("HANDOFF_GRACE", &format!("{}s", GRACE.as_secs())),
            ("META_LABELS", self.meta_labels[i % self.meta_labels.len()]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let replica = start_replica(&self.moto, &self.cloud, &id, "4", &env).await;
        let collector =
            Collector::start(self.kind, &id, &replica.sd.addr, &self.backend, JOB).await;
        self.tasks.push(Some(Task { replica, collector }));
        i
    }

    fn addrs(&self) -> Vec<String> {
        self.tasks
            .iter()
            .flatten()
            .map(|t| t.replica.sd.addr.clone())
            .collect()
    }

    /// Waits until `serving` replicas' shards cover the registered targets exactly once.
    async fn settle(&self, what: &str, serving: usize) {
        wait_for(what, Duration::from_secs(40), || async {
            let shards = shards(&self.addrs()).await;
            let all: Vec<&String> = shards.values().flatten().collect();
            let union: BTreeSet<String> = all.iter().map(|t| t.to_string()).collect();
            let busy = shards.values().filter(|s| !s.is_empty()).count();
            (union == self.addresses && all.len() == self.addresses.len() && busy == serving)
                .then_some(())
        })
        .await;
    }

    /// Index of the task whose replica has `role`, holding a slot.
    async fn with_role(&self, role: &str) -> usize {
        for (i, t) in self.tasks.iter().enumerate() {
            if let Some(t) = t {
                let s = t.replica.sd.status().await;
                if s["role"] == role && s["slot"].is_u64() {
                    return i;
                }
            }
        }
        panic!("no {role} holding a slot");
    }

    /// Waits until every target has an `up == 1` sample in the backend.
    async fn wait_backend_has_all(&self) {
        wait_for("every target in the backend", Duration::from_secs(60), || async {
            let seen: BTreeSet<(String, String)> = self
                .backend
                .query("max by (instance, metrics_source) (last_over_time(up{job=\"ecs_services\"}[10s]))")
                .await
                .iter()
                .filter(|r| r["value"][1] == "1")
                .map(|r| {
                    (
                        r["metric"]["instance"].as_str().unwrap_or("").to_owned(),
                        r["metric"]["metrics_source"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            (seen == self.expected).then_some(())
        })
        .await;
    }
}

/// The `up == 1` samples of one target: (timestamp ms, collector), in time order.
type Samples = Vec<(i64, String)>;

/// What the backend holds for each target.
async fn samples(backend: &Backend) -> BTreeMap<(String, String), Samples> {
    let mut out: BTreeMap<(String, String), Samples> = BTreeMap::new();
    for (labels, values) in backend
        .export("{__name__=\"up\",job=\"ecs_services\"}")
        .await
    {
        let key = (
            labels.get("instance").cloned().unwrap_or_default(),
            labels.get("metrics_source").cloned().unwrap_or_default(),
        );
        let collector = labels.get("collector").cloned().unwrap_or_default();
        let list = out.entry(key).or_default();
        list.extend(
            values
                .into_iter()
                .filter(|(_, v)| *v == 1.0)
                .map(|(t, _)| (t, collector.clone())),
        );
    }
    for list in out.values_mut() {
        list.sort();
    }
    out
}

/// One target's record over a window: its longest time without a sample, how
/// long two collectors both scraped it, and how many collectors did.
#[derive(Debug, Default, Clone, Copy)]
struct Verdict {
    gap_ms: i64,
    duplicate_ms: i64,
    collectors: usize,
}

/// Judges `samples` of a target scraped every `interval` over [from, to]. A gap
/// that began before the window is counted whole.
fn judge(samples: &Samples, interval: Duration, from: i64, to: i64) -> Verdict {
    let interval = interval.as_millis() as i64;
    let before = samples.iter().rev().find(|(t, _)| *t < from);
    let inside: Vec<&(i64, String)> = samples
        .iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .collect();
    let mut gap_ms = 0;
    let mut last = before.map_or(from, |(t, _)| *t);
    for (t, _) in &inside {
        gap_ms = gap_ms.max(t - last);
        last = *t;
    }
    gap_ms = gap_ms.max(to - last);
    // Each collector's runs of scrapes (a break longer than two intervals ends
    // one), each scrape standing for the interval after it.
    let mut spans: Vec<(i64, i64)> = Vec::new();
    let collectors: BTreeSet<&String> = inside.iter().map(|(_, c)| c).collect();
    for c in &collectors {
        let mut run: Option<(i64, i64)> = None;
        for (t, _) in inside.iter().filter(|(_, who)| who == *c) {
            run = match run {
                Some((start, end)) if t - end <= 2 * interval => Some((start, *t)),
                Some(done) => {
                    spans.push(done);
                    Some((*t, *t))
                }
                None => Some((*t, *t)),
            };
        }
        spans.extend(run);
    }
    // Time covered by two spans or more.
    let mut edges: Vec<(i64, i32)> = spans
        .iter()
        .flat_map(|(a, b)| [(*a, 1), ((*b + interval).min(to), -1)])
        .collect();
    edges.sort();
    let (mut depth, mut since, mut duplicate_ms) = (0, 0, 0);
    for (t, step) in edges {
        if depth >= 2 {
            duplicate_ms += t - since;
        }
        depth += step;
        since = t;
    }
    Verdict {
        gap_ms,
        duplicate_ms,
        collectors: collectors.len(),
    }
}

struct Window {
    name: &'static str,
    from: i64,
    to: i64,
    bound: Bound,
}

/// Checks that each replica's body carries the `__meta_cloudmap_*` labels its
/// own `META_LABELS` asks for, whoever leads.
async fn check_meta_labels(w: &World) {
    for (i, t) in w.tasks.iter().enumerate() {
        let Some(t) = t else { continue };
        let body = common::http()
            .get(t.replica.sd.url("/prometheus-targets"))
            .send()
            .await
            .expect("request")
            .text()
            .await
            .expect("body");
        let setting = w.meta_labels[i % w.meta_labels.len()];
        let has = |name: &str| body.contains(&format!("\"{name}"));
        assert!(has("__metrics_path__"), "r{i} serves targets");
        assert_eq!(has("__meta_cloudmap_attribute_"), setting == "all", "r{i}");
        assert_eq!(
            has("__meta_cloudmap_service_name"),
            setting != "none",
            "r{i}"
        );
    }
}

async fn run(kind: CollectorKind, meta_labels: &'static [&'static str]) {
    let mut w = World::start(kind, meta_labels).await;
    let mut windows = Vec::new();
    for _ in 0..3 {
        w.add_task().await;
    }
    w.settle("three shards", 3).await;
    // Leader and followers render the labels their own setting asks for, and
    // agree on their shards whatever the settings.
    check_meta_labels(&w).await;
    w.wait_backend_has_all().await;
    // Let every collector reach its steady rhythm.
    tokio::time::sleep(2 * JOB.interval).await;
    let from = now_ms();
    tokio::time::sleep(3 * JOB.interval).await;
    windows.push(Window {
        name: "steady, 3 slots",
        from,
        to: now_ms(),
        bound: Bound::Steady,
    });

    // Scale-out 3 -> 4 slots: a fourth task takes the free slot.
    let from = now_ms();
    w.add_task().await;
    w.settle("four shards", 4).await;
    tokio::time::sleep(GRACE + JOB.refresh + COLLECTOR_BATCH + JOB.interval).await;
    windows.push(Window {
        name: "scale-out 3->4",
        from,
        to: now_ms(),
        bound: Bound::Move,
    });

    // A standby, then a rolling replacement: a follower's task stops (SIGTERM
    // to both containers) and the standby takes its slot; a new task comes up
    // as the next standby.
    let standby = w.add_task().await;
    wait_for("a standby", Duration::from_secs(20), || async {
        let s = w.tasks[standby].as_ref()?.replica.sd.status().await;
        (s["role"] == "standby").then_some(())
    })
    .await;
    let victim = w.with_role("follower").await;
    let from = now_ms();
    let mut task = w.tasks[victim].take().expect("running");
    task.replica.sd.proc.signal(libc::SIGTERM);
    task.collector.proc.signal(libc::SIGTERM);
    assert_eq!(
        task.replica.sd.proc.wait_exit(Duration::from_secs(30)),
        Some(0)
    );
    drop(task);
    w.add_task().await;
    w.settle("the standby serving the slot", 4).await;
    tokio::time::sleep(JOB.refresh + COLLECTOR_BATCH + 2 * JOB.interval).await;
    windows.push(Window {
        name: "rolling replacement",
        from,
        to: now_ms(),
        bound: Bound::Failover {
            lease_wait: HEARTBEAT,
        },
    });

    // The leader's task is killed: replica and collector, SIGKILL.
    let leader = w.with_role("leader").await;
    let from = now_ms();
    let task = w.tasks[leader].take().expect("running");
    task.replica.sd.proc.signal(libc::SIGKILL);
    task.collector.proc.signal(libc::SIGKILL);
    drop(task);
    w.settle("the standby serving the dead leader's slot", 4)
        .await;
    // The new leader, too, leaves each replica its own labels.
    check_meta_labels(&w).await;
    tokio::time::sleep(JOB.refresh + COLLECTOR_BATCH + 2 * JOB.interval).await;
    windows.push(Window {
        name: "leader SIGKILL",
        from,
        to: now_ms(),
        bound: Bound::Failover {
            lease_wait: LEASE + HEARTBEAT,
        },
    });

    let from = now_ms();
    tokio::time::sleep(3 * JOB.interval).await;
    let to = now_ms();
    windows.push(Window {
        name: "steady, 4 slots",
        from,
        to,
        bound: Bound::Steady,
    });
    // The last samples reach the backend.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let kind_name = kind.name();
    let all = samples(&w.backend).await;
    assert_eq!(
        all.keys().cloned().collect::<BTreeSet<_>>(),
        w.expected,
        "{kind_name}: the backend holds exactly the registered targets"
    );
    let interval_of = |ip: &str| {
        if w.fast_ips.contains(ip) {
            FAST_INTERVAL
        } else {
            JOB.interval
        }
    };
    let mut failures = Vec::new();
    for window in &windows {
        let mut worst = Verdict::default();
        let job = (
            window.bound.gap(JOB.interval),
            window.bound.duplicate(JOB.interval),
        );
        for ((ip, source), list) in &all {
            let interval = interval_of(ip);
            let (gap, duplicate) = (window.bound.gap(interval), window.bound.duplicate(interval));
            let v = judge(list, interval, window.from, window.to);
            let once = !matches!(window.bound, Bound::Steady) || v.collectors == 1;
            if v.gap_ms > gap.as_millis() as i64
                || v.duplicate_ms > duplicate.as_millis() as i64
                || !once
            {
                failures.push(format!(
                    "{kind_name} {}: {ip} {source} (every {interval:?}): {v:?} (bounds: gap {gap:?}, duplicates {duplicate:?})",
                    window.name
                ));
            }
            worst.gap_ms = worst.gap_ms.max(v.gap_ms);
            worst.duplicate_ms = worst.duplicate_ms.max(v.duplicate_ms);
        }
        println!(
            "MEASURE {kind_name} {}: worst sample gap {:.2} s (bound at the job's interval {:.2} s), longest duplicate {:.2} s (bound {:.2} s), over {:.1} s",
            window.name,
            worst.gap_ms as f64 / 1000.0,
            job.0.as_secs_f64(),
            worst.duplicate_ms as f64 / 1000.0,
            job.1.as_secs_f64(),
            (window.to - window.from) as f64 / 1000.0
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Per-service scrape interval: the median spacing of one collector's
    // samples in the last steady window, per target.
    let last = windows.last().expect("windows");
    for ((ip, source), list) in &all {
        let times: Vec<i64> = list
            .iter()
            .filter(|(t, _)| *t >= last.from && *t <= last.to)
            .map(|(t, _)| *t)
            .collect();
        let mut steps: Vec<i64> = times.windows(2).map(|p| p[1] - p[0]).collect();
        steps.sort();
        let median = steps.get(steps.len() / 2).copied().unwrap_or(0);
        let expected = interval_of(ip).as_millis() as i64;
        assert!(
            (median - expected).abs() <= expected / 10,
            "{kind_name}: {ip} {source} scraped every {median} ms, not {expected} ms ({steps:?})"
        );
    }
    let fast_steps: Vec<String> = w.fast_ips.iter().cloned().collect();
    println!(
        "MEASURE {kind_name} per-service interval: METRICS_INTERVAL=2s targets ({}) scraped every ~2 s, others every {} s",
        fast_steps.join(", "),
        JOB.interval.as_secs()
    );

    // Exactly one collector per target, as the backend answers queries: the
    // series scraped within the last two job intervals (a killed collector's
    // series end without a staleness marker).
    let per_target = w
        .backend
        .query("count by (instance, metrics_source) (last_over_time(up{job=\"ecs_services\"}[8s]) == 1)")
        .await;
    assert_eq!(per_target.len(), w.expected.len(), "{per_target:?}");
    for r in &per_target {
        assert_eq!(
            r["value"][1], "1",
            "{kind_name}: more than one collector: {r}"
        );
    }

    // The post's dashboard queries answer from the backend.
    for (panel, promql) in [
        ("request rate", "sum(rate(http_requests_total[30s]))"),
        (
            "average latency",
            "sum(rate(request_duration_milliseconds_sum[30s])) / sum(rate(request_duration_milliseconds_count[30s]))",
        ),
        (
            "latency histogram share",
            "sum(rate(request_duration_milliseconds_bucket{le=\"500\"}[30s])) / sum(rate(request_duration_milliseconds_count[30s]))",
        ),
        ("CPU per container", "ecs_cpu_percent{container=\"webapp\"}"),
    ] {
        let got = wait_for(panel, Duration::from_secs(30), || async {
            let r = w.backend.query(promql).await;
            let v = r.first()?["value"][1].as_str()?.parse::<f64>().ok()?;
            v.is_finite().then_some((r.len(), v))
        })
        .await;
        println!(
            "MEASURE {kind_name} backend {panel}: {promql} = {:.3} ({} series)",
            got.1, got.0
        );
    }
    println!(
        "MEASURE versions: {kind_name} {}, victoria-metrics {}",
        kind.version(),
        w.backend.version()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vmagent_collectors_write_every_target_exactly_once() {
    run(CollectorKind::Vmagent, &["basic", "none"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_agent_collectors_write_every_target_exactly_once() {
    run(CollectorKind::PrometheusAgent, &["all"]).await;
}
