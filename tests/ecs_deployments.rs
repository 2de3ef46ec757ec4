//! Cloud Map as ECS fills it, through the real binary: services ECS Service
//! Connect owns (no custom tags) configured by discovery rules from SSM, and
//! bridge-mode tasks whose container ports are reached through host ports that
//! only ECS `DescribeTasks` tells.
//!
//! Cloud Map and SSM are moto. ECS `DescribeTasks` is `synthetic-aws`
//! (`AWS_ENDPOINT_URL_ECS`): moto's reports no `networkBindings` at all, models
//! only a task's first container and lists no unknown task as a failure.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cloudmap::CloudMap;
use common::{
    aws_env_with, free_port, wait_for, Moto, Prometheus, SampleApp, ShardSd, SyntheticAws,
};
use serde_json::Value;

const RULES: &str = "/shard-sd/discovery-rules";

async fn put_rules(cm: &CloudMap, value: &str) {
    cm.put_string_parameter(RULES, value).await;
}

/// Each target as (address, labels).
fn targets(groups: &[Value]) -> BTreeMap<String, BTreeMap<String, String>> {
    groups
        .iter()
        .flat_map(|g| {
            let labels = common::string_map(&g["labels"]);
            g["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |t| (t.as_str().unwrap_or_default().to_owned(), labels.clone()))
        })
        .collect()
}

/// Registers a task as ECS registers one in a Service Connect or awsvpc service.
async fn register(cm: &CloudMap, service_id: &str, task: &str, ip: &str, port: &str) {
    cm.register(
        service_id,
        task,
        &[
            ("AWS_INSTANCE_IPV4", ip),
            ("AWS_INSTANCE_PORT", port),
            ("ECS_CLUSTER_NAME", "apps"),
            ("ECS_SERVICE_NAME", "orders"),
            ("ECS_TASK_DEFINITION_FAMILY", "orders"),
        ],
    )
    .await;
}

fn label<'a>(t: &'a BTreeMap<String, BTreeMap<String, String>>, addr: &str, name: &str) -> &'a str {
    t.get(addr)
        .unwrap_or_else(|| panic!("no target {addr} in {t:#?}"))
        .get(name)
        .map_or("", String::as_str)
}

/// The ECS calls of each of the next `cycles` discovery cycles.
async fn ecs_requests_of_cycles(sd: &ShardSd, cycles: usize) -> Vec<u64> {
    let cycle = |s: &Value| s["last_discovery"]["time"].as_str().map(str::to_owned);
    let mut seen = cycle(&sd.status().await);
    let mut calls = Vec::new();
    while calls.len() < cycles {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let status = sd.status().await;
        if cycle(&status) != seen {
            seen = cycle(&status);
            calls.push(
                status["last_discovery"]["ecs_requests"]
                    .as_u64()
                    .expect("ecs_requests"),
            );
        }
    }
    calls
}

/// Waits until a cycle's errors name `call`, then checks that nothing is
/// served yet a second later (503: a collector keeps its previous list).
async fn no_first_list_while_failing(sd: &ShardSd, call: &str) {
    wait_for(
        &format!("a failed {call}"),
        Duration::from_secs(10),
        || async {
            let status = sd.status().await;
            status["last_discovery"]["errors"]
                .to_string()
                .contains(call)
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resp = common::http()
        .get(sd.url("/prometheus-targets"))
        .send()
        .await
        .expect("GET");
    assert_eq!(resp.status(), 503, "no first list while {call} fails");
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_rules_configure_tagless_services_and_tags_win() {
    let moto = Moto::start().await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    let ns = cm.http_namespace("ecs-services").await;
    // As Service Connect creates it: only its own tag.
    let managed = cm
        .service(&ns, "orders-api", &[("AmazonECSManaged", "true")])
        .await;
    register(&cm, &managed.id, "task-a", "10.1.0.1", "8080").await;
    register(&cm, &managed.id, "task-b", "10.1.0.2", "8080").await;
    // Tagged: its tags win over the rule where both set something.
    let tagged = cm
        .service(
            &ns,
            "orders-web",
            &[("METRICS_PORT", "7000"), ("METRICS_PATH", "/custom")],
        )
        .await;
    register(&cm, &tagged.id, "task-c", "10.1.0.3", "8080").await;
    // Matched by no rule and untagged: not a target.
    let other = cm
        .service(&ns, "payments", &[("AmazonECSManaged", "true")])
        .await;
    register(&cm, &other.id, "task-d", "10.1.0.4", "8080").await;

    // The parameter holds no valid JSON when shard-sd starts: no rules, no crash.
    put_rules(&cm, "[{\"service\": \"orders-*\",").await;
    let env = aws_env_with(
        &moto.endpoint,
        &[
            ("DISCOVERY_NAMESPACES", "ecs-services"),
            ("DISCOVERY_RULES_PARAMETER_NAME", RULES),
            ("CONFIG_RELOAD_FREQUENCY", "300ms"),
        ],
    );
    let sd = ShardSd::start("rules", &env).await;
    let groups = sd
        .wait_targets("tags alone", Duration::from_secs(15), |t| !t.is_empty())
        .await;
    let t = targets(&groups);
    assert_eq!(t.keys().collect::<Vec<_>>(), ["10.1.0.3:7000"]);
    let status = sd.status().await;
    assert_eq!(status["rules"]["rules"], 0, "{status:#}");
    let error = status["rules"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("not valid JSON") && error.contains(RULES),
        "{error}"
    );

    // The issue's rule: the managed service gets its port, path and settings.
    put_rules(
        &cm,
        r#"[{"namespace": "ecs-services", "service": "orders-*", "metrics_port": 9100,
             "metrics_path": "/metrics", "ecs_metrics_port": 9779, "ecs_metrics_path": "/metrics",
             "interval": "15s", "timeout": "5s", "scheme": "http"}]"#,
    )
    .await;
    let groups = sd
        .wait_targets("rule applied", Duration::from_secs(15), |t| t.len() == 6)
        .await;
    let t = targets(&groups);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        [
            "10.1.0.1:9100",
            "10.1.0.1:9779",
            "10.1.0.2:9100",
            "10.1.0.2:9779",
            "10.1.0.3:7000",
            "10.1.0.3:9779",
        ]
    );
    for addr in ["10.1.0.1:9100", "10.1.0.2:9779"] {
        assert_eq!(label(&t, addr, "__metrics_path__"), "/metrics");
        assert_eq!(label(&t, addr, "__scrape_interval__"), "15s");
        assert_eq!(label(&t, addr, "__scrape_timeout__"), "5s");
        assert_eq!(label(&t, addr, "__scheme__"), "http");
        assert_eq!(label(&t, addr, "service"), "orders");
    }
    // The tags' port and path, the rule's interval where the tags are silent.
    assert_eq!(label(&t, "10.1.0.3:7000", "__metrics_path__"), "/custom");
    assert_eq!(label(&t, "10.1.0.3:7000", "__scrape_interval__"), "15s");
    let status = sd.status().await;
    assert_eq!(status["rules"]["rules"], 1);
    assert!(status["rules"].get("error").is_none(), "{status:#}");
    let before = sd.targets().await.expect("targets");

    // A bad rule: reported once with its index and field; the last good rules stay.
    put_rules(
        &cm,
        r#"[{"service": "orders-*", "metrics_port": 9100}, {"service": "x", "metrics_port": 70000}]"#,
    )
    .await;
    let status = wait_for("the bad rule reported", Duration::from_secs(10), || async {
        let status = sd.status().await;
        status["rules"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("rules[1].metrics_port = 70000 is not a port"))
            .then_some(status)
    })
    .await;
    assert_eq!(status["rules"]["rules"], 1, "the last good rule is kept");
    let metrics = sd.metrics().await;
    for line in [
        "shard_sd_discovery_rules 1",
        "shard_sd_discovery_rules_refused 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    // Several cycles later: still the same list, and one WARN line for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sd.targets().await.expect("targets"), before);
    let warned = sd
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("rules[1].metrics_port") && l.contains("WARN"))
        .count();
    assert_eq!(warned, 1, "reported once");

    // An unknown field, then a good change: the new rules apply.
    put_rules(&cm, r#"[{"service": "orders-*", "metrics_prot": 9200}]"#).await;
    wait_for(
        "the unknown field reported",
        Duration::from_secs(10),
        || async {
            let status = sd.status().await;
            status["rules"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("rules[0] has unknown field \"metrics_prot\""))
                .then_some(())
        },
    )
    .await;
    assert_eq!(sd.targets().await.expect("targets"), before);
    put_rules(&cm, r#"[{"service": "orders-api", "metrics_port": 9200}]"#).await;
    let groups = sd
        // Most targets change at once: the drop guard serves old and new
        // together until the change is confirmed, then the new ones alone.
        .wait_targets("new rule applied", Duration::from_secs(15), |t| {
            !targets(t).contains_key("10.1.0.1:9100")
        })
        .await;
    let t = targets(&groups);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["10.1.0.1:9200", "10.1.0.2:9200", "10.1.0.3:7000"],
        "the rule no longer matches orders-web, whose tags alone remain"
    );
    assert_eq!(label(&t, "10.1.0.1:9200", "__metrics_path__"), "/metrics");
    assert!(sd.status().await["rules"].get("error").is_none());
    let log = sd.proc.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_first_list_before_the_rules_are_read() {
    let moto = Moto::start().await;
    let proxy = common::proxy::AwsProxy::start(&moto.endpoint).await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    let ns = cm.http_namespace("ecs-services").await;
    let managed = cm
        .service(&ns, "orders-api", &[("AmazonECSManaged", "true")])
        .await;
    register(&cm, &managed.id, "task-a", "10.1.0.1", "8080").await;
    put_rules(&cm, r#"[{"service": "orders-*", "metrics_port": 9100}]"#).await;
    // The namespaces are static: the rules are the only SSM read.
    proxy.set_fault(common::proxy::Fault::Fail {
        op: Some("GetParameter".into()),
    });
    let env = aws_env_with(
        &proxy.endpoint,
        &[
            ("DISCOVERY_NAMESPACES", "ecs-services"),
            ("DISCOVERY_RULES_PARAMETER_NAME", RULES),
            ("CONFIG_RELOAD_FREQUENCY", "300ms"),
            ("AWS_MAX_ATTEMPTS", "1"),
        ],
    );
    let sd = ShardSd::start("rules-unread", &env).await;
    no_first_list_while_failing(&sd, "ssm:GetParameter").await;
    proxy.set_fault(common::proxy::Fault::None);
    let groups = sd
        .wait_targets("the rules read", Duration::from_secs(10), |t| !t.is_empty())
        .await;
    assert_eq!(
        targets(&groups).keys().collect::<Vec<_>>(),
        ["10.1.0.1:9100"]
    );
}

/// A bridge-mode task with the app container's port 3000 and the exporter's
/// 9779 bound to host ports (or not bound).
fn bridge_task(id: &str, cluster: &str, app: Option<u16>, exporter: Option<u16>) -> Value {
    common::bridge_task(
        id,
        cluster,
        &[("app", 3000, app), ("exporter", 9779, exporter)],
    )
}

/// Registers a bridge-mode task as ECS does: its host's address, and the host
/// port of its registered container port.
async fn register_bridge(
    cm: &CloudMap,
    (service_id, ecs_service): (&str, &str),
    task: &str,
    host: &str,
    port: u16,
) {
    cm.register(
        service_id,
        task,
        &[
            ("AWS_INSTANCE_IPV4", host),
            ("AWS_INSTANCE_PORT", &port.to_string()),
            ("EC2_INSTANCE_ID", &format!("i-{}", host.replace('.', ""))),
            ("ECS_CLUSTER_NAME", "bridge-cluster"),
            ("ECS_SERVICE_NAME", ecs_service),
            ("ECS_TASK_DEFINITION_FAMILY", ecs_service),
        ],
    )
    .await;
}

/// A service in awsvpc mode (the default) with one task at 10.8.0.1:3000.
async fn awsvpc_service(cm: &CloudMap, ns: &str) -> common::cloudmap::Service {
    let svc = cm
        .service(
            ns,
            "awsvpc",
            &[("METRICS_PATH", "/metrics"), ("METRICS_PORT", "3000")],
        )
        .await;
    cm.register_task(&svc.id, "task-awsvpc-1", "10.8.0.1").await;
    svc
}

#[tokio::test(flavor = "multi_thread")]
async fn bridge_mode_tasks_are_served_and_scraped_at_their_host_ports() {
    let moto = Moto::start().await;
    let ecs = SyntheticAws::start(&["--namespaces", "0"]).await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    let ns = cm.dns_namespace("ecs-services").await;
    let bridge_tags = [
        ("METRICS_PATH", "/metrics"),
        ("METRICS_PORT", "3000"),
        ("ECS_METRICS_PATH", "/metrics"),
        ("ECS_METRICS_PORT", "9779"),
        ("NETWORK_MODE", "bridge"),
    ];
    let legacy = cm.service(&ns, "legacy", &bridge_tags).await;

    // Three tasks on two hosts, each with real listeners at its host ports.
    let hosts = ["127.0.0.21", "127.0.0.21", "127.0.0.22"];
    let mut apps = Vec::new();
    let mut tasks = Vec::new();
    let mut want = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let (app, exporter) = (free_port(), free_port());
        apps.push(SampleApp::start(host, app, Some(exporter), 0.0).await);
        let id = format!("{i:032x}");
        register_bridge(&cm, (&legacy.id, "legacy"), &id, host, app).await;
        tasks.push(bridge_task(
            &id,
            "bridge-cluster",
            Some(app),
            Some(exporter),
        ));
        want.push(format!("{host}:{app}"));
        want.push(format!("{host}:{exporter}"));
    }
    // A fourth task whose exporter port has no binding: its app is served,
    // its exporter skipped and reported, never guessed.
    let unbound = format!("{:032x}", 3);
    let unbound_app = free_port();
    apps.push(SampleApp::start("127.0.0.22", unbound_app, None, 0.0).await);
    register_bridge(
        &cm,
        (&legacy.id, "legacy"),
        &unbound,
        "127.0.0.22",
        unbound_app,
    )
    .await;
    tasks.push(bridge_task(
        &unbound,
        "bridge-cluster",
        Some(unbound_app),
        None,
    ));
    want.push(format!("127.0.0.22:{unbound_app}"));
    // 150 more tasks in another bridge service: the first discovery asks about
    // all 154 tasks together, in two calls of at most 100.
    let big = cm.service(&ns, "big-bridge", &bridge_tags).await;
    for k in 0..150u16 {
        let id = format!("b{k:031x}");
        register_bridge(&cm, (&big.id, "big"), &id, "10.9.0.1", 40000 + k).await;
        tasks.push(bridge_task(
            &id,
            "bridge-cluster",
            Some(40000 + k),
            Some(50000 + k),
        ));
    }
    // An awsvpc service: no ECS call at all.
    awsvpc_service(&cm, &ns).await;
    ecs.add_tasks(&tasks).await;

    let env = aws_env_with(
        &moto.endpoint,
        &[
            ("DISCOVERY_NAMESPACES", "ecs-services"),
            ("AWS_ENDPOINT_URL_ECS", &ecs.endpoint),
            ("CONFIG_RELOAD_FREQUENCY", "500ms"),
        ],
    );
    let sd = ShardSd::start("bridge", &env).await;
    let total = want.len() + 300 + 1;
    let groups = sd
        .wait_targets("bridge targets", Duration::from_secs(20), |t| {
            t.len() == total
        })
        .await;
    let t = targets(&groups);
    for addr in &want {
        assert!(t.contains_key(addr), "{addr} not served: {:#?}", t.keys());
    }
    assert!(t.contains_key("10.9.0.1:40149") && t.contains_key("10.9.0.1:50149"));
    assert!(t.contains_key("10.8.0.1:3000"), "awsvpc as before");
    // No container port is ever served on a bridge host.
    assert!(!t
        .keys()
        .any(|a| a.ends_with(":9779") || (a.ends_with(":3000") && !a.starts_with("10.8."))));
    let status = sd.status().await;
    let problems = status["problems"].to_string();
    assert!(
        problems.contains(&format!("task \\\"{unbound}\\\": container port 9779 (ECS_METRICS_PORT) has no TCP host port binding")),
        "{problems}"
    );

    // ECS calls: two (100 + 54) for the 154 tasks of both bridge services,
    // none for awsvpc; then none while the tasks stay.
    let first = ecs.requests("DescribeTasks").await;
    assert_eq!(first, 2, "first cycle");
    let steady = ecs_requests_of_cycles(&sd, 5).await;
    assert_eq!(steady, [0; 5], "steady state: no ECS call per cycle");
    assert_eq!(ecs.requests("DescribeTasks").await, 2);

    // A new task: one call, for it alone; a task gone: none.
    let (app, exporter) = (free_port(), free_port());
    apps.push(SampleApp::start("127.0.0.23", app, Some(exporter), 0.0).await);
    let new_id = format!("{:032x}", 4);
    ecs.add_tasks(&[bridge_task(
        &new_id,
        "bridge-cluster",
        Some(app),
        Some(exporter),
    )])
    .await;
    register_bridge(&cm, (&legacy.id, "legacy"), &new_id, "127.0.0.23", app).await;
    sd.wait_targets("the new task", Duration::from_secs(15), |t| {
        targets(t).contains_key(&format!("127.0.0.23:{exporter}"))
    })
    .await;
    assert_eq!(ecs.requests("DescribeTasks").await, 3);
    cm.deregister(&big.id, &format!("b{:031x}", 0)).await;
    sd.wait_targets("a task gone", Duration::from_secs(15), |t| {
        !targets(t).contains_key("10.9.0.1:40000")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        ecs.requests("DescribeTasks").await,
        3,
        "a task gone costs no call"
    );
    let metrics = sd.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shard_sd_aws_requests_total")
                && l.contains("operation=\"DescribeTasks\"")
                && l.ends_with(" 3")),
        "{metrics}"
    );

    // A real Prometheus reaches every bridge-mode target at its host port.
    let prometheus = Prometheus::start(&format!(
        "global: {{scrape_interval: 1s, scrape_timeout: 800ms}}\n\
         scrape_configs:\n\
         - job_name: ecs\n  \
           http_sd_configs: [{{url: '{}', refresh_interval: 2s}}]\n  \
           relabel_configs:\n  \
           - {{source_labels: [service], regex: legacy, action: keep}}\n",
        sd.url("/prometheus-targets")
    ))
    .await;
    let expected = want.len() + 2;
    let up = wait_for(
        "every bridge target up",
        Duration::from_secs(60),
        || async {
            let active = prometheus.active_targets().await;
            let up: Vec<String> = active
                .iter()
                .filter(|t| t["health"] == "up")
                .filter_map(|t| t["scrapeUrl"].as_str().map(str::to_owned))
                .collect();
            (up.len() == expected).then_some(up)
        },
    )
    .await;
    for addr in &want {
        let url = format!("http://{addr}/metrics");
        assert!(up.contains(&url), "{addr} not up in Prometheus: {up:?}");
    }
    drop(apps);
}

#[tokio::test(flavor = "multi_thread")]
async fn ecs_faults_never_cost_a_served_target() {
    let moto = Moto::start().await;
    let ecs = SyntheticAws::start(&["--namespaces", "0"]).await;
    let proxy = common::proxy::AwsProxy::start(&ecs.endpoint).await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    let ns = cm.dns_namespace("ecs-services").await;
    let legacy = cm
        .service(
            &ns,
            "legacy",
            &[
                ("METRICS_PATH", "/metrics"),
                ("METRICS_PORT", "3000"),
                ("NETWORK_MODE", "bridge"),
            ],
        )
        .await;
    let awsvpc = awsvpc_service(&cm, &ns).await;
    let task = |k: u16| format!("{k:032x}");
    for k in 0..3u16 {
        register_bridge(&cm, (&legacy.id, "legacy"), &task(k), "10.7.0.1", 32768 + k).await;
        ecs.add_tasks(&[bridge_task(
            &task(k),
            "bridge-cluster",
            Some(33000 + k),
            None,
        )])
        .await;
    }
    let env = aws_env_with(
        &moto.endpoint,
        &[
            ("DISCOVERY_NAMESPACES", "ecs-services"),
            ("AWS_ENDPOINT_URL_ECS", &proxy.endpoint),
            ("CONFIG_RELOAD_FREQUENCY", "300ms"),
            ("AWS_MAX_ATTEMPTS", "1"),
        ],
    );

    // ECS failing when shard-sd starts: nothing is published without the
    // bridge targets (503: a collector keeps its previous list).
    proxy.set_fault(common::proxy::Fault::Fail {
        op: Some("DescribeTasks".into()),
    });
    let sd = ShardSd::start("ecs-faults", &env).await;
    no_first_list_while_failing(&sd, "ecs:DescribeTasks").await;

    proxy.set_fault(common::proxy::Fault::None);
    let groups = sd
        .wait_targets("ECS back", Duration::from_secs(10), |t| t.len() == 4)
        .await;
    assert!(targets(&groups).contains_key("10.7.0.1:33002"));

    // ECS failing again: known tasks keep their targets; a new task waits for
    // its ports, and the other services' changes are still published.
    proxy.set_fault(common::proxy::Fault::Fail {
        op: Some("DescribeTasks".into()),
    });
    register_bridge(&cm, (&legacy.id, "legacy"), &task(3), "10.7.0.1", 32771).await;
    ecs.add_tasks(&[bridge_task(&task(3), "bridge-cluster", Some(33003), None)])
        .await;
    cm.register_task(&awsvpc.id, "task-awsvpc-2", "10.8.0.2")
        .await;
    let groups = sd
        .wait_targets("the awsvpc change", Duration::from_secs(10), |t| {
            t.len() == 5
        })
        .await;
    let t = targets(&groups);
    assert!(t.contains_key("10.8.0.2:3000"));
    for k in 0..3 {
        assert!(
            t.contains_key(&format!("10.7.0.1:{}", 33000 + k)),
            "{k} kept"
        );
    }
    // The service keeps its last good targets until its new task is mapped;
    // each cycle names the failing call.
    assert!(!t.contains_key("10.7.0.1:33003"));
    wait_for(
        "the failing call reported",
        Duration::from_secs(10),
        || async {
            let status = sd.status().await;
            let errors = status["last_discovery"]["errors"].to_string();
            errors.contains("ecs:DescribeTasks").then_some(())
        },
    )
    .await;
    let t = targets(&sd.targets().await.expect("targets"));
    assert_eq!(t.len(), 5, "{t:?}");
    proxy.set_fault(common::proxy::Fault::None);
    sd.wait_targets("the new task mapped", Duration::from_secs(10), |t| {
        t.len() == 6
    })
    .await;

    // Access denied: a fault that stays. A fresh replica publishes without the
    // bridge targets it cannot map, and says which permission is missing.
    drop(sd);
    proxy.set_fault(common::proxy::Fault::Error {
        op: Some("DescribeTasks".into()),
        code: "AccessDeniedException".into(),
    });
    let sd = ShardSd::start("ecs-denied", &env).await;
    let groups = sd
        .wait_targets(
            "published without bridge targets",
            Duration::from_secs(10),
            |t| t.len() == 2,
        )
        .await;
    assert!(targets(&groups).keys().all(|a| a.starts_with("10.8.0.")));
    let problems = sd.status().await["problems"].to_string();
    assert!(
        problems.contains("4 tasks") && problems.contains("grant IAM action ecs:DescribeTasks"),
        "{problems}"
    );
}

/// ECS calls per cycle at size, all of AWS from `synthetic-aws`: 40 services of
/// 250 tasks, every fourth in bridge mode (2,500 bridge-mode tasks).
#[tokio::test(flavor = "multi_thread")]
async fn ecs_calls_per_cycle_at_scale() {
    let aws = SyntheticAws::start(&[
        "--services",
        "40",
        "--instances",
        "250",
        "--bridge-every",
        "4",
        "--ecs-rps",
        "1000",
    ])
    .await;
    let env = aws_env_with(&aws.endpoint, &[("CONFIG_RELOAD_FREQUENCY", "1s")]);
    let sd = ShardSd::start("ecs-scale", &env).await;
    let stats = aws.stats().await;
    let want = stats["targets"].as_u64().expect("targets") as usize;
    assert_eq!(stats["bridge_tasks"], 2500);
    let groups = sd
        .wait_targets("every target", Duration::from_secs(60), |t| t.len() == want)
        .await;
    // Every bridge-mode task is served at its host's address (172.16.x.y).
    let bridge_tasks: std::collections::BTreeSet<String> = targets(&groups)
        .iter()
        .filter(|(addr, _)| addr.starts_with("172.16."))
        .map(|(_, labels)| labels["taskid"].clone())
        .collect();
    assert_eq!(
        bridge_tasks.len(),
        2500,
        "bridge-mode tasks at host addresses"
    );
    let first = aws.requests("DescribeTasks").await;
    // 2,500 tasks of ten services in one cluster: 25 calls of 100.
    assert_eq!(first, 25, "first discovery");

    // Steady state: cycles without a call.
    let steady = ecs_requests_of_cycles(&sd, 5).await;
    assert_eq!(steady, [0; 5]);
    assert_eq!(aws.requests("DescribeTasks").await, first);

    // Churn: 200 registrations and deregistrations at random services. Only new
    // bridge-mode tasks cost a call: at most one per bridge-mode service and cycle.
    let changed: usize = common::http()
        .post(aws.url("/synthetic/churn?count=200"))
        .send()
        .await
        .expect("churn")
        .text()
        .await
        .expect("text")
        .parse()
        .expect("count");
    let churn_cycles = ecs_requests_of_cycles(&sd, 3).await;
    let churn_calls = aws.requests("DescribeTasks").await - first;
    assert!(churn_cycles.iter().all(|c| *c <= 10), "{churn_cycles:?}");
    assert_eq!(
        churn_cycles.iter().sum::<u64>(),
        churn_calls,
        "every call in these cycles"
    );
    assert!(churn_calls >= 1, "new bridge-mode tasks were asked about");
    let after = aws.stats().await["targets"].as_u64().expect("targets") as usize;
    sd.wait_targets("the churn", Duration::from_secs(60), |t| t.len() == after)
        .await;
    println!(
        "ecs calls: first discovery {first} for 2,500 bridge-mode tasks in 10 services; \
         steady cycles {steady:?}; churn of {changed} targets: {churn_calls} in cycles {churn_cycles:?}"
    );
}

/// A replica elected while the rules parameter is refused keeps the last good
/// rules it read as a follower, so the services they configure stay served.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_leader_keeps_the_last_good_rules() {
    let mut c = common::cluster::Cluster::start("2", 0, 4).await;
    let ns = c.cm.http_namespace("connect").await;
    let managed =
        c.cm.service(&ns, "orders-api", &[("AmazonECSManaged", "true")])
            .await;
    for (task, ip) in [("task-a", "10.1.0.1"), ("task-b", "10.1.0.2")] {
        register(&c.cm, &managed.id, task, ip, "8080").await;
        c.expected.insert(format!("{ip}:9100"));
    }
    put_rules(&c.cm, r#"[{"service": "orders-*", "metrics_port": 9100}]"#).await;
    c.extra_env = vec![
        ("DISCOVERY_NAMESPACES".into(), "ecs-services,connect".into()),
        ("DISCOVERY_RULES_PARAMETER_NAME".into(), RULES.into()),
    ];
    c.add_replica().await;
    c.add_replica().await;
    c.settle("rule targets served", 2).await;

    // Refused: the leader keeps its rules; the follower has read them too.
    put_rules(&c.cm, r#"[{"service": "orders-*", "metrics_prot": 9100}]"#).await;
    wait_for(
        "every replica saw the refusal",
        Duration::from_secs(10),
        || async {
            let logs: Vec<String> = c.alive().iter().map(|r| r.sd.proc.log_text()).collect();
            logs.iter()
                .all(|l| l.contains("unknown field \\\"metrics_prot\\\""))
                .then_some(())
        },
    )
    .await;
    let (li, _) = c.leader().await;
    c.replica(li).sd.proc.signal(libc::SIGKILL);
    c.replicas[li] = None;
    let status = wait_for("a new leader's cycles", Duration::from_secs(15), || async {
        let s = c.alive()[0].sd.status().await;
        (s["role"] == "leader" && s["last_discovery"]["outcome"] == "ok").then_some(s)
    })
    .await;
    assert_eq!(
        status["rules"]["rules"], 1,
        "the last good rule: {status:#}"
    );
    assert!(status["rules"]["error"]
        .as_str()
        .is_some_and(|e| e.contains("metrics_prot")));
    c.settle("every target on the survivor", 1).await;
}
