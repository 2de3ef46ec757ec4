//! The `shard-sd` binary as a process: configuration errors, the http_sd endpoint's
//! contract, readiness, file output, a stalled AWS endpoint and clean shutdown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::cloudmap::{CloudMap, POST_TAGS};
use common::proxy::{AwsProxy, Fault};
use common::{addresses, aws_env, http, Moto, ShardSd};

fn run_with_env(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shard-sd"))
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run shard-sd");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Exit code of `shard-sd probe URL`, the container health check.
fn probe(url: &str) -> Option<i32> {
    Command::new(env!("CARGO_BIN_EXE_shard-sd"))
        .args(["probe", url])
        .env_clear()
        .status()
        .expect("run probe")
        .code()
}

#[test]
fn invalid_configuration_exits_2_naming_the_variable() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "CONFIG_RELOAD_FREQUENCY",
            "often",
            &["CONFIG_RELOAD_FREQUENCY", "number of seconds"],
        ),
        ("CONFIG_RELOAD_FREQUENCY", "0", &["CONFIG_RELOAD_FREQUENCY"]),
        (
            "SERVICE_DISCOVERY_MODE",
            "BOTH",
            &["SERVICE_DISCOVERY_MODE", "HTTP_BASED", "FILE_BASED"],
        ),
        (
            "HEALTH_STATUS",
            "SICK",
            &["HEALTH_STATUS", "HEALTHY_OR_ELSE_ALL", "UNHEALTHY", "ALL"],
        ),
        ("LISTEN_ADDR", "nine-thousand", &["LISTEN_ADDR"]),
        ("DISCOVERY_NAMESPACES", " , ", &["DISCOVERY_NAMESPACES"]),
        ("DISCOVERY_CONCURRENCY", "0", &["DISCOVERY_CONCURRENCY"]),
    ];
    for (var, value, expected) in cases {
        let (code, stderr) = run_with_env(&[(var, value), ("AWS_REGION", "us-east-1")]);
        assert_eq!(code, Some(2), "{var}={value}: {stderr}");
        for needle in *expected {
            assert!(
                stderr.contains(needle),
                "{var}={value}: {needle:?} not in {stderr}"
            );
        }
    }
}

/// moto with the post's setup: namespace `ecs-services`, service `webapp-svc`, two tasks.
async fn post_setup(moto: &Moto) -> (CloudMap, common::cloudmap::Service) {
    let cm = CloudMap::new(&moto.sdk_config().await);
    let ns = cm.dns_namespace("ecs-services").await;
    let svc = cm.service(&ns, "webapp-svc", POST_TAGS).await;
    cm.register_task(&svc.id, "task-1", "10.0.0.1").await;
    cm.register_task(&svc.id, "task-2", "10.0.0.2").await;
    (cm, svc)
}

use common::aws_env_with as env_with;

#[tokio::test(flavor = "multi_thread")]
async fn http_sd_contract_readiness_and_status() {
    let moto = Moto::start().await;
    let (cm, svc) = post_setup(&moto).await;
    let sd = ShardSd::start(
        "contract",
        &env_with(
            &moto.endpoint,
            &[
                ("CONFIG_RELOAD_FREQUENCY", "300ms"),
                ("DISCOVERY_NAMESPACES_PARAMETER_NAME", "ECS-Namespaces"),
            ],
        ),
    )
    .await;
    let client = http();

    // The parameter does not exist yet: 503 (Prometheus keeps its previous list), not ready.
    let status = common::wait_for("a first failed cycle", Duration::from_secs(10), || async {
        let status = sd.status().await;
        status["last_discovery"]["errors"]
            .to_string()
            .contains("ECS-Namespaces")
            .then_some(status)
    })
    .await;
    assert_eq!(status["ready"], false);
    let resp = client
        .get(sd.url("/prometheus-targets"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(
        client.get(sd.url("/readyz")).send().await.unwrap().status(),
        503
    );
    assert_eq!(
        client
            .get(sd.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        probe(&sd.url("/readyz")),
        Some(1),
        "the probe must fail before readiness"
    );

    cm.put_namespaces_parameter("ECS-Namespaces", "ecs-services")
        .await;
    let groups = sd
        .wait_targets("first targets", Duration::from_secs(10), |t| t.len() == 4)
        .await;
    assert_eq!(
        addresses(&groups),
        [
            "10.0.0.1:3000",
            "10.0.0.1:9779",
            "10.0.0.2:3000",
            "10.0.0.2:9779"
        ]
    );
    assert_eq!(
        client.get(sd.url("/readyz")).send().await.unwrap().status(),
        200
    );
    assert_eq!(probe(&sd.url("/readyz")), Some(0));

    let resp = client
        .get(sd.url("/prometheus-targets"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let etag = resp.headers()["etag"].to_str().unwrap().to_owned();
    let body = resp.bytes().await.unwrap();
    // Same targets, same bytes.
    let again = client
        .get(sd.url("/prometheus-targets"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body, again);
    let not_modified = client
        .get(sd.url("/prometheus-targets"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), 304);
    let post = client
        .post(sd.url("/prometheus-targets"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 405);

    let status = sd.status().await;
    assert_eq!(status["role"], "single");
    assert_eq!(status["targets"], 4);
    assert_eq!(status["namespaces"][0]["name"], "ecs-services");
    assert_eq!(status["last_discovery"]["outcome"], "ok");
    assert!(status["replica_id"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(status["last_discovery"]["time"].as_str().is_some());

    // A new registration shows up, with a new ETag.
    cm.register_task(&svc.id, "task-3", "10.0.0.3").await;
    sd.wait_targets("registration", Duration::from_secs(10), |t| t.len() == 6)
        .await;
    let resp = client
        .get(sd.url("/prometheus-targets"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn keeps_the_last_good_list_while_aws_stops_answering() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint).await;
    let (cm, svc) = post_setup(&moto).await;
    let sd = ShardSd::start(
        "stall",
        &env_with(
            &proxy.endpoint,
            &[
                ("CONFIG_RELOAD_FREQUENCY", "300ms"),
                ("DISCOVERY_NAMESPACES", "ecs-services"),
                ("AWS_CALL_TIMEOUT", "500ms"),
                ("AWS_MAX_ATTEMPTS", "2"),
            ],
        ),
    )
    .await;
    let good = sd
        .wait_targets("first targets", Duration::from_secs(10), |t| t.len() == 4)
        .await;

    // The endpoint stops answering; a deregistration happens meanwhile.
    proxy.set_fault(Fault::Hang);
    cm.deregister(&svc.id, "task-2").await;
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut saw_failure = false;
    while Instant::now() < deadline {
        assert_eq!(
            sd.targets().await.as_deref(),
            Some(&good[..]),
            "last good list not kept"
        );
        let status = sd.status().await;
        saw_failure |= status["last_discovery"]["outcome"] != "ok";
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(saw_failure, "status never showed the failing discovery");
    let status = sd.status().await;
    assert!(
        status["last_discovery"]["errors"]
            .to_string()
            .contains("network"),
        "{status}"
    );
    assert_eq!(
        http().get(sd.url("/readyz")).send().await.unwrap().status(),
        200
    );

    // It answers again: the deregistration is seen.
    proxy.set_fault(Fault::None);
    sd.wait_targets("recovery", Duration::from_secs(15), |t| t.len() == 2)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_based_mode_writes_the_file_on_change() {
    let moto = Moto::start().await;
    let (cm, svc) = post_setup(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    let sd = ShardSd::start(
        "file",
        &env_with(
            &moto.endpoint,
            &[
                ("SERVICE_DISCOVERY_MODE", "FILE_BASED"),
                ("CONFIG_FILE_DIR", config_dir.to_str().unwrap()),
                ("CONFIG_RELOAD_FREQUENCY", "300ms"),
                ("DISCOVERY_NAMESPACES", "ecs-services"),
            ],
        ),
    )
    .await;
    let file = config_dir.join("ecs-services.json");
    let read = || -> Option<Vec<serde_json::Value>> {
        serde_json::from_slice(&std::fs::read(&file).ok()?).ok()
    };
    common::wait_for("file written", Duration::from_secs(10), || async {
        read().filter(|t| t.len() == 4)
    })
    .await;
    let served = sd.targets().await.unwrap();
    assert_eq!(read().unwrap(), served, "file and endpoint differ");
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();

    // Unchanged cycles do not rewrite the file.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        std::fs::metadata(&file).unwrap().modified().unwrap(),
        modified
    );

    cm.register_task(&svc.id, "task-3", "10.0.0.3").await;
    common::wait_for("file updated", Duration::from_secs(10), || async {
        read().filter(|t| t.len() == 6)
    })
    .await;
    let names: Vec<_> = std::fs::read_dir(&config_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["ecs-services.json"], "temporary files left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_shuts_down_cleanly() {
    let moto = Moto::start().await;
    post_setup(&moto).await;
    let mut sd = ShardSd::start(
        "term",
        &env_with(
            &moto.endpoint,
            &[
                ("DISCOVERY_NAMESPACES", "ecs-services"),
                ("CONFIG_RELOAD_FREQUENCY", "1"),
            ],
        ),
    )
    .await;
    sd.wait_targets("targets", Duration::from_secs(10), |t| t.len() == 4)
        .await;
    let started = Instant::now();
    sd.proc.signal(libc::SIGTERM);
    let code = sd.proc.wait_exit(Duration::from_secs(5));
    assert_eq!(code, Some(0), "{}", sd.proc.log_text());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(sd.proc.log_text().contains("SIGTERM received"));
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_region_is_a_configuration_error() {
    let (code, stderr) = run_with_env(&[
        ("DISCOVERY_NAMESPACES", "x"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("AWS_REGION"), "{stderr}");
}

/// An unreachable Cloud Map fails every service's call each cycle: that is one
/// WARN line per cycle, with counts per error kind, not one per service.
/// A first cycle that cannot complete is tried again within seconds, not a
/// whole refresh interval later (a new leader meeting an AWS blip, or a
/// restart during one, would otherwise publish nothing for that long).
#[tokio::test(flavor = "multi_thread")]
async fn a_first_cycle_that_failed_is_retried_soon() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint).await;
    let _ = post_setup(&moto).await;
    proxy.set_fault(Fault::Fail {
        op: Some("ListNamespaces".into()),
    });
    let sd = ShardSd::start(
        "first-retry",
        &env_with(
            &proxy.endpoint,
            &[
                ("CONFIG_RELOAD_FREQUENCY", "60s"),
                ("DISCOVERY_NAMESPACES", "ecs-services"),
                ("AWS_MAX_ATTEMPTS", "1"),
            ],
        ),
    )
    .await;
    common::wait_for("a failed first cycle", Duration::from_secs(10), || async {
        let status = sd.status().await;
        (status["last_discovery"]["outcome"] == "failed").then_some(())
    })
    .await;
    proxy.set_fault(Fault::None);
    // Within the backoff (1 s, 2 s, 4 s, ...), far before the 60 s interval.
    sd.wait_targets("targets after the blip", Duration::from_secs(10), |t| {
        t.len() == 4
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_cycle_logs_one_warn_line() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint).await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    let ns = cm.dns_namespace("ecs-services").await;
    for i in 0..20 {
        let svc = cm.service(&ns, &format!("svc-{i}"), POST_TAGS).await;
        cm.register_task(&svc.id, &format!("task-{i}"), &format!("10.0.1.{i}"))
            .await;
    }
    let sd = ShardSd::start(
        "warn",
        &env_with(
            &proxy.endpoint,
            &[
                ("CONFIG_RELOAD_FREQUENCY", "300ms"),
                ("DISCOVERY_NAMESPACES", "ecs-services"),
                ("AWS_MAX_ATTEMPTS", "1"),
                ("AWS_MAX_RPS", "1000"),
                ("LOG_FORMAT", "json"),
                ("RUST_LOG", "info"),
            ],
        ),
    )
    .await;
    sd.wait_targets("first targets", Duration::from_secs(20), |t| t.len() == 40)
        .await;
    let warn_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("\"level\":\"WARN\""))
            .count()
    };
    let before = warn_lines(&sd.proc.log_text());
    // Every service's revision call fails with a server error.
    proxy.set_fault(Fault::Fail {
        op: Some("DiscoverInstancesRevision".into()),
    });
    let cycles_before = sd.status().await["last_discovery"]["time"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set_fault(Fault::None);
    let log = sd.proc.log_text();
    let failed_cycles = log
        .lines()
        .filter(|l| l.contains("discovery cycle:") && l.contains("calls failed"))
        .count();
    let warns = warn_lines(&log) - before;
    assert!(failed_cycles >= 5, "{failed_cycles} failed cycles logged");
    assert_eq!(
        warns, failed_cycles,
        "one WARN line per failed cycle:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("calls failed"))
        .expect("a cycle's line");
    assert!(
        line.contains("servicediscovery:DiscoverInstancesRevision") && line.contains("20"),
        "the line counts the failures by kind and names one: {line}"
    );
    assert_ne!(sd.status().await["last_discovery"]["time"], cycles_before);
}

/// A successful answer that most targets are gone (here: the namespace list now
/// names a namespace that does not exist, as after a wrong edit) is held until
/// seen DROP_CONFIRM_CYCLES cycles in a row; `MAX_DROP_FRACTION=0` turns that off.
#[tokio::test(flavor = "multi_thread")]
async fn a_mass_disappearance_is_held_until_confirmed() {
    let moto = Moto::start().await;
    let (cm, _svc) = post_setup(&moto).await;
    cm.put_namespaces_parameter("ECS-Namespaces", "ecs-services")
        .await;
    let start = |name: &'static str, extra: &'static [(&'static str, &'static str)]| {
        let mut env = env_with(
            &moto.endpoint,
            &[
                ("CONFIG_RELOAD_FREQUENCY", "1"),
                ("DISCOVERY_NAMESPACES_PARAMETER_NAME", "ECS-Namespaces"),
                ("DROP_CONFIRM_CYCLES", "3"),
                ("LOG_FORMAT", "json"),
            ],
        );
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        async move { ShardSd::start(name, &env).await }
    };
    let guarded = start("guarded", &[]).await;
    let unguarded = start("unguarded", &[("MAX_DROP_FRACTION", "0")]).await;
    for sd in [&guarded, &unguarded] {
        sd.wait_targets("targets", Duration::from_secs(10), |t| t.len() == 4)
            .await;
    }
    cm.put_namespaces_parameter("ECS-Namespaces", "ecs-servcies")
        .await;
    let edited = Instant::now();
    unguarded
        .wait_targets(
            "the unguarded replica to drop",
            Duration::from_secs(5),
            |t| t.is_empty(),
        )
        .await;
    // Held: the list stays, the hold shows in status and metrics.
    let status = common::wait_for("a hold", Duration::from_secs(5), || async {
        let s = guarded.status().await;
        s["drop_hold"].is_object().then_some(s)
    })
    .await;
    assert_eq!(status["drop_hold"]["would_drop"], 4, "{status}");
    assert_eq!(status["drop_hold"]["cycles_needed"], 3, "{status}");
    assert_eq!(guarded.targets().await.map(|t| t.len()), Some(4));
    assert!(guarded.metrics().await.contains("shard_sd_drop_hold 1"));
    // Confirmed by the third identical answer: published.
    guarded
        .wait_targets("the confirmed drop", Duration::from_secs(10), |t| {
            t.is_empty()
        })
        .await;
    let held_for = edited.elapsed();
    assert!(
        held_for >= Duration::from_secs(2),
        "published after {held_for:?}, under 3 cycles"
    );
    assert!(guarded.status().await["drop_hold"].is_null());
    assert!(guarded.metrics().await.contains("shard_sd_drop_hold 0"));
    let warned = guarded
        .proc
        .log_text()
        .lines()
        .filter(|l| l.contains("MAX_DROP_FRACTION") && l.contains("\"WARN\""))
        .count();
    assert_eq!(warned, 1, "one WARN line for the hold");
    println!("MEASURE a drop of every target was published {held_for:?} after the edit");
}

/// A cycle spreads its services' turns over the refresh interval and publishes
/// what changed as it reads it (within about a second), not at the cycle's end:
/// a registration waits for its service's turn, not for every other service's.
#[tokio::test(flavor = "multi_thread")]
async fn a_cycle_publishes_each_changed_service_as_it_reads_it() {
    let moto = Moto::start().await;
    let cm = CloudMap::new(&moto.sdk_config().await);
    let ns = cm.dns_namespace("ecs-services").await;
    let mut services = Vec::new();
    for (i, name) in ["svc-a", "svc-b", "svc-c", "svc-d"].iter().enumerate() {
        let svc = cm.service(&ns, name, POST_TAGS).await;
        cm.register_task(&svc.id, &format!("old-{i}"), &format!("10.0.8.{i}"))
            .await;
        services.push(svc);
    }
    let sd = ShardSd::start(
        "midcycle",
        &env_with(
            &moto.endpoint,
            &[
                // Four turns 1.6 s apart in each 8 s cycle.
                ("CONFIG_RELOAD_FREQUENCY", "8s"),
                ("DISCOVERY_NAMESPACES", "ecs-services"),
            ],
        ),
    )
    .await;
    let served = || async {
        sd.targets()
            .await
            .map(|t| addresses(&t))
            .unwrap_or_default()
    };
    common::wait_for("the first publication", Duration::from_secs(20), || async {
        let s = served().await;
        (0..4)
            .all(|i| s.iter().any(|a| a.starts_with(&format!("10.0.8.{i}:"))))
            .then_some(())
    })
    .await;
    // Right after a cycle ended, a task registers in every service.
    let cycle_time = || async { sd.status().await["last_discovery"]["time"].clone() };
    let ended = cycle_time().await;
    common::wait_for("a cycle to end", Duration::from_secs(20), || async {
        (cycle_time().await != ended).then_some(())
    })
    .await;
    let last_cycle = cycle_time().await;
    // A rolling deploy: each service's old task goes as new ones come. The old
    // ones are served until the cycle's end; the new ones as read. (Two new
    // tasks: moto's revision is the sum of its instances' own, which one in and
    // one out would leave unchanged.)
    for (i, svc) in services.iter().enumerate() {
        cm.register_task(&svc.id, &format!("new-{i}"), &format!("10.0.9.{i}"))
            .await;
        cm.register_task(&svc.id, &format!("new-{i}-b"), &format!("10.0.10.{i}"))
            .await;
        cm.deregister(&svc.id, &format!("old-{i}")).await;
    }
    let started = Instant::now();
    let mut first_seen: Vec<Option<Duration>> = vec![None; 4];
    let mut first_before_cycle_end = None;
    while first_seen.iter().any(Option::is_none) && started.elapsed() < Duration::from_secs(30) {
        let s = served().await;
        for (i, seen) in first_seen.iter_mut().enumerate() {
            if seen.is_none() && s.iter().any(|a| a.starts_with(&format!("10.0.9.{i}:"))) {
                *seen = Some(started.elapsed());
                if first_before_cycle_end.is_none() {
                    first_before_cycle_end = Some(cycle_time().await == last_cycle);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen: Vec<Duration> = first_seen.iter().flatten().copied().collect();
    println!("MEASURE new targets first served after {seen:?}");
    assert_eq!(
        seen.len(),
        4,
        "not every registration was served: {first_seen:?}"
    );
    assert_eq!(
        first_before_cycle_end,
        Some(true),
        "the first registration was served only once its cycle had ended"
    );
    let spread = seen
        .iter()
        .max()
        .unwrap()
        .saturating_sub(*seen.iter().min().unwrap());
    assert!(
        spread >= Duration::from_millis(2500),
        "served all at once ({seen:?}), not as each service was read"
    );
    // The old tasks go at the cycle's end.
    common::wait_for("the old tasks gone", Duration::from_secs(20), || async {
        let s = served().await;
        (!s.iter().any(|a| a.starts_with("10.0.8."))).then_some(())
    })
    .await;
}

/// Body of `/prometheus-targets` once it holds at least `min` targets.
async fn settled_body(sd: &ShardSd, min: usize) -> Vec<serde_json::Value> {
    sd.wait_targets("targets", Duration::from_secs(60), |t| t.len() >= min)
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn meta_labels_setting_shrinks_the_body_and_keeps_everything_else() {
    // 2,000 targets (15 services of 125 instances, one with an exporter too),
    // attributes as ECS registers them.
    let aws = common::SyntheticAws::start(&["--services", "15", "--instances", "125"]).await;
    let endpoint = aws.endpoint.clone();
    let mut bodies = Vec::new();
    for setting in ["all", "basic", "none"] {
        let mut env = aws_env(&endpoint);
        env.push(("META_LABELS".into(), setting.into()));
        let sd = ShardSd::start(&format!("meta-{setting}"), &env).await;
        let groups = settled_body(&sd, 2000).await;
        let bytes = http()
            .get(sd.url("/prometheus-targets"))
            .send()
            .await
            .expect("request")
            .bytes()
            .await
            .expect("body")
            .len();
        bodies.push((setting, groups, bytes));
    }
    let targets = bodies[0].1.len();
    for (setting, groups, bytes) in &bodies {
        println!(
            "MEASURE META_LABELS={setting}: {bytes} bytes for {targets} targets ({} B per target)",
            bytes / targets
        );
        assert_eq!(groups.len(), targets, "{setting}");
    }
    let labels = |g: &serde_json::Value| -> Vec<(String, String)> {
        g["labels"]
            .as_object()
            .expect("labels")
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
            .collect()
    };
    let meta = |l: &[(String, String)], prefix: &str| -> Vec<String> {
        l.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    };
    for i in 0..targets {
        let [all, basic, none] = [0, 1, 2].map(|b| labels(&bodies[b].1[i]));
        // Same targets, same order, same labels but for the meta ones.
        assert_eq!(bodies[0].1[i]["targets"], bodies[2].1[i]["targets"]);
        let plain = |l: &[(String, String)]| -> Vec<(String, String)> {
            l.iter()
                .filter(|(k, _)| !k.starts_with("__meta_cloudmap_"))
                .cloned()
                .collect()
        };
        assert_eq!(plain(&all), plain(&basic));
        assert_eq!(plain(&all), none);
        assert!(!meta(&all, "__meta_cloudmap_attribute_").is_empty());
        assert_eq!(
            meta(&basic, "__meta_cloudmap_"),
            [
                "__meta_cloudmap_instance_id",
                "__meta_cloudmap_namespace_name",
                "__meta_cloudmap_service_name"
            ]
        );
    }
    assert!(bodies[0].2 > bodies[1].2 && bodies[1].2 > bodies[2].2);
}
