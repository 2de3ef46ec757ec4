//! Time to assign targets to slots: shard-sd's assignment (with and without
//! bounded load) side by side with plain use of the `rendezvous_hash` crate
//! (`calc_candidates` per key, which sorts every key's full ranking).

mod alternatives;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rendezvous_hash::{IdNode, RendezvousNodes};
use shard_sd::sharding::{self, Key, Params, PinnedHasher};

#[derive(Hash)]
struct KeyRef(u64);

fn keys(count: usize) -> Vec<Key> {
    alternatives::target_urls(count)
        .iter()
        .map(|u| Key {
            hash: sharding::key_hash(u.as_bytes()),
            size: 1,
        })
        .collect()
}

fn crate_plain(keys: &[Key], slots: u32, replication: usize) -> Vec<u32> {
    let mut nodes = RendezvousNodes::new(PinnedHasher);
    for id in 0..slots {
        nodes.insert(IdNode::new(id));
    }
    let mut out = Vec::with_capacity(keys.len() * replication);
    for k in keys {
        out.extend(
            nodes
                .calc_candidates(&KeyRef(k.hash))
                .take(replication)
                .map(|n| **n),
        );
    }
    out
}

fn bench(c: &mut Criterion) {
    for count in [10_000usize, 100_000, 1_000_000] {
        let ks = keys(count);
        for slots in [10u32, 100] {
            for replication in [1usize, 2] {
                let mut group = c.benchmark_group(format!(
                    "assign/{count}_targets/{slots}_slots/r{replication}"
                ));
                group.throughput(Throughput::Elements(count as u64));
                if count >= 1_000_000 {
                    group.sample_size(10);
                }
                let s = sharding::equal_slots(slots);
                let bounded = Params {
                    replication,
                    tolerance: 0.1,
                };
                let plain = Params {
                    replication,
                    tolerance: 0.0,
                };
                group.bench_function(BenchmarkId::new("ours_bounded_load", ""), |b| {
                    b.iter(|| sharding::assign(&ks, &s, &bounded))
                });
                group.bench_function(BenchmarkId::new("ours_plain", ""), |b| {
                    b.iter(|| sharding::assign(&ks, &s, &plain))
                });
                group.bench_function(BenchmarkId::new("crate_calc_candidates", ""), |b| {
                    b.iter(|| crate_plain(&ks, slots, replication))
                });
                group.finish();
            }
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
