//! Where the leader's and a follower's bytes go, per structure, at a given number
//! of targets: a counting global allocator measures the live heap after each step
//! of what a leader holds (the discovery cache of instances, built through the
//! same interner as discovery's; the target list; the assignment with its change
//! log; a whole copy for replicas behind the log) and what a follower holds (the
//! mirror of the whole assignment as received, its own slot's shard typed, and
//! what a new leader reads from the mirror).
//!
//! `cargo bench --bench memory -- 100000` (the default size is 100,000 targets;
//! several sizes may be given). Prints one table per size, in bytes per target.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use shard_sd::cluster::assignment::Assigner;
use shard_sd::cluster::mirror::{Mirror, OwnShard};
use shard_sd::sharding::{Params, ShardBy, Slot};
use shard_sd::targets::{self, Instance, Interner, ServiceData};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grew(new_size);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// The most heap `work` held at once above what was live before it, and its result.
fn peak_during<R>(work: impl FnOnce() -> R) -> (usize, R) {
    let before = live();
    PEAK.store(before, Ordering::Relaxed);
    let out = work();
    (PEAK.load(Ordering::Relaxed).saturating_sub(before), out)
}

/// The process's resident size, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Services of 100 ECS tasks each, as ECS registers them; a third of the services
/// also tag an exporter (two targets per task), as synthetic-aws generates them.
/// A service: its name, tags and instances.
type Service = (String, BTreeMap<String, String>, Vec<Arc<Instance>>);

fn account(targets: usize) -> Vec<Service> {
    let mut strings = Interner::default();
    let mut out = Vec::new();
    let mut n = 0u32;
    let mut made = 0;
    let mut s = 0;
    while made < targets {
        let exporter = s % 3 == 0;
        let mut tags: BTreeMap<String, String> = [
            ("METRICS_PATH", "/metrics"),
            ("METRICS_PORT", "8080"),
            ("team", "team-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        if exporter {
            tags.insert("ECS_METRICS_PATH".into(), "/metrics".into());
            tags.insert("ECS_METRICS_PORT".into(), "9779".into());
        }
        let name = format!("svc-{s}");
        let instances = (0..100)
            .map(|_| {
                n += 1;
                let id = format!("{:032x}", u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let attributes = [
                    (
                        "AWS_INSTANCE_IPV4",
                        format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255),
                    ),
                    ("AVAILABILITY_ZONE", "us-east-1a".to_owned()),
                    ("AWS_INIT_HEALTH_STATUS", "HEALTHY".to_owned()),
                    ("ECS_CLUSTER_NAME", format!("cluster-{}", s % 4)),
                    ("ECS_SERVICE_NAME", name.clone()),
                    ("ECS_TASK_DEFINITION_FAMILY", format!("{name}-task")),
                    ("REGION", "us-east-1".to_owned()),
                ];
                // As discovery builds them: strings shared through its interner.
                Arc::new(strings.instance(&id, attributes.iter().map(|(k, v)| (*k, v.as_str()))))
            })
            .collect();
        made += 100 * if exporter { 2 } else { 1 };
        out.push((name, tags, instances));
        s += 1;
    }
    out
}

fn row(what: &str, bytes: isize, targets: usize) {
    println!(
        "| {what} | {:.1} MiB | {:.0} |",
        bytes as f64 / (1024.0 * 1024.0),
        bytes as f64 / targets as f64
    );
}

fn measure(size: usize) {
    let base = live() as isize;
    let data = account(size);
    let cache = live() as isize - base;
    let built = targets::build_all(data.iter().map(|(name, tags, instances)| ServiceData {
        namespace: "team-0.internal",
        service: name,
        tags,
        instances,
        rule: None,
        host_ports: None,
    }));
    let list = built.targets;
    let n = list.len();
    let after_list = live() as isize;
    let slots: Vec<Slot> = (0..3).map(|id| Slot { id, weight: 1.0 }).collect();
    let mut assigner = Assigner::new(ShardBy::Target, Params::default(), Default::default(), 1);
    assigner.set_slots(&slots);
    let started = Instant::now();
    assigner.set_targets(list.clone());
    let assign_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after_assigner = live() as isize;
    // Placement alone, from the targets (keys grouped and hashed), on 100 slots.
    let hundred: Vec<Slot> = (0..100).map(|id| Slot { id, weight: 1.0 }).collect();
    let started = Instant::now();
    let placed = shard_sd::sharding::assign_targets(
        list.iter(),
        &hundred,
        ShardBy::Target,
        &Params::default(),
    );
    let place_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(placed.len(), list.len());
    drop(placed);
    let snapshot = assigner.snapshot().expect("snapshot");
    let json_bytes = targets::render(list.iter().take(1000)).len() as f64 / 1000.0;
    let log_bytes: usize = snapshot.log.iter().map(|f| f.bytes.len()).sum();
    let after_snapshot = live() as isize;
    let started = Instant::now();
    let (whole_peak, whole) = peak_during(|| snapshot.whole().clone());
    let whole_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after_whole = live() as isize;
    println!("\n### {n} targets, 3 slots (leader), assignment in {assign_ms:.0} ms\n");
    println!("Placement alone on 100 slots (bounded load, from the targets): {place_ms:.0} ms\n");
    println!(
        "{json_bytes:.0} B of http_sd JSON per target; on the peer wire, compressed: {:.0} B per \
         target (a whole copy, made in {whole_ms:.0} ms with at most {:.1} MiB more held)\n",
        whole.bytes.len() as f64 / n as f64,
        whole_peak as f64 / 1048576.0
    );
    println!("| structure | live heap | bytes per target |");
    println!("|---|---|---|");
    row(
        "discovery cache (instances, tags, interned strings)",
        cache,
        n,
    );
    row(
        "target list (shared with the assignment)",
        after_list - base - cache,
        n,
    );
    row(
        &format!(
            "assignment: identities, placements, shards' members, the change log ({:.1} MiB)",
            log_bytes as f64 / 1048576.0
        ),
        after_assigner - after_list,
        n,
    );
    row(
        "a whole copy, made for replicas behind the log",
        after_whole - after_snapshot,
        n,
    );
    row("leader in all", after_whole - base, n);
    let rss_before = rss();
    // SAFETY: returns glibc's free pages, as shard-sd does after large changes.
    unsafe { libc::malloc_trim(0) };
    println!(
        "\nProcess resident size: {:.0} MiB, {:.0} MiB after returning free pages (the bench's \
         own input included)",
        rss_before as f64 / 1048576.0,
        rss() as f64 / 1048576.0
    );
    // A follower: the whole copy as received, then its slot's shard, typed.
    let head = snapshot.answer_head(true);
    let before_mirror = live() as isize;
    let mirror = Mirror::followed(None, head, vec![whole.clone()]).expect("mirror");
    let after_mirror = live() as isize;
    let slot = snapshot
        .shards
        .iter()
        .max_by_key(|(_, s)| s.targets())
        .map(|(slot, _)| *slot)
        .expect("a shard");
    let started = Instant::now();
    let own = OwnShard::from_mirror(slot, &mirror).expect("own shard");
    let body = own
        .body(&mirror.shards[&slot], shard_sd::targets::MetaLabels::All)
        .expect("checks");
    let own_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after_own = live() as isize;
    let started = Instant::now();
    let contents = mirror.contents().expect("contents").targets.len();
    let read_ms = started.elapsed().as_secs_f64() * 1000.0;
    let after_contents = live() as isize;
    assert_eq!(contents, n);
    println!("\nA follower:\n");
    println!("| structure | live heap | bytes per target |");
    println!("|---|---|---|");
    row(
        "mirror of the whole assignment (the frames as received)",
        after_mirror - before_mirror,
        n,
    );
    row(
        &format!(
            "its own slot's shard, typed, and its body ({} targets, built in {own_ms:.0} ms)",
            own.len()
        ),
        after_own - after_mirror,
        n,
    );
    row(
        &format!("read into targets when elected ({read_ms:.0} ms)"),
        after_contents - after_own,
        n,
    );
    drop((mirror, own, body, whole, snapshot, assigner, list, data));
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![100_000]
    } else {
        sizes
    };
    for size in sizes {
        measure(size);
    }
}
