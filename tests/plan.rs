//! `shard-sd plan`, the offline what-if, as a process.

use std::process::Command;

use serde_json::Value;

/// An http_sd document like shard-sd serves: `namespaces` x `services` x `tasks`, two targets each.
fn targets_file(
    dir: &std::path::Path,
    namespaces: usize,
    services: usize,
    tasks: usize,
) -> std::path::PathBuf {
    let mut groups = Vec::new();
    for ns in 0..namespaces {
        for svc in 0..services {
            for t in 0..tasks {
                let ip = format!("10.{ns}.{svc}.{}", t + 1);
                for (port, source) in [(3000, "app"), (9779, "ecs-exporter")] {
                    groups.push(serde_json::json!({
                        "targets": [format!("{ip}:{port}")],
                        "labels": {
                            "__metrics_path__": "/metrics",
                            "namespace": format!("ns{ns}"),
                            "metrics_source": source,
                            "__meta_cloudmap_namespace_name": format!("ns{ns}"),
                            "__meta_cloudmap_service_name": format!("svc{svc}"),
                        }
                    }));
                }
            }
        }
    }
    let path = dir.join("targets.json");
    std::fs::write(&path, serde_json::to_vec(&groups).unwrap()).unwrap();
    path
}

fn plan(env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shard-sd"))
        .arg("plan")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn json_report_of_a_scale_out() {
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), 2, 10, 50); // 2,000 targets
    let (code, out, err) = plan(
        &[],
        &[
            "--targets",
            file.to_str().unwrap(),
            "--slots",
            "3",
            "--to-slots",
            "4",
            "--json",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["targets"], 2000);
    assert_eq!(v["from"]["slots"], 3);
    assert_eq!(v["to"]["slots"], 4);
    let per_slot: Vec<u64> = v["to"]["per_slot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .collect();
    assert_eq!(per_slot.len(), 4);
    assert_eq!(per_slot.iter().sum::<u64>(), 2000);
    assert!(v["from"]["max_over_mean"].as_f64().unwrap() <= 1.1 + 1e-9);
    assert!(v["to"]["max_over_mean"].as_f64().unwrap() <= 1.1 + 1e-9);
    assert_eq!(v["optimal_moved_fraction"], 0.25);
    let moved = v["moved_fraction"].as_f64().unwrap();
    assert!((0.2..=0.3).contains(&moved), "moved {moved}");
    assert_eq!(v["moved"].as_u64().unwrap() as f64 / 2000.0, moved);
}

#[test]
fn honours_shard_by_replication_and_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), 2, 3, 10);
    let f = file.to_str().unwrap();
    // By namespace: two namespaces, so at most two slots get targets.
    let (_, out, _) = plan(
        &[("SHARD_BY", "namespace")],
        &["--targets", f, "--slots", "5", "--json"],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let used = v["from"]["per_slot"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n.as_u64() != Some(0))
        .count();
    assert!(used <= 2, "{v}");
    assert_eq!(v["shard_by"], "namespace");
    assert_eq!(v["moved"], 0);
    // Replication 2: every target counted on two slots; flags work after the subcommand too.
    let (_, out, _) = plan(
        &[],
        &[
            "--targets",
            f,
            "--slots",
            "3",
            "--replication-factor",
            "2",
            "--balance-tolerance",
            "0",
            "--json",
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let total: u64 = v["from"]["per_slot"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(total, 2 * 120);
    assert_eq!(v["replication_factor"], 2);
    assert_eq!(v["balance_tolerance"], 0.0);
}

#[test]
fn human_report_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = targets_file(dir.path(), 1, 2, 5);
    let (code, out, _) = plan(
        &[],
        &[
            "--targets",
            file.to_str().unwrap(),
            "--slots",
            "2",
            "--to-slots",
            "3",
        ],
    );
    assert_eq!(code, Some(0));
    assert!(out.starts_with("20 targets, by target"), "{out}");
    assert!(
        out.contains("from 2 slots:") && out.contains("to   3 slots:") && out.contains("moved:"),
        "{out}"
    );

    let (code, _, err) = plan(&[], &["--targets", "/nonexistent/t.json", "--slots", "2"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/t.json"), "{err}");
    std::fs::write(dir.path().join("bad.json"), b"{\"not\": \"a list\"}").unwrap();
    let (code, _, err) = plan(
        &[],
        &[
            "--targets",
            dir.path().join("bad.json").to_str().unwrap(),
            "--slots",
            "2",
        ],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("not http_sd JSON"), "{err}");
    let (code, _, err) = plan(
        &[("SHARD_BY", "pod")],
        &["--targets", file.to_str().unwrap(), "--slots", "2"],
    );
    assert_eq!(code, Some(2));
    assert!(
        err.contains("SHARD_BY") && err.contains("namespace"),
        "{err}"
    );
}
