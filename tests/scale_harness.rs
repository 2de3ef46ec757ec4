//! The scale harness at a small size, so that it cannot rot: `scale-harness`
//! (debug build) starts `synthetic-aws` with about 2,000 targets, moto for the lease
//! table and 2 replicas over 2 slots, and its report must hold every figure
//! `scripts/scale.sh` documents, with values that make sense for that size.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_harness_reports_every_figure_at_about_2000_targets() {
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_scale-harness"))
        .parent()
        .expect("binary directory")
        .to_owned();
    let logs = common::log_dir().join(format!("scale-{}", std::process::id()));
    // 15 services x 100 instances, about a third with an exporter.
    let output = Command::new(env!("CARGO_BIN_EXE_scale-harness"))
        .args(["--services", "15", "--instances", "100"])
        .args(["--replicas", "2", "--slots", "2"])
        .args(["--refresh", "2s", "--duration", "5s", "--load", "2s"])
        .args([
            "--registrations",
            "3",
            "--first-cycle-limit",
            "3m",
            "--json",
        ])
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--moto")
        .arg(common::repo_root().join(".venv/bin/moto_server"))
        .arg("--logs")
        .arg(&logs)
        .output()
        .expect("scale-harness runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scale-harness failed: {}\n{stdout}\nlogs in {}",
        String::from_utf8_lossy(&output.stderr),
        logs.display()
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    println!("MEASURE scale harness at 2k targets (debug build): {report}");
    // A third of the services, drawn at random from the seed, have an exporter.
    let targets = report["targets"].as_u64().unwrap_or(0);
    assert!((1500..=3000).contains(&targets), "{report}");
    assert_eq!(report["services"], 15, "{report}");
    for figure in [
        "first_cycle_s",
        "unchanged_cycle_s",
        "leader_rss_mib",
        "leader_cpu_pct",
        "follower_rss_mib",
        "http_sd_p50_ms",
        "http_sd_p99_ms",
        "http_sd_gzip_p50_ms",
        "http_sd_gzip_p99_ms",
    ] {
        let value = report[figure].as_f64();
        assert!(
            value.is_some_and(|v| v.is_finite() && v >= 0.0),
            "{figure}: {report}"
        );
    }
    // Every service is asked for its revision in an unchanged cycle.
    let unchanged = report["unchanged_cycle_requests"].as_u64().unwrap_or(0);
    assert!(unchanged >= 15, "{report}");
    assert!(report["requests_per_s"]["DiscoverInstancesRevision"].as_f64() > Some(0.0));
    // A registration reaches its shard within a refresh and a bit.
    let worst = report["registration_to_shard_s"]["max"]
        .as_f64()
        .unwrap_or(f64::NAN);
    assert!(worst < 2.0 * 3.0, "registration took {worst} s: {report}");
    assert_eq!(report["registration_to_shard_s"]["n"], 3);
    // The follower received something for the registrations, far less than the list.
    let received = report["peer_bytes_per_change"][0].as_f64().unwrap_or(0.0);
    assert!(received > 0.0, "{report}");
    // Changes, not the assignment: a registration costs a follower a few KiB at
    // most, and a burst of changes about what those targets weigh in a copy.
    assert!(received <= 4096.0, "{report}");
    let full = report["peer_full_copy_bytes"].as_f64().unwrap_or(0.0);
    assert!(full > 20.0 * received, "{report}");
    // At this size each answer's head line (membership, per slot its count and
    // fingerprint) weighs as much as the few targets changed: allowed on top.
    let churn = report["churn_bytes_per_follower"][0]
        .as_f64()
        .unwrap_or(f64::NAN);
    let changed = report["churn_targets_changed"].as_f64().unwrap_or(0.0);
    let encoded = changed * full / targets as f64;
    assert!(churn > 0.0 && churn <= 2.0 * encoded + 4096.0, "{report}");
    // A new leader publishes after the leader's SIGKILL, moving nothing served.
    let publish = report["new_leader_publish_s"].as_f64().unwrap_or(f64::NAN);
    assert!(publish > 0.0 && publish < 60.0, "{report}");
    assert_eq!(report["new_leader_survivors_changed"], 0, "{report}");
    assert!(report["largest_shard_targets"].as_u64() >= Some(targets / 2));
    assert!(report["http_sd_gzip_bytes"].as_u64() > Some(1000));
    // Clients without gzip (as Prometheus asks) get the JSON, several times larger.
    assert!(
        report["http_sd_json_bytes"].as_u64()
            > Some(5 * report["http_sd_gzip_bytes"].as_u64().unwrap_or(0)),
        "{report}"
    );
}
