//! What a user would pick instead of shard-sd's assignment, written here for the
//! side-by-side comparison:
//! - Prometheus `hashmod` relabelling: `md5(__address__)` modulo N;
//! - a bounded-load consistent-hash ring configured like the OpenTelemetry
//!   target allocator's consistent-hashing strategy (1061 partitions,
//!   replication factor 5, load 1.1, XXH64), following the algorithm of the Go
//!   library it uses.
#![allow(dead_code)]

use std::collections::HashMap;

use md5::{Digest, Md5};
use xxhash_rust::xxh64::xxh64;

/// Prometheus' `hashmod`: the low 8 bytes of the MD5 digest, big-endian, modulo N.
pub fn hashmod(value: &str, modulus: u64) -> u64 {
    let digest = Md5::digest(value.as_bytes());
    let mut low = [0u8; 8];
    low.copy_from_slice(&digest[8..16]);
    u64::from_be_bytes(low) % modulus
}

/// A consistent-hash ring with bounded partition load.
pub struct BoundedRing {
    members: Vec<String>,
    partition_count: u64,
    /// Member index of each partition.
    partitions: Vec<usize>,
}

impl BoundedRing {
    pub fn otel_target_allocator(members: &[String]) -> Self {
        Self::new(members, 1061, 5, 1.1)
    }

    pub fn new(members: &[String], partition_count: u64, replication: usize, load: f64) -> Self {
        let mut ring: HashMap<u64, usize> = HashMap::new();
        let mut sorted: Vec<u64> = Vec::new();
        for (m, name) in members.iter().enumerate() {
            for i in 0..replication {
                let h = xxh64(format!("{name}{i}").as_bytes(), 0);
                ring.insert(h, m);
                sorted.push(h);
            }
        }
        sorted.sort_unstable();
        // Integer division first, as the Go library does.
        let avg_load = ((partition_count / members.len() as u64) as f64 * load).ceil();
        let mut loads = vec![0f64; members.len()];
        let mut partitions = vec![0usize; partition_count as usize];
        for part in 0..partition_count {
            let h = xxh64(&part.to_le_bytes(), 0);
            let mut idx = sorted.partition_point(|&x| x < h);
            if idx >= sorted.len() {
                idx = 0;
            }
            let mut tries = 0;
            loop {
                tries += 1;
                assert!(
                    tries < sorted.len() * 2,
                    "not enough room to distribute partitions"
                );
                let m = ring[&sorted[idx]];
                if loads[m] + 1.0 <= avg_load {
                    partitions[part as usize] = m;
                    loads[m] += 1.0;
                    break;
                }
                idx = (idx + 1) % sorted.len();
            }
        }
        BoundedRing {
            members: members.to_vec(),
            partition_count,
            partitions,
        }
    }

    /// The member name serving `key`.
    pub fn locate(&self, key: &[u8]) -> &str {
        let part = xxh64(key, 0) % self.partition_count;
        &self.members[self.partitions[part as usize]]
    }
}

/// Collector names as the target allocator would see them.
pub fn member_names(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("collector-{i}")).collect()
}

/// Synthetic ECS targets: distinct task IPs, app port 3000.
pub fn target_urls(count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                "http://10.{}.{}.{}:3000/metrics",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            )
        })
        .collect()
}

/// `__address__` of a target URL.
pub fn address(url: &str) -> &str {
    url.trim_start_matches("http://")
        .trim_end_matches("/metrics")
}
