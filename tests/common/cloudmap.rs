//! Setting up Cloud Map and SSM state on moto through the real SDK, as an operator
//! (or ECS) would.

use std::collections::BTreeMap;

use aws_sdk_servicediscovery::types::{CustomHealthStatus, HealthCheckCustomConfig, Tag};
use aws_sdk_servicediscovery::Client;

pub struct CloudMap {
    pub sd: Client,
    pub ssm: aws_sdk_ssm::Client,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub id: String,
    pub arn: String,
    pub name: String,
}

impl CloudMap {
    pub fn new(sdk: &aws_config::SdkConfig) -> CloudMap {
        CloudMap {
            sd: Client::new(sdk),
            ssm: aws_sdk_ssm::Client::new(sdk),
        }
    }

    /// Creates an HTTP namespace (the type Service Connect uses) and returns its id.
    pub async fn http_namespace(&self, name: &str) -> String {
        self.sd
            .create_http_namespace()
            .name(name)
            .send()
            .await
            .expect("CreateHttpNamespace");
        self.namespace_id(name).await
    }

    /// Creates a private DNS namespace (the post's kind) and returns its id.
    pub async fn dns_namespace(&self, name: &str) -> String {
        self.sd
            .create_private_dns_namespace()
            .name(name)
            .vpc("vpc-0123456789abcdef0")
            .send()
            .await
            .expect("CreatePrivateDnsNamespace");
        self.namespace_id(name).await
    }

    async fn namespace_id(&self, name: &str) -> String {
        let resp = self
            .sd
            .list_namespaces()
            .send()
            .await
            .expect("ListNamespaces");
        resp.namespaces()
            .iter()
            .find(|n| n.name() == Some(name))
            .and_then(|n| n.id())
            .expect("namespace just created")
            .to_owned()
    }

    /// Creates a service with custom health checking (so tests can mark instances unhealthy).
    pub async fn service(&self, namespace_id: &str, name: &str, tags: &[(&str, &str)]) -> Service {
        let mut req = self
            .sd
            .create_service()
            .name(name)
            .namespace_id(namespace_id)
            .health_check_custom_config(HealthCheckCustomConfig::builder().build());
        for (k, v) in tags {
            req = req.tags(Tag::builder().key(*k).value(*v).build().expect("tag"));
        }
        let svc = req.send().await.expect("CreateService");
        let svc = svc.service().expect("service in response");
        Service {
            id: svc.id().expect("id").to_owned(),
            arn: svc.arn().expect("arn").to_owned(),
            name: name.to_owned(),
        }
    }

    pub async fn register(&self, service_id: &str, instance_id: &str, attrs: &[(&str, &str)]) {
        let attrs: BTreeMap<_, _> = attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.sd
            .register_instance()
            .service_id(service_id)
            .instance_id(instance_id)
            .set_attributes(Some(attrs.into_iter().collect()))
            .send()
            .await
            .expect("RegisterInstance");
    }

    /// Registers an ECS-like task: IPv4, cluster, service and task definition attributes.
    pub async fn register_task(&self, service_id: &str, task_id: &str, ip: &str) {
        self.register(
            service_id,
            task_id,
            &[
                ("AWS_INSTANCE_IPV4", ip),
                ("ECS_CLUSTER_NAME", "ecs-adot-cluster"),
                ("ECS_SERVICE_NAME", "WebAppService"),
                ("ECS_TASK_DEFINITION_FAMILY", "WebAppTask"),
                ("AVAILABILITY_ZONE", "us-east-1a"),
            ],
        )
        .await;
    }

    pub async fn deregister(&self, service_id: &str, instance_id: &str) {
        self.sd
            .deregister_instance()
            .service_id(service_id)
            .instance_id(instance_id)
            .send()
            .await
            .expect("DeregisterInstance");
    }

    pub async fn set_healthy(&self, service_id: &str, instance_id: &str, healthy: bool) {
        let status = if healthy {
            CustomHealthStatus::Healthy
        } else {
            CustomHealthStatus::Unhealthy
        };
        self.sd
            .update_instance_custom_health_status()
            .service_id(service_id)
            .instance_id(instance_id)
            .status(status)
            .send()
            .await
            .expect("UpdateInstanceCustomHealthStatus");
    }

    pub async fn tag(&self, arn: &str, key: &str, value: &str) {
        self.sd
            .tag_resource()
            .resource_arn(arn)
            .tags(Tag::builder().key(key).value(value).build().expect("tag"))
            .send()
            .await
            .expect("TagResource");
    }

    /// Puts a `String` parameter (discovery rules, ...).
    pub async fn put_string_parameter(&self, name: &str, value: &str) {
        self.ssm
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .expect("PutParameter");
    }

    pub async fn put_namespaces_parameter(&self, name: &str, value: &str) {
        self.ssm
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(aws_sdk_ssm::types::ParameterType::StringList)
            .overwrite(true)
            .send()
            .await
            .expect("PutParameter");
    }
}

/// The post's service tags.
pub const POST_TAGS: &[(&str, &str)] = &[
    ("METRICS_PATH", "/metrics"),
    ("METRICS_PORT", "3000"),
    ("ECS_METRICS_PATH", "/metrics"),
    ("ECS_METRICS_PORT", "9779"),
];
