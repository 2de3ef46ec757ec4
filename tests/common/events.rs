//! ECS task events for tests: an SQS queue on moto (through the real SDK) and an
//! EventBridge rule that sends ECS task state changes to it, as the stack's
//! rule does; events are put on the default bus as ECS would send them, or
//! written to the queue directly when a test needs exact control of what arrives.

use std::time::SystemTime;

use serde_json::{json, Value};

use super::http;

/// The queue and the rule feeding it.
pub struct EventQueue {
    pub sqs: aws_sdk_sqs::Client,
    pub url: String,
    endpoint: String,
}

pub const CLUSTER: &str = "ecs-adot-cluster";
pub const ACCOUNT: &str = "123456789012";

impl EventQueue {
    /// Creates queue `name` (messages invisible for `visibility_s` once received)
    /// and a rule sending `aws.ecs` task state changes of services to it.
    pub async fn create(endpoint: &str, name: &str, visibility_s: u32) -> EventQueue {
        let sqs = aws_sdk_sqs::Client::new(&super::sdk_config(endpoint).await);
        let url = sqs
            .create_queue()
            .queue_name(name)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
                visibility_s.to_string(),
            )
            .send()
            .await
            .expect("CreateQueue")
            .queue_url
            .expect("queue url");
        let arn = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .expect("GetQueueAttributes")
            .attributes
            .and_then(|a| {
                a.get(&aws_sdk_sqs::types::QueueAttributeName::QueueArn)
                    .cloned()
            })
            .expect("queue arn");
        let queue = EventQueue {
            sqs,
            url,
            endpoint: endpoint.to_owned(),
        };
        let pattern = json!({
            "source": ["aws.ecs"],
            "detail-type": ["ECS Task State Change"],
            "detail": {"group": [{"prefix": "service:"}]}
        });
        queue
            .events_call(
                "PutRule",
                json!({"Name": format!("{name}-rule"), "EventPattern": pattern.to_string()}),
            )
            .await;
        queue
            .events_call(
                "PutTargets",
                json!({"Rule": format!("{name}-rule"), "Targets": [{"Id": "queue", "Arn": arn}]}),
            )
            .await;
        queue
    }

    /// One EventBridge API call (JSON protocol) to moto.
    async fn events_call(&self, operation: &str, body: Value) -> Value {
        let resp = http()
            .post(&self.endpoint)
            .header("X-Amz-Target", format!("AWSEvents.{operation}"))
            .header("Content-Type", "application/x-amz-json-1.1")
            .header(
                "Authorization",
                "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/events/aws4_request, \
                 SignedHeaders=host, Signature=0",
            )
            .body(body.to_string())
            .send()
            .await
            .expect("events request");
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{operation}: {status} {value}");
        value
    }

    /// Puts an ECS task state change on the default bus, as ECS sends it.
    pub async fn put_task_event(&self, task: &str, service: &str, status: &str, version: u64) {
        let out = self
            .events_call(
                "PutEvents",
                json!({"Entries": [{
                    "Source": "aws.ecs",
                    "DetailType": "ECS Task State Change",
                    "Resources": [task_arn(task)],
                    "Detail": task_detail(task, service, status, version).to_string(),
                }]}),
            )
            .await;
        assert_eq!(out["FailedEntryCount"], 0, "{out}");
    }

    /// Writes `body` to the queue as is (what a rule would deliver, or not).
    pub async fn send_raw(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.url)
            .message_body(body)
            .send()
            .await
            .expect("SendMessage");
    }

    /// Messages in the queue, visible or in flight.
    pub async fn depth(&self) -> u64 {
        use aws_sdk_sqs::types::QueueAttributeName as A;
        let attrs = self
            .sqs
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(A::ApproximateNumberOfMessages)
            .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .expect("GetQueueAttributes")
            .attributes
            .unwrap_or_default();
        [
            A::ApproximateNumberOfMessages,
            A::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .filter_map(|a| attrs.get(a)?.parse::<u64>().ok())
        .sum()
    }
}

pub fn task_arn(task: &str) -> String {
    format!("arn:aws:ecs:us-east-1:{ACCOUNT}:task/{CLUSTER}/{task}")
}

/// `detail` of an ECS task state change.
pub fn task_detail(task: &str, service: &str, status: &str, version: u64) -> Value {
    json!({
        "clusterArn": format!("arn:aws:ecs:us-east-1:{ACCOUNT}:cluster/{CLUSTER}"),
        "taskArn": task_arn(task),
        "group": format!("service:{service}"),
        "lastStatus": status,
        "desiredStatus": if status == "STOPPED" { "STOPPED" } else { "RUNNING" },
        "version": version,
        "attachments": [{"type": "eni", "status": "ATTACHED", "details": []}],
        "containers": [],
        "updatedAt": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
    })
}

/// A whole event as the rule delivers it to the queue.
pub fn task_event(task: &str, service: &str, status: &str, version: u64) -> String {
    json!({
        "version": "0",
        "id": format!("{task}-{version}"),
        "detail-type": "ECS Task State Change",
        "source": "aws.ecs",
        "time": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        "region": "us-east-1",
        "resources": [task_arn(task)],
        "detail": task_detail(task, service, status, version),
    })
    .to_string()
}
