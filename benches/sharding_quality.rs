//! Quality of assignment, side by side: the fraction of targets moved when a slot
//! is added or removed, and max/mean load, for shard-sd (bounded load on and
//! off), Prometheus `hashmod`, and the bounded-load ring of the OpenTelemetry
//! target allocator. Deterministic: prints the same Markdown tables every run.

mod alternatives;

use std::collections::BTreeMap;

use alternatives::{address, hashmod, member_names, target_urls, BoundedRing};
use shard_sd::sharding::{self, Key, Params};

/// An algorithm: slot (or member) name of every target, given N.
type Assign = dyn Fn(&[String], u32) -> Vec<String>;

fn ours(tolerance: f64) -> Box<Assign> {
    Box::new(move |urls, n| {
        let keys: Vec<Key> = urls
            .iter()
            .map(|u| Key {
                hash: sharding::key_hash(u.as_bytes()),
                size: 1,
            })
            .collect();
        let a = sharding::assign(
            &keys,
            &sharding::equal_slots(n),
            &Params {
                replication: 1,
                tolerance,
            },
        );
        (0..keys.len())
            .map(|i| a.owners(i)[0].to_string())
            .collect()
    })
}

fn prometheus_hashmod() -> Box<Assign> {
    Box::new(|urls, n| {
        urls.iter()
            .map(|u| hashmod(address(u), u64::from(n)).to_string())
            .collect()
    })
}

fn otel_ring() -> Box<Assign> {
    Box::new(|urls, n| {
        let ring = BoundedRing::otel_target_allocator(&member_names(n));
        urls.iter()
            .map(|u| ring.locate(u.as_bytes()).to_owned())
            .collect()
    })
}

fn moved(a: &[String], b: &[String]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

fn max_over_mean(a: &[String], n: u32) -> f64 {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for s in a {
        *counts.entry(s).or_default() += 1;
    }
    *counts.values().max().unwrap_or(&0) as f64 / (a.len() as f64 / f64::from(n))
}

fn main() {
    // `cargo bench` passes flags such as `--bench`; this report has no options.
    let algorithms: Vec<(&str, Box<Assign>)> = vec![
        ("shard-sd, bounded load ε=0.1", ours(0.1)),
        ("shard-sd, ε=0 (plain rendezvous)", ours(0.0)),
        ("Prometheus hashmod (md5 mod N)", prometheus_hashmod()),
        (
            "bounded-load ring (OTel TA: 1061 partitions, RF 5, load 1.1)",
            otel_ring(),
        ),
    ];

    let changes: [(u32, u32); 6] = [(3, 4), (10, 11), (30, 31), (3, 2), (10, 9), (30, 29)];
    for size in [100_000usize, 1_000] {
        movement_table(&algorithms, size, &changes);
    }
    max_over_mean_table(&algorithms);
}

fn movement_table(algorithms: &[(&str, Box<Assign>)], size: usize, changes: &[(u32, u32)]) {
    let urls = target_urls(size);
    println!("### Moved fraction, {size} targets (in brackets: × the optimum)\n");
    print!("| algorithm |");
    for (from, to) in changes {
        print!(" {from}→{to} |");
    }
    println!("\n|---|{}", "---|".repeat(changes.len()));
    print!("| optimum |");
    for &(from, to) in changes {
        print!(
            " {:.4} |",
            f64::from(from.abs_diff(to)) / f64::from(from.max(to))
        );
    }
    println!();
    for (name, f) in algorithms {
        print!("| {name} |");
        for &(from, to) in changes {
            let m = moved(&f(&urls, from), &f(&urls, to));
            let optimum = f64::from(from.abs_diff(to)) / f64::from(from.max(to));
            print!(" {m:.4} ({:.2}×) |", m / optimum);
        }
        println!();
    }
    println!();
}

fn max_over_mean_table(algorithms: &[(&str, Box<Assign>)]) {
    println!("### Max/mean load\n");
    let sizes = [1_000usize, 100_000];
    let ns = [3u32, 10, 30];
    print!("| algorithm |");
    for size in sizes {
        for n in ns {
            print!(" {size} targets / {n} |");
        }
    }
    println!("\n|---|{}", "---|".repeat(sizes.len() * ns.len()));
    for (name, f) in algorithms {
        print!("| {name} |");
        for size in sizes {
            let urls = target_urls(size);
            for n in ns {
                print!(" {:.3} |", max_over_mean(&f(&urls, n), n));
            }
        }
        println!();
    }
}
