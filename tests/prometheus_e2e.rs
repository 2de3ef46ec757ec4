//! End to end: a real Prometheus discovers targets from shard-sd over `http_sd`
//! and scrapes real sample-app processes on 127.0.0.x.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cloudmap::CloudMap;
use common::{aws_env, free_port, wait_for, Moto, Prometheus, SampleApp, ShardSd};

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_exactly_the_discovered_targets() {
    let moto = Moto::start().await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    let (app_port, exporter_port) = (free_port(), free_port());
    let ns = cm.dns_namespace("ecs-services").await;
    let app_port_s = app_port.to_string();
    let exporter_port_s = exporter_port.to_string();
    let svc = cm
        .service(
            &ns,
            "webapp-svc",
            &[
                ("METRICS_PATH", "/metrics"),
                ("METRICS_PORT", &app_port_s),
                ("ECS_METRICS_PATH", "/metrics"),
                ("ECS_METRICS_PORT", &exporter_port_s),
            ],
        )
        .await;
    let live = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let mut apps = Vec::new();
    for (i, ip) in live.iter().enumerate() {
        // Light load, so the post's queries have something to compute.
        apps.push(SampleApp::start(ip, app_port, Some(exporter_port), 5.0).await);
        cm.register_task(&svc.id, &format!("task-{i}"), ip).await;
    }
    // Registered, but nothing listens there: Prometheus must report it down.
    cm.register_task(&svc.id, "task-dead", "127.0.0.5").await;

    let mut env = aws_env(&moto.endpoint);
    env.push(("DISCOVERY_NAMESPACES".into(), "ecs-services".into()));
    env.push(("CONFIG_RELOAD_FREQUENCY".into(), "1".into()));
    let sd = ShardSd::start("prom", &env).await;
    sd.wait_targets("targets", Duration::from_secs(10), |t| t.len() == 8)
        .await;

    let prom = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
         scrape_configs:\n  - job_name: ecs_services\n    http_sd_configs:\n      \
         - url: http://{}/prometheus-targets\n        refresh_interval: 1s\n\
         \x20 - job_name: shard_sd\n    static_configs:\n      - targets: [\"{}\"]\n",
        sd.addr, sd.addr
    ))
    .await;

    let targets = wait_for(
        "prometheus to scrape all targets",
        Duration::from_secs(30),
        || async {
            let active: Vec<serde_json::Value> = prom
                .active_targets()
                .await
                .into_iter()
                .filter(|t| t["labels"]["job"] == "ecs_services")
                .collect();
            let settled = active.len() == 8
                && active
                    .iter()
                    .all(|t| t["health"] != "unknown" && t["lastScrape"] != "0001-01-01T00:00:00Z");
            settled.then_some(active)
        },
    )
    .await;

    let mut seen = BTreeMap::new();
    for t in &targets {
        let labels = t["labels"].as_object().unwrap();
        let ip = labels["instance"].as_str().unwrap().to_owned();
        let source = labels["metrics_source"].as_str().unwrap().to_owned();
        let port = if source == "app" {
            app_port
        } else {
            exporter_port
        };
        assert_eq!(t["scrapeUrl"], format!("http://{ip}:{port}/metrics"));
        // Exactly the original sidecar's labels plus metrics_source and job.
        let mut names: Vec<&str> = labels.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "cluster",
                "instance",
                "job",
                "metrics_source",
                "namespace",
                "service",
                "taskdefinition",
                "taskid"
            ]
        );
        assert_eq!(labels["cluster"], "ecs-adot-cluster");
        assert_eq!(labels["service"], "WebAppService");
        assert_eq!(labels["namespace"], "ecs-services");
        assert_eq!(labels["taskdefinition"], "WebAppTask");
        assert_eq!(
            t["discoveredLabels"]["__meta_cloudmap_service_name"],
            "webapp-svc"
        );
        assert_eq!(
            t["discoveredLabels"]["__meta_cloudmap_attribute_AVAILABILITY_ZONE"],
            "us-east-1a"
        );
        seen.insert((ip, source), t["health"].as_str().unwrap().to_owned());
    }
    for ip in live {
        for source in ["app", "ecs-exporter"] {
            assert_eq!(
                seen[&(ip.to_owned(), source.to_owned())],
                "up",
                "{ip} {source}"
            );
        }
    }
    assert_eq!(seen[&("127.0.0.5".to_owned(), "app".to_owned())], "down");

    // The same through PromQL: up == 1 for each live instance's two targets.
    let up = prom
        .query("sum by (instance) (up{job=\"ecs_services\"} == 1)")
        .await;
    let mut per_instance: Vec<(String, String)> = up
        .iter()
        .map(|r| {
            (
                r["metric"]["instance"].as_str().unwrap().to_owned(),
                r["value"][1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    per_instance.sort();
    assert_eq!(
        per_instance,
        live.iter()
            .map(|ip| (ip.to_string(), "2".to_string()))
            .collect::<Vec<_>>()
    );

    // shard-sd's own metrics, scraped by the same Prometheus.
    let value = |q: &'static str| {
        let prom = &prom;
        async move {
            let r = prom.query(q).await;
            r.first()
                .and_then(|v| v["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
        }
    };
    wait_for("shard-sd metrics", Duration::from_secs(30), || async {
        let discovered = value("shard_sd_targets_discovered").await?;
        (discovered == 8.0).then_some(())
    })
    .await;
    assert_eq!(value("shard_sd_role{role=\"single\"}").await, Some(1.0));
    assert!(
        value("sum(shard_sd_aws_requests_total{operation=\"DiscoverInstances\"})")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        value("sum(shard_sd_http_sd_requests_total{code=\"200\"})")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        value("shard_sd_discovery_cycle_duration_seconds_count")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert!(
        value("shard_sd_last_successful_discovery_timestamp_seconds")
            .await
            .unwrap_or(0.0)
            > 1.7e9
    );

    // The post's dashboard queries give answers (windows shortened to this test's duration).
    for (panel, promql) in [
        ("request rate", "sum(rate(http_requests_total[20s]))"),
        (
            "average latency",
            "sum(rate(request_duration_milliseconds_sum[20s])) / sum(rate(request_duration_milliseconds_count[20s]))",
        ),
        (
            "latency histogram share",
            "sum(rate(request_duration_milliseconds_bucket{le=\"500\"}[20s])) / sum(rate(request_duration_milliseconds_count[20s]))",
        ),
        ("CPU per container", "ecs_cpu_percent{container=\"webapp\"}"),
    ] {
        let got = wait_for(panel, Duration::from_secs(40), || async {
            let r = prom.query(promql).await;
            let v = r.first()?["value"][1].as_str()?.parse::<f64>().ok()?;
            v.is_finite().then_some((r.len(), v))
        })
        .await;
        println!("MEASURE {panel}: {promql} = {} ({} series)", got.1, got.0);
    }

    // Every query of the Grafana dashboards in deploy/ is valid PromQL for this Prometheus.
    for file in ["ecs-workload.json", "shard-sd-operations.json"] {
        let path = common::repo_root().join("deploy/grafana").join(file);
        let dashboard: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let body: serde_json::Value = common::http()
                    .get(format!("{}/api/v1/query", prom.url))
                    .query(&[("query", expr)])
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                assert_eq!(body["status"], "success", "{file}: {expr}: {body}");
            }
        }
    }

    // A deregistration reaches Prometheus.
    cm.deregister(&svc.id, "task-dead").await;
    wait_for("dead target dropped", Duration::from_secs(30), || async {
        let active = prom.active_targets().await;
        (active
            .iter()
            .filter(|t| t["labels"]["job"] == "ecs_services")
            .count()
            == 6)
            .then_some(())
    })
    .await;
    drop(apps);
}
