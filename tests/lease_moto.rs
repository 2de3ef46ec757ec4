//! Lease item operations against DynamoDB on moto, through the real SDK.

mod common;

use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use common::proxy::{AwsProxy, Fault};
use common::Moto;
use shard_sd::clock::WallClock;
use shard_sd::coordination::lease::{HolderInfo, LeaseError, LeaseTable};

fn holder(id: &str) -> HolderInfo {
    HolderInfo {
        id: id.into(),
        incarnation: format!("inc-{id}"),
        addr: format!("127.0.0.1:{}", 9000 + id.len()),
        weight: 1.0,
        lease: Duration::from_secs(3),
    }
}

async fn table(endpoint: &str, clock: WallClock) -> LeaseTable {
    let sdk = common::sdk_config(endpoint).await;
    let aws = shard_sd::aws::clients_from(&sdk).expect("clients");
    let table = LeaseTable::new(
        aws.dynamodb(Duration::from_millis(500), Duration::from_secs(3)),
        "leases".into(),
        "test".into(),
        clock,
    );
    table.create_if_missing().await.expect("create table");
    table
}

#[tokio::test(flavor = "multi_thread")]
async fn conditional_acquire_renew_release() {
    let moto = Moto::start().await;
    let t = table(&moto.endpoint, WallClock::default()).await;
    let (a, b) = (holder("a"), holder("bb"));
    let pk = t.leader_pk();

    let first = t
        .acquire(&pk, None, 0, &a)
        .await
        .expect("acquire missing item");
    assert_eq!(first.term, 1);
    // A second acquisition of a missing item loses: it exists now.
    assert!(matches!(
        t.acquire(&pk, None, 0, &b).await,
        Err(LeaseError::Lost { .. })
    ));

    let renewed = t.renew(&first, &a).await.expect("renew");
    assert_ne!(renewed.rvn, first.rvn);
    assert_eq!(renewed.incarnation, "inc-a");
    // Another process started with the same REPLICA_ID cannot renew it, and is told why.
    let twin = HolderInfo {
        incarnation: "inc-twin".into(),
        ..a.clone()
    };
    let err = t.renew(&renewed, &twin).await.unwrap_err();
    assert!(
        matches!(err, LeaseError::SameReplicaId { .. }) && err.to_string().contains("REPLICA_ID"),
        "{err}"
    );
    // Renewing from an older version of an item still ours (holder, incarnation, not
    // released) is an earlier renewal of ours that was applied unheard: it renews.
    let renewed = t
        .renew(&first, &a)
        .await
        .expect("the item is still ours at a version we never heard of");
    // As someone else, it is a loss.
    assert!(matches!(
        t.renew(&renewed, &b).await,
        Err(LeaseError::Lost { .. })
    ));
    // Taking over needs the current version.
    assert!(matches!(
        t.acquire(&pk, Some(&first), 0, &b).await,
        Err(LeaseError::Lost { .. })
    ));

    let released = t.release(&renewed, &a).await.expect("release");
    let items = t.read(std::slice::from_ref(&pk)).await.expect("read");
    let stored = &items[&pk];
    assert!(stored.released);
    assert_eq!(stored.term, 1, "release keeps the term");
    assert_eq!(stored.rvn, released.rvn);

    let taken = t
        .acquire(&pk, Some(stored), 0, &b)
        .await
        .expect("acquire released");
    assert_eq!(taken.term, 2, "each acquisition increments the term");
    // Terms grow past what the acquirer has seen, even if the item was deleted.
    let other = t
        .acquire(&t.slot_pk(9), None, 41, &a)
        .await
        .expect("acquire missing");
    assert_eq!(other.term, 42);
    assert_eq!(
        t.read(std::slice::from_ref(&pk)).await.unwrap()[&pk].holder,
        "bb"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retried_renewal_or_acquisition_that_had_succeeded_is_recognised() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint).await;
    let direct = table(&moto.endpoint, WallClock::default()).await;
    let t = table(&proxy.endpoint, WallClock::default()).await;
    let a = holder("a");
    let held = t
        .acquire(&t.slot_pk(0), None, 0, &a)
        .await
        .expect("acquire");

    // The first attempt reaches DynamoDB but its answer is lost; the SDK retries the
    // same write, which now fails its condition. ALL_OLD shows our own new version.
    proxy.set_fault(Fault::DropResponse {
        op: Some("UpdateItem".into()),
        remaining: 1,
    });
    proxy.reset_counts();
    let renewed = t
        .renew(&held, &a)
        .await
        .expect("retried success is a success");
    assert_eq!(proxy.counts()["UpdateItem"], 2, "the SDK retried once");
    let stored = direct.read(&[t.slot_pk(0)]).await.unwrap()[&t.slot_pk(0)].clone();
    assert_eq!(stored.rvn, renewed.rvn);

    // A real loss is still a loss: someone else took the item meanwhile.
    let b = holder("bb");
    direct
        .acquire(&t.slot_pk(0), Some(&stored), 0, &b)
        .await
        .expect("take over");
    assert!(matches!(
        t.renew(&renewed, &a).await,
        Err(LeaseError::Lost { .. })
    ));

    // The same for an acquisition: the PutItem took effect, its answer was lost.
    let taken = direct.read(&[t.slot_pk(0)]).await.unwrap()[&t.slot_pk(0)].clone();
    proxy.set_fault(Fault::DropResponse {
        op: Some("PutItem".into()),
        remaining: 1,
    });
    proxy.reset_counts();
    let acquired = t
        .acquire(&t.slot_pk(0), Some(&taken), 0, &a)
        .await
        .expect("a retried acquisition that had succeeded is a success");
    assert_eq!(proxy.counts()["PutItem"], 2, "the SDK retried once");
    let stored = direct.read(&[t.slot_pk(0)]).await.unwrap()[&t.slot_pk(0)].clone();
    assert_eq!((stored.rvn, stored.holder), (acquired.rvn, "a".to_owned()));
}

#[tokio::test(flavor = "multi_thread")]
async fn wall_clock_offset_is_only_written_down() {
    let moto = Moto::start().await;
    let skewed = table(&moto.endpoint, WallClock::with_offset_ms(10 * 60_000)).await;
    let item = skewed
        .acquire(&skewed.leader_pk(), None, 0, &holder("a"))
        .await
        .unwrap();
    let now = WallClock::default().now_ms();
    assert!((item.renewed_at_ms - now - 600_000).abs() < 5_000);

    let sdk = moto.sdk_config().await;
    let raw = aws_sdk_dynamodb::Client::new(&sdk)
        .get_item()
        .table_name("leases")
        .key("pk", AttributeValue::S(skewed.leader_pk()))
        .send()
        .await
        .unwrap();
    let stored: i64 = raw.item().unwrap()["renewed_at"]
        .as_n()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(stored, item.renewed_at_ms);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_is_named_with_the_fix() {
    let moto = Moto::start().await;
    let sdk = common::sdk_config(&moto.endpoint).await;
    let aws = shard_sd::aws::clients_from(&sdk).unwrap();
    let t = LeaseTable::new(
        aws.dynamodb(Duration::from_millis(500), Duration::from_secs(3)),
        "no-such-table".into(),
        "test".into(),
        WallClock::default(),
    );
    let err = t.read(&[t.leader_pk()]).await.unwrap_err();
    assert!(err.is_configuration());
    let msg = err.to_string();
    assert!(
        msg.contains("\"no-such-table\"") && msg.contains("CREATE_TABLE"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_access_names_the_table_and_the_iam_actions() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint).await;
    let t = table(&proxy.endpoint, WallClock::default()).await;
    proxy.set_fault(Fault::Error {
        op: None,
        code: "AccessDeniedException".into(),
    });
    let err = t
        .acquire(&t.leader_pk(), None, 0, &holder("a"))
        .await
        .unwrap_err();
    assert!(err.is_configuration());
    let msg = err.to_string();
    for needle in [
        "\"leases\"",
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:BatchGetItem",
    ] {
        assert!(msg.contains(needle), "{needle} not in {msg}");
    }
}

/// A renewal applied whose every answer was lost (the call timed out) leaves the
/// item at a version this replica never heard of: the next renewal, on the old
/// version, finds the item still its own and renews it instead of giving it up.
#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_applied_unheard_does_not_lose_the_lease() {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.endpoint).await;
    let t = table(&proxy.endpoint, WallClock::default()).await;
    let a = holder("a");
    let held = t
        .acquire(&t.slot_pk(0), None, 0, &a)
        .await
        .expect("acquire");
    proxy.set_fault(Fault::DropResponse {
        op: Some("UpdateItem".into()),
        remaining: 100,
    });
    assert!(t.renew(&held, &a).await.is_err(), "every answer was lost");
    proxy.set_fault(Fault::None);
    let stored = t.read(&[t.slot_pk(0)]).await.unwrap()[&t.slot_pk(0)].clone();
    assert_ne!(stored.rvn, held.rvn, "the lost renewal was applied");
    let renewed = t.renew(&held, &a).await.expect("still ours");
    assert_eq!(renewed.holder, "a");
    // Releasing from the old version works the same way.
    let _ = t.renew(&held, &a).await.expect("still ours");
    t.release(&held, &a)
        .await
        .expect("release from an old version");
    assert!(t.read(&[t.slot_pk(0)]).await.unwrap()[&t.slot_pk(0)].released);
}
