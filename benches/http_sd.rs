//! Latency of `GET /prometheus-targets` over loopback for a 1,000-target list:
//! shard-sd's body compressed once per change (200 with gzip, as Prometheus asks;
//! 200 inflated for a client without gzip; 304 with `If-None-Match`) side by side
//! with rendering the JSON on every request, as the original sidecar does.
//! Also the cost of building, rendering and compressing the list once per
//! discovery change.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::Router;
use criterion::{criterion_group, criterion_main, Criterion};
use shard_sd::state::Shared;
use shard_sd::targets::{self, Body, Instance, ServiceData, Target};

const TASKS: usize = 500; // two targets each (app + ECS exporter)

fn tags() -> BTreeMap<String, String> {
    [
        ("METRICS_PATH", "/metrics"),
        ("METRICS_PORT", "3000"),
        ("ECS_METRICS_PATH", "/metrics"),
        ("ECS_METRICS_PORT", "9779"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn instances() -> Vec<Arc<Instance>> {
    (0..TASKS)
        .map(|i| Instance {
            id: format!("{i:032x}").into(),
            attributes: [
                (
                    "AWS_INSTANCE_IPV4".to_owned(),
                    format!("10.0.{}.{}", i / 250, i % 250 + 1),
                ),
                ("ECS_CLUSTER_NAME".to_owned(), "ecs-adot-cluster".to_owned()),
                ("ECS_SERVICE_NAME".to_owned(), "WebAppService".to_owned()),
                (
                    "ECS_TASK_DEFINITION_FAMILY".to_owned(),
                    "WebAppTask".to_owned(),
                ),
                ("AVAILABILITY_ZONE".to_owned(), "us-east-1a".to_owned()),
            ]
            .into_iter()
            .collect(),
        })
        .map(Arc::new)
        .collect()
}

fn build(tags: &BTreeMap<String, String>, instances: &[Arc<Instance>]) -> Arc<Vec<Target>> {
    targets::build_all([ServiceData {
        namespace: "ecs-services",
        service: "webapp-svc",
        tags,
        instances,
        rule: None,
        host_ports: None,
    }])
    .targets
}

async fn render_per_request(State(targets): State<Arc<Vec<Target>>>) -> Vec<u8> {
    targets::render(targets.iter())
}

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}/prometheus-targets")
}

fn bench(c: &mut Criterion) {
    let (tags, instances) = (tags(), instances());
    let list = build(&tags, &instances);
    assert_eq!(list.len(), 2 * TASKS);
    eprintln!(
        "1,000 targets render to {} bytes",
        targets::render(list.iter()).len()
    );

    let mut group = c.benchmark_group("discovery_change_1000_targets");
    group.bench_function("build_targets", |b| b.iter(|| build(&tags, &instances)));
    group.bench_function("render_json", |b| b.iter(|| targets::render(list.iter())));
    group.bench_function("render_and_gzip", |b| b.iter(|| Body::render(list.iter())));
    group.finish();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let single = tokio::sync::watch::channel(shard_sd::coordination::CoordinationView::single()).1;
    let metrics = Arc::new(shard_sd::telemetry::Metrics::new(&Default::default()));
    let shared = Shared::new(
        "bench".into(),
        "127.0.0.1:9001".into(),
        single,
        metrics,
        shard_sd::targets::MetaLabels::All,
    );
    shared.publish(Body::render(list.iter()));
    let etag = shared.targets().expect("published").body.gzip_etag();
    let ours = rt.block_on(serve(shard_sd::output::http::router(shared)));
    let naive = rt.block_on(serve(
        Router::new()
            .route("/prometheus-targets", get(render_per_request))
            .with_state(list),
    ));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");

    let mut group = c.benchmark_group("get_prometheus_targets_1000");
    let get = |url: &str, gzip: bool| {
        let mut req = client.get(url);
        if gzip {
            req = req.header("accept-encoding", "gzip");
        }
        async move { req.send().await.expect("get").bytes().await.expect("body") }
    };
    group.bench_function("compressed_once_200_gzip", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(get(&ours, true).await.len() > 10_000) })
    });
    group.bench_function("compressed_once_200_inflated", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(get(&ours, false).await.len() > 100_000) })
    });
    group.bench_function("compressed_once_304_if_none_match", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = client
                .get(&ours)
                .header("accept-encoding", "gzip")
                .header("if-none-match", &etag)
                .send()
                .await
                .expect("get");
            assert_eq!(resp.status(), 304);
        })
    });
    group.bench_function("render_per_request_200", |b| {
        b.to_async(&rt)
            .iter(|| async { assert!(get(&naive, false).await.len() > 100_000) })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
