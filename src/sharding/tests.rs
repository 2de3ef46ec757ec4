use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;

fn keys(n: usize, salt: &str) -> Vec<Key> {
    (0..n)
        .map(|i| Key {
            hash: key_hash(format!("{salt}-{i}").as_bytes()),
            size: 1,
        })
        .collect()
}

fn owner_sets(a: &Assignment) -> Vec<BTreeSet<u32>> {
    (0..a.len())
        .map(|i| a.owners(i).iter().copied().collect())
        .collect()
}

fn loads(a: &Assignment, keys: &[Key]) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        for id in a.owners(i) {
            *out.entry(*id).or_insert(0) += u64::from(k.size);
        }
    }
    out
}

const OFF: Params = Params {
    replication: 1,
    tolerance: 0.0,
};

#[test]
fn golden_vectors() {
    // Pinned forever: changing any of these changes where every target goes.
    let golden_key = key_hash(b"golden");
    assert_eq!(golden_key, GOLDEN_KEY);
    assert_eq!(slot_hash(0), GOLDEN_SLOT0);
    assert_eq!(score(golden_key, slot_hash(7)), GOLDEN_SCORE_7);
    let a = assign(&keys(12, "golden"), &equal_slots(5), &Params::default());
    assert_eq!(a.owners, GOLDEN_ASSIGNMENT);
    let r2 = assign(
        &keys(6, "golden"),
        &equal_slots(5),
        &Params {
            replication: 2,
            tolerance: 0.1,
        },
    );
    assert_eq!(r2.owners, GOLDEN_ASSIGNMENT_R2);
}

const GOLDEN_KEY: u64 = 0x7d26_3ba9_f3ff_b622;
const GOLDEN_SLOT0: u64 = 0x48b2_c926_16fc_193d;
const GOLDEN_SCORE_7: u64 = 0x6162_5a27_8733_29a2;
const GOLDEN_ASSIGNMENT: [u32; 12] = [0, 2, 1, 3, 4, 4, 0, 1, 0, 2, 2, 4];
const GOLDEN_ASSIGNMENT_R2: [u32; 12] = [0, 1, 2, 0, 2, 1, 2, 4, 4, 3, 4, 1];

#[test]
fn the_pinned_hasher_drives_the_crate() {
    let mut nodes = RendezvousNodes::new(PinnedHasher);
    for id in 0..4u32 {
        nodes.insert(IdNode::new(id));
    }
    let k = key_hash(b"some key");
    let top = **nodes.calc_candidates(&KeyRef(k)).next().unwrap();
    let best = (0..4u32)
        .max_by_key(|id| (score(k, slot_hash(*id)), *id))
        .unwrap();
    assert_eq!(top, best);
}

#[test]
fn no_slots_no_owners() {
    let a = assign(&keys(3, "x"), &[], &Params::default());
    assert_eq!(a.replicas, 0);
    assert!(a.is_empty());
}

#[test]
fn replication_is_capped_by_the_slot_count() {
    let a = assign(
        &keys(50, "x"),
        &equal_slots(2),
        &Params {
            replication: 3,
            tolerance: 0.1,
        },
    );
    assert_eq!(a.replicas, 2);
    for i in 0..50 {
        assert_eq!(owner_sets(&a)[i].len(), 2);
    }
}

#[test]
fn bounded_load_keeps_max_over_mean_under_one_plus_epsilon() {
    let slots = equal_slots(10);
    let max = |l: &BTreeMap<u32, u64>| *l.values().max().unwrap() as f64 / 100.0;
    let mut plain_worst: f64 = 0.0;
    for salt in 0..20 {
        let ks = keys(1000, &format!("balance{salt}"));
        let bounded = loads(&assign(&ks, &slots, &Params::default()), &ks);
        assert!(max(&bounded) <= 1.10, "{bounded:?}");
        plain_worst = plain_worst.max(max(&loads(&assign(&ks, &slots, &OFF), &ks)));
    }
    // Without the bound, some of these inputs go over it.
    assert!(plain_worst > 1.10, "{plain_worst}");
}

#[test]
fn grouped_keys_stay_together() {
    use crate::targets::{MetricsSource, Target};
    let t = |ns: &str, svc: &str, ip: &str| {
        Target::new(
            ns,
            svc,
            ip,
            MetricsSource::App,
            &format!("{ip}:3000"),
            Default::default(),
        )
    };
    let targets: Vec<Target> = (0..60)
        .map(|i| {
            t(
                &format!("ns{}", i % 3),
                &format!("svc{}", i % 6),
                &format!("10.0.0.{i}"),
            )
        })
        .collect();
    for (by, group) in [
        (
            ShardBy::Service,
            Box::new(|t: &Target| format!("{}/{}", t.namespace, t.service))
                as Box<dyn Fn(&Target) -> String>,
        ),
        (
            ShardBy::Namespace,
            Box::new(|t: &Target| t.namespace.to_string()),
        ),
    ] {
        let a = assign_targets(&targets, &equal_slots(4), by, &Params::default());
        let mut slot_of: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            let owners = a.slots_of(i).to_vec();
            let entry = slot_of.entry(group(t)).or_insert_with(|| owners.clone());
            assert_eq!(*entry, owners, "{by:?}: {} split", group(t));
        }
    }
    // By target, a label change does not move a target; the address does.
    let mut relabelled = targets.clone();
    let first = relabelled[0].with_label("team", "a");
    relabelled[0] = Target::new(
        &first.namespace,
        &first.service,
        "other",
        first.source,
        &first.address,
        first.label_map(),
    );
    let a = assign_targets(&targets, &equal_slots(4), ShardBy::Target, &OFF);
    let b = assign_targets(&relabelled, &equal_slots(4), ShardBy::Target, &OFF);
    assert_eq!(a, b);
}

#[test]
fn capacity_is_exact_where_floating_point_is_not() {
    // 1.1 x 400 / 10 = 44.000000000000007 in f64.
    assert_eq!(capacities(400, &equal_slots(10), 0.1), vec![44; 10]);
    assert_eq!(capacities(1000, &equal_slots(10), 0.1), vec![110; 10]);
    assert_eq!(capacities(1001, &equal_slots(10), 0.1), vec![111; 10]);
}

#[test]
fn optimal_fractions() {
    let f = optimal_moved_fraction(&equal_slots(10), &equal_slots(11));
    assert!((f - 1.0 / 11.0).abs() < 1e-12);
    let f = optimal_moved_fraction(&equal_slots(10), &equal_slots(9));
    assert!((f - 1.0 / 10.0).abs() < 1e-12);
    assert_eq!(
        optimal_moved_fraction(&equal_slots(4), &equal_slots(4)),
        0.0
    );
}

fn arb_slots() -> impl Strategy<Value = Vec<Slot>> {
    (
        proptest::collection::btree_set(0u32..40, 1..10),
        prop_oneof![
            Just(None),
            Just(Some(vec![1.0, 2.0, 3.0])),
            Just(Some(vec![0.5, 1.0, 1.5, 4.0]))
        ],
    )
        .prop_map(|(ids, weights)| {
            ids.into_iter()
                .enumerate()
                .map(|(i, id)| Slot {
                    id,
                    weight: weights.as_ref().map_or(1.0, |w| w[i % w.len()]),
                })
                .collect()
        })
}

fn arb_keys() -> impl Strategy<Value = Vec<Key>> {
    (
        proptest::collection::vec((any::<u64>(), 1u32..4), 0..150),
        any::<bool>(),
    )
        .prop_map(|(ks, sized)| {
            ks.into_iter()
                .map(|(hash, size)| Key {
                    hash,
                    size: if sized { size } else { 1 },
                })
                .collect()
        })
}

fn arb_params() -> impl Strategy<Value = Params> {
    (
        1usize..4,
        prop_oneof![Just(0.0), Just(0.05), Just(0.1), Just(0.5)],
    )
        .prop_map(|(replication, tolerance)| Params {
            replication,
            tolerance,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn fast_path_equals_the_crates_calc_candidates(ks in arb_keys(), slots in arb_slots(), params in arb_params()) {
        prop_assert_eq!(assign(&ks, &slots, &params), assign_reference(&ks, &slots, &params));
    }

    #[test]
    fn deterministic_whatever_the_input_order(ks in arb_keys(), slots in arb_slots(), params in arb_params(), seed in any::<u64>()) {
        let a = assign(&ks, &slots, &params);
        let mut order: Vec<usize> = (0..ks.len()).collect();
        let mut rng = seed;
        for i in (1..order.len()).rev() {
            rng = splitmix64(rng);
            order.swap(i, (rng % (i as u64 + 1)) as usize);
        }
        let shuffled: Vec<Key> = order.iter().map(|&i| ks[i]).collect();
        let mut rslots = slots.clone();
        rslots.reverse();
        let b = assign(&shuffled, &rslots, &params);
        for (j, &i) in order.iter().enumerate() {
            prop_assert_eq!(a.owners(i), b.owners(j));
        }
    }

    #[test]
    fn every_key_gets_min_r_s_distinct_slots(ks in arb_keys(), slots in arb_slots(), params in arb_params()) {
        let a = assign(&ks, &slots, &params);
        let want = params.replication.min(slots.len());
        let ids: BTreeSet<u32> = slots.iter().map(|s| s.id).collect();
        for set in owner_sets(&a) {
            prop_assert_eq!(set.len(), want);
            prop_assert!(set.is_subset(&ids));
        }
    }

    #[test]
    fn bounded_load_never_exceeds_capacity(ks in arb_keys(), slots in arb_slots(), replication in 1usize..3, percent in 1u64..60) {
        // Unit keys and equal weights: a placement under the caps always exists.
        let ks: Vec<Key> = ks.into_iter().map(|k| Key { size: 1, ..k }).collect();
        let slots: Vec<Slot> = slots.into_iter().map(|s| Slot { weight: 1.0, ..s }).collect();
        let params = Params { replication, tolerance: percent as f64 / 100.0 };
        let a = assign(&ks, &slots, &params);
        let want = replication.min(slots.len()) as u64;
        // ceil((1 + p/100) x K x R / S) in exact integer arithmetic.
        let (num, den) = ((100 + percent) * ks.len() as u64 * want, 100 * slots.len() as u64);
        let cap = num.div_ceil(den);
        // With R > 1 a key may find fewer than R distinct slots with room; each such
        // replica goes to the least-loaded slot, at most R - 1 over the cap.
        let slack = want - 1;
        for (id, load) in loads(&a, &ks) {
            prop_assert!(load <= cap + slack, "slot {} load {} cap {}", id, load, cap);
        }
    }

    #[test]
    fn removing_a_slot_moves_only_its_keys_when_unbounded(ks in arb_keys(), slots in arb_slots(), replication in 1usize..3) {
        prop_assume!(slots.len() >= 2);
        let params = Params { replication, tolerance: 0.0 };
        let before = assign(&ks, &slots, &params);
        let gone = slots[slots.len() / 2].id;
        let rest: Vec<Slot> = slots.iter().copied().filter(|s| s.id != gone).collect();
        let after = assign(&ks, &rest, &params);
        for i in 0..ks.len() {
            let (b, a): (BTreeSet<u32>, BTreeSet<u32>) =
                (before.owners(i).iter().copied().collect(), after.owners(i).iter().copied().collect());
            if !b.contains(&gone) && b.len() == a.len() {
                prop_assert_eq!(b, a, "key {} moved without holding the removed slot", i);
            } else {
                // Its other slots stay.
                let kept: BTreeSet<u32> = b.iter().copied().filter(|s| *s != gone).collect();
                prop_assert!(kept.is_subset(&a));
            }
        }
    }

    #[test]
    fn adding_a_slot_moves_keys_only_to_it_when_unbounded(ks in arb_keys(), slots in arb_slots()) {
        let before = assign(&ks, &slots, &OFF);
        let new_id = 1000;
        let mut more = slots.clone();
        more.push(Slot { id: new_id, weight: slots[0].weight });
        let after = assign(&ks, &more, &OFF);
        for i in 0..ks.len() {
            if before.owners(i) != after.owners(i) {
                prop_assert_eq!(after.owners(i), &[new_id][..]);
            }
        }
    }
}

/// Movement with bounded load on, at scale: removing a slot moves about the keys
/// it held (at most 1.1x), adding one moves about 1/(n+1).
#[test]
fn movement_with_bounded_load_is_near_optimal() {
    for n in [3u32, 10, 30] {
        let ks = keys(3000, &format!("move{n}"));
        let base = equal_slots(n);
        let before = assign(&ks, &base, &Params::default());
        // Remove the slot in the middle.
        let gone = n / 2;
        let rest: Vec<Slot> = base.iter().copied().filter(|s| s.id != gone).collect();
        let after = assign(&ks, &rest, &Params::default());
        let held = (0..ks.len())
            .filter(|&i| before.owners(i)[0] == gone)
            .count();
        let moved = (0..ks.len())
            .filter(|&i| before.owners(i) != after.owners(i))
            .count();
        assert!(
            moved as f64 <= 1.1 * held as f64,
            "n={n}: removing moved {moved}, slot held {held}"
        );
        // Add one.
        let grown = equal_slots(n + 1);
        let after = assign(&ks, &grown, &Params::default());
        let moved = (0..ks.len())
            .filter(|&i| before.owners(i) != after.owners(i))
            .count();
        let optimal = ks.len() as f64 / f64::from(n + 1);
        assert!(
            moved as f64 <= 1.1 * optimal * 1.15,
            "n={n}: adding moved {moved}, optimum {optimal:.0}"
        );
        // Unbounded, adding a slot moves about 1/(n+1) of the keys, all to the new slot.
        let plain = assign(&ks, &base, &OFF);
        let plain_after = assign(&ks, &grown, &OFF);
        let moved = (0..ks.len())
            .filter(|&i| plain.owners(i) != plain_after.owners(i))
            .count() as f64;
        assert!(
            (0.8 * optimal..=1.2 * optimal).contains(&moved),
            "n={n}: moved {moved}, optimum {optimal:.0}"
        );
    }
}

#[test]
fn weights_are_respected() {
    let ks = keys(6000, "weights");
    let slots = [
        Slot { id: 0, weight: 1.0 },
        Slot { id: 1, weight: 2.0 },
        Slot { id: 2, weight: 1.0 },
    ];
    for params in [OFF, Params::default()] {
        let l = loads(&assign(&ks, &slots, &params), &ks);
        let ratio = l[&1] as f64 / ((l[&0] + l[&2]) as f64 / 2.0);
        assert!((1.8..=2.2).contains(&ratio), "{params:?}: {l:?}");
    }
}
