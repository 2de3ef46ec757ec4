//! Discovery against moto through the real AWS SDK, with the AWS-behaviour proxy
//! in front (paging, result caps, request counts, injected faults).

mod common;

use std::time::{Duration, Instant};

use common::cloudmap::{CloudMap, POST_TAGS};
use common::proxy::{AwsProxy, Fault};
use common::Moto;
use shard_sd::discovery::namespaces::NamespaceSource;
use shard_sd::discovery::HealthStatus;
use shard_sd::discovery::{
    CycleReport, Discoverer, DiscoveryOptions, FULL_REFRESH_CYCLES, TAG_REFRESH_CYCLES,
};

struct Env {
    // Kept alive for the test.
    _moto: Moto,
    proxy: AwsProxy,
    cm: CloudMap,
}

async fn env_with_page_size(page_size: usize) -> Env {
    let moto = Moto::start().await;
    let proxy = AwsProxy::with_page_size(&moto.endpoint, page_size).await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    Env {
        _moto: moto,
        proxy,
        cm,
    }
}

async fn env() -> Env {
    env_with_page_size(100).await
}

impl Env {
    async fn discoverer(&self, source: NamespaceSource, health: HealthStatus) -> Discoverer {
        let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(common::REGION))
            .endpoint_url(&self.proxy.endpoint)
            .credentials_provider(aws_credential_types::Credentials::from_keys(
                "test", "test", None,
            ))
            .retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(5)
                    .with_initial_backoff(Duration::from_millis(20)),
            )
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_secs(2))
                    .build(),
            )
            .load()
            .await;
        let aws = shard_sd::aws::clients_from(&sdk).expect("clients");
        Discoverer::new(
            aws,
            DiscoveryOptions {
                spread: true,
                rules: None,
                source,
                health,
                concurrency: 8,
                interval: std::time::Duration::ZERO,
            },
        )
    }
}

fn names(list: &[&str]) -> NamespaceSource {
    NamespaceSource::Static(list.iter().map(|s| s.to_string()).collect())
}

fn addrs(d: &mut Discoverer) -> Vec<String> {
    let mut a: Vec<String> = d
        .targets()
        .targets
        .iter()
        .map(|t| t.address.to_string())
        .collect();
    a.sort();
    a
}

async fn clean_cycle(d: &mut Discoverer) -> CycleReport {
    let report = d.run_cycle().await;
    assert!(
        report.errors.is_empty(),
        "unexpected errors: {:?}",
        report.errors
    );
    assert!(report.complete);
    report
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_through_more_than_100_services_and_instances() {
    let e = env().await;
    let ns = e.cm.http_namespace("big").await;
    for i in 0..120 {
        let svc =
            e.cm.service(&ns, &format!("svc-{i:03}"), &[("METRICS_PATH", "/metrics")])
                .await;
        e.cm.register_task(
            &svc.id,
            &format!("t{i}"),
            &format!("10.1.{}.{}", i / 250, i % 250 + 1),
        )
        .await;
    }
    let wide =
        e.cm.service(
            &ns,
            "wide",
            &[("METRICS_PATH", "/metrics"), ("METRICS_PORT", "8080")],
        )
        .await;
    for i in 0..150 {
        e.cm.register_task(&wide.id, &format!("w{i}"), &format!("10.2.0.{}", i + 1))
            .await;
    }
    let mut d = e
        .discoverer(names(&["big"]), HealthStatus::HealthyOrElseAll)
        .await;
    e.proxy.reset_counts();
    let report = clean_cycle(&mut d).await;
    let counts = e.proxy.counts();
    assert_eq!(
        counts["ListServices"], 2,
        "121 services need two pages of 100: {counts:?}"
    );
    assert_eq!(report.namespaces[0].services, 121);
    assert_eq!(report.namespaces[0].instances, 270);
    let targets = d.targets().targets.clone();
    assert_eq!(targets.len(), 270);
    // All 150 instances of the wide service: DiscoverInstances was asked for more than its default 100.
    assert_eq!(
        targets.iter().filter(|t| &*t.service == "wide").count(),
        150
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn several_namespaces_of_every_type_and_a_missing_one() {
    // Page size 2 makes ListNamespaces page too.
    let e = env_with_page_size(2).await;
    let http_ns = e.cm.http_namespace("ecs-services").await;
    let dns_ns = e.cm.dns_namespace("internal.local").await;
    let other_ns = e.cm.http_namespace("not-configured").await;
    let a = e.cm.service(&http_ns, "webapp-svc", POST_TAGS).await;
    e.cm.register_task(&a.id, "task-a", "10.0.0.1").await;
    let b =
        e.cm.service(
            &dns_ns,
            "api-svc",
            &[("METRICS_PATH", "/m"), ("METRICS_PORT", "8080")],
        )
        .await;
    e.cm.register_task(&b.id, "task-b", "10.0.0.2").await;
    let c = e.cm.service(&other_ns, "hidden", POST_TAGS).await;
    e.cm.register_task(&c.id, "task-c", "10.0.0.3").await;

    let mut d = e
        .discoverer(
            names(&["ecs-services", "internal.local", "nope"]),
            HealthStatus::All,
        )
        .await;
    let report = clean_cycle(&mut d).await;
    assert_eq!(
        addrs(&mut d),
        ["10.0.0.1:3000", "10.0.0.1:9779", "10.0.0.2:8080"]
    );
    let found: Vec<(String, bool)> = report
        .namespaces
        .iter()
        .map(|n| (n.name.clone(), n.found))
        .collect();
    assert_eq!(
        found,
        [
            ("ecs-services".into(), true),
            ("internal.local".into(), true),
            ("nope".into(), false)
        ]
    );
    assert_eq!(report.namespaces[1].kind.as_deref(), Some("DNS_PRIVATE"));
    assert_eq!(d.missing_namespaces().collect::<Vec<_>>(), ["nope"]);
    let t = d.targets().targets.clone();
    assert!(t
        .iter()
        .all(|t| t.label("namespace") == Some(&*t.namespace)));
    assert!(
        e.proxy.counts()["ListNamespaces"] >= 2,
        "namespaces were paged"
    );

    // Service namespaces are confirmed once, then cached.
    e.proxy.reset_counts();
    clean_cycle(&mut d).await;
    assert_eq!(e.proxy.counts().get("GetService"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn unchanged_services_cost_one_revision_call_and_changes_are_read() {
    let e = env().await;
    let ns = e.cm.http_namespace("ecs-services").await;
    let a = e.cm.service(&ns, "a", POST_TAGS).await;
    let b = e.cm.service(&ns, "b", POST_TAGS).await;
    e.cm.register_task(&a.id, "a1", "10.0.0.1").await;
    e.cm.register_task(&b.id, "b1", "10.0.0.2").await;
    let mut d = e
        .discoverer(names(&["ecs-services"]), HealthStatus::HealthyOrElseAll)
        .await;
    clean_cycle(&mut d).await;

    let first = d.targets();

    e.proxy.reset_counts();
    let report = clean_cycle(&mut d).await;
    let counts = e.proxy.counts();
    assert_eq!(counts.get("DiscoverInstances"), None, "{counts:?}");
    assert_eq!(counts["DiscoverInstancesRevision"], 2);
    assert_eq!(report.services_refreshed, 0);
    // Nothing changed: the very same list, not built again.
    assert!(std::sync::Arc::ptr_eq(&first, &d.targets()));
    // Nor after a full refresh, which reads every instance and tag again: each
    // instance read again unchanged is the one already held.
    e.proxy.reset_counts();
    for _ in 0..FULL_REFRESH_CYCLES {
        clean_cycle(&mut d).await;
    }
    assert_eq!(
        e.proxy.counts()["DiscoverInstances"],
        2,
        "a full refresh ran"
    );
    assert!(std::sync::Arc::ptr_eq(&first, &d.targets()));

    e.cm.register_task(&a.id, "a2", "10.0.0.3").await;
    e.proxy.reset_counts();
    let report = clean_cycle(&mut d).await;
    assert_eq!(
        e.proxy.counts()["DiscoverInstances"],
        1,
        "only the changed service is re-read"
    );
    assert_eq!(report.services_refreshed, 1);
    assert!(addrs(&mut d).contains(&"10.0.0.3:3000".to_string()));

    e.cm.deregister(&a.id, "a2").await;
    clean_cycle(&mut d).await;
    assert!(!addrs(&mut d).contains(&"10.0.0.3:3000".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn health_changes_are_seen_within_a_full_refresh() {
    let e = env().await;
    let ns = e.cm.http_namespace("ecs-services").await;
    let svc =
        e.cm.service(&ns, "webapp-svc", &[("METRICS_PATH", "/metrics")])
            .await;
    e.cm.register_task(&svc.id, "t1", "10.0.0.1").await;
    e.cm.register_task(&svc.id, "t2", "10.0.0.2").await;
    let mut healthy = e
        .discoverer(names(&["ecs-services"]), HealthStatus::Healthy)
        .await;
    let mut or_else_all = e
        .discoverer(names(&["ecs-services"]), HealthStatus::HealthyOrElseAll)
        .await;
    clean_cycle(&mut healthy).await;
    clean_cycle(&mut or_else_all).await;
    assert_eq!(addrs(&mut healthy).len(), 2);

    e.cm.set_healthy(&svc.id, "t1", false).await;
    let mut cycles = 0;
    while addrs(&mut healthy).len() != 1 {
        clean_cycle(&mut healthy).await;
        cycles += 1;
        assert!(
            cycles <= FULL_REFRESH_CYCLES,
            "health change not seen after {cycles} cycles"
        );
    }
    assert_eq!(addrs(&mut healthy), ["10.0.0.2:80"]);

    // With every instance unhealthy, HEALTHY_OR_ELSE_ALL serves them all; HEALTHY serves none.
    e.cm.set_healthy(&svc.id, "t2", false).await;
    for _ in 0..FULL_REFRESH_CYCLES {
        clean_cycle(&mut healthy).await;
        clean_cycle(&mut or_else_all).await;
    }
    assert!(addrs(&mut healthy).is_empty());
    assert_eq!(addrs(&mut or_else_all).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn tag_changes_and_malformed_port_tags() {
    let e = env().await;
    let ns = e.cm.http_namespace("ecs-services").await;
    let svc = e.cm.service(&ns, "webapp-svc", POST_TAGS).await;
    e.cm.register_task(&svc.id, "t1", "10.0.0.1").await;
    let mut d = e
        .discoverer(names(&["ecs-services"]), HealthStatus::All)
        .await;
    clean_cycle(&mut d).await;
    assert_eq!(addrs(&mut d), ["10.0.0.1:3000", "10.0.0.1:9779"]);

    e.cm.tag(&svc.arn, "METRICS_PORT", "4000").await;
    e.cm.tag(&svc.arn, "METRICS_SCHEME", "https").await;
    for _ in 0..TAG_REFRESH_CYCLES {
        clean_cycle(&mut d).await;
    }
    assert_eq!(addrs(&mut d), ["10.0.0.1:4000", "10.0.0.1:9779"]);
    let app = d
        .targets()
        .targets
        .iter()
        .find(|t| t.address.ends_with(":4000"))
        .unwrap()
        .clone();
    assert_eq!(app.label("__scheme__"), Some("https"));

    e.cm.tag(&svc.arn, "ECS_METRICS_PORT", "ninety").await;
    for _ in 0..TAG_REFRESH_CYCLES {
        clean_cycle(&mut d).await;
    }
    let built = d.targets();
    assert_eq!(
        addrs(&mut d),
        ["10.0.0.1:4000"],
        "only the bad target is skipped"
    );
    let problem = built.problems[0].to_string();
    assert!(
        problem.contains("webapp-svc") && problem.contains("ECS_METRICS_PORT"),
        "{problem}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_ssm_parameter_that_appears_later() {
    let e = env().await;
    let ns = e.cm.http_namespace("ecs-services").await;
    let svc = e.cm.service(&ns, "webapp-svc", POST_TAGS).await;
    e.cm.register_task(&svc.id, "t1", "10.0.0.1").await;
    let source = NamespaceSource::Ssm {
        parameter: "ECS-Namespaces".into(),
    };
    let mut d = e.discoverer(source, HealthStatus::All).await;

    let report = d.run_cycle().await;
    assert!(!report.complete);
    assert_eq!(report.outcome(), "failed");
    assert!(
        report.errors[0].contains("\"ECS-Namespaces\" does not exist"),
        "{:?}",
        report.errors
    );

    e.cm.put_namespaces_parameter("ECS-Namespaces", " ecs-services , ,ecs-services")
        .await;
    clean_cycle(&mut d).await;
    assert_eq!(addrs(&mut d).len(), 2);

    // An emptied parameter is refused and the previous list kept.
    e.cm.put_namespaces_parameter("ECS-Namespaces", " , ").await;
    let report = d.run_cycle().await;
    assert!(
        report.errors[0].contains("names no namespace"),
        "{:?}",
        report.errors
    );
    assert_eq!(addrs(&mut d).len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_retried_with_backoff() {
    let e = env().await;
    let ns = e.cm.http_namespace("ecs-services").await;
    let svc = e.cm.service(&ns, "webapp-svc", POST_TAGS).await;
    e.cm.register_task(&svc.id, "t1", "10.0.0.1").await;
    let mut d = e
        .discoverer(names(&["ecs-services"]), HealthStatus::All)
        .await;
    for code in ["ThrottlingException", "RequestLimitExceeded"] {
        e.proxy.set_fault(Fault::Throttle {
            op: Some("ListServices".into()),
            remaining: 3,
            code: code.into(),
        });
        let before = d.aws().stats.throttled();
        let started = Instant::now();
        let report = clean_cycle(&mut d).await;
        assert_eq!(d.aws().stats.throttled() - before, 3, "{code}");
        assert_eq!(addrs(&mut d).len(), 2);
        // Three backoffs with jitter took some time, but the cycle finished.
        assert!(report.duration_ms < 10_000, "{:?}", started.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_parts_keep_their_last_good_targets() {
    let e = env().await;
    let ns = e.cm.http_namespace("ecs-services").await;
    let a = e.cm.service(&ns, "a", POST_TAGS).await;
    let b = e.cm.service(&ns, "b", POST_TAGS).await;
    e.cm.register_task(&a.id, "a1", "10.0.0.1").await;
    e.cm.register_task(&b.id, "b1", "10.0.0.2").await;
    let mut d = e
        .discoverer(names(&["ecs-services"]), HealthStatus::All)
        .await;
    clean_cycle(&mut d).await;
    let before = addrs(&mut d);
    assert_eq!(before.len(), 4);

    // The namespace's services cannot be listed: its services keep their targets.
    e.proxy.set_fault(Fault::Fail {
        op: Some("ListServices".into()),
    });
    let report = d.run_cycle().await;
    assert!(
        report
            .errors
            .iter()
            .any(|e| e.contains("namespace \"ecs-services\"")),
        "{:?}",
        report.errors
    );
    assert!(report.namespaces[0].stale);
    assert_eq!(addrs(&mut d), before);
    // Nothing answers (namespace index included): same.
    e.proxy.set_fault(Fault::Fail { op: None });
    let report = d.run_cycle().await;
    assert!(!report.errors.is_empty());
    assert_eq!(addrs(&mut d), before);

    // Instances cannot be read: a deregistration is not seen, nothing is lost.
    e.cm.deregister(&a.id, "a1").await;
    e.proxy.set_fault(Fault::Fail {
        op: Some("DiscoverInstances".into()),
    });
    let mut failures = 0;
    for _ in 0..FULL_REFRESH_CYCLES {
        let report = d.run_cycle().await;
        assert_eq!(addrs(&mut d), before);
        if !report.errors.is_empty() {
            failures += 1;
            assert_eq!(report.outcome(), "partial");
            assert!(
                report.errors.iter().any(|e| e.contains("service \"a\"")),
                "{:?}",
                report.errors
            );
        }
    }
    assert!(failures > 0);
    e.proxy.set_fault(Fault::None);
    for _ in 0..FULL_REFRESH_CYCLES {
        clean_cycle(&mut d).await;
    }
    assert_eq!(addrs(&mut d), ["10.0.0.2:3000", "10.0.0.2:9779"]);
}

/// Measures a cycle over 100 services x 10 instances: first cycle, then unchanged.
#[tokio::test(flavor = "multi_thread")]
async fn cost_of_a_cycle_over_100_services_of_10_instances() {
    let e = env().await;
    let ns = e.cm.http_namespace("ecs-services").await;
    for s in 0..100 {
        let svc = e.cm.service(&ns, &format!("svc-{s:03}"), POST_TAGS).await;
        for i in 0..10 {
            e.cm.register_task(
                &svc.id,
                &format!("t{s}-{i}"),
                &format!("10.3.{s}.{}", i + 1),
            )
            .await;
        }
    }
    let mut d = e
        .discoverer(
            NamespaceSource::Ssm {
                parameter: "ns".into(),
            },
            HealthStatus::HealthyOrElseAll,
        )
        .await;
    e.cm.put_namespaces_parameter("ns", "ecs-services").await;

    e.proxy.reset_counts();
    let first = clean_cycle(&mut d).await;
    let first_counts = e.proxy.counts();
    assert_eq!(d.targets().targets.len(), 2000);
    e.proxy.reset_counts();
    let second = clean_cycle(&mut d).await;
    let second_counts = e.proxy.counts();
    println!(
        "MEASURE first cycle: {} ms, {} requests {:?}",
        first.duration_ms, first.aws_requests, first_counts
    );
    println!(
        "MEASURE unchanged cycle: {} ms, {} requests {:?}",
        second.duration_ms, second.aws_requests, second_counts
    );
    // The proxy and the client agree on the count.
    assert_eq!(first.aws_requests, first_counts.values().sum::<u64>());
    // SSM + ListNamespaces + ListServices + per service GetService, tags, DiscoverInstances.
    assert_eq!(first.aws_requests, 3 + 3 * 100);
    // SSM + ListNamespaces + ListServices + one DiscoverInstancesRevision per service.
    assert_eq!(second.aws_requests, 3 + 100);
    assert_eq!(second_counts["DiscoverInstancesRevision"], 100);
}
