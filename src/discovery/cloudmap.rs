//! Thin wrappers over the Cloud Map calls discovery makes. Each returns plain
//! data or an [`AwsCallError`] naming the resource, so the cycle logic in the
//! parent module stays free of SDK types. Every call, and every page of a list,
//! first waits its turn at the [`Pacer`].

use std::collections::{BTreeMap, HashMap};

use aws_sdk_servicediscovery::types::{
    FilterCondition, HealthStatusFilter, ServiceFilter, ServiceFilterName,
};
use aws_sdk_servicediscovery::Client;

use super::HealthStatus;
use crate::aws::pacer::Pacer;
use crate::aws::AwsCallError;
use crate::targets::Instance;

/// `DiscoverInstances` returns at most this many instances and has no pagination.
pub const DISCOVER_MAX_RESULTS: i32 = 1000;
/// Page size of the list calls (the API maximum).
const PAGE_SIZE: i32 = 100;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceRef {
    pub id: String,
    pub name: String,
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub id: String,
    pub arn: String,
    pub name: String,
}

/// All namespaces of every type (DNS_PRIVATE, DNS_PUBLIC, HTTP), all pages.
pub async fn list_namespaces(
    cm: &Client,
    pacer: &Pacer,
) -> Result<Vec<NamespaceRef>, AwsCallError> {
    let mut pages = cm
        .list_namespaces()
        .max_results(PAGE_SIZE)
        .into_paginator()
        .send();
    let mut out = Vec::new();
    while let Some(page) = {
        pacer.wait().await;
        pages.next().await
    } {
        let page = page.map_err(|e| {
            AwsCallError::new(
                "servicediscovery:ListNamespaces",
                "servicediscovery:ListNamespaces",
                "the account's namespaces",
                &e,
            )
        })?;
        for ns in page.namespaces() {
            if let (Some(id), Some(name)) = (ns.id(), ns.name()) {
                out.push(NamespaceRef {
                    id: id.to_owned(),
                    name: name.to_owned(),
                    kind: ns
                        .r#type()
                        .map(|t| t.as_str().to_owned())
                        .unwrap_or_default(),
                });
            }
        }
    }
    Ok(out)
}

/// Services listed under a namespace, all pages. The `NAMESPACE_ID` filter is a
/// hint only: callers confirm each service's namespace with [`service_namespace`].
pub async fn list_services(
    cm: &Client,
    pacer: &Pacer,
    ns: &NamespaceRef,
) -> Result<Vec<ServiceRef>, AwsCallError> {
    let filter = ServiceFilter::builder()
        .name(ServiceFilterName::NamespaceId)
        .values(&ns.id)
        .condition(FilterCondition::Eq)
        .build()
        .map_err(|e| {
            AwsCallError::local(
                "servicediscovery:ListServices",
                format!("namespace {:?}", ns.name),
                e,
            )
        })?;
    let mut pages = cm
        .list_services()
        .filters(filter)
        .max_results(PAGE_SIZE)
        .into_paginator()
        .send();
    let mut out = Vec::new();
    while let Some(page) = {
        pacer.wait().await;
        pages.next().await
    } {
        let page = page.map_err(|e| {
            AwsCallError::new(
                "servicediscovery:ListServices",
                "servicediscovery:ListServices",
                format!("namespace {:?} ({})", ns.name, ns.id),
                &e,
            )
        })?;
        for svc in page.services() {
            if let (Some(id), Some(arn), Some(name)) = (svc.id(), svc.arn(), svc.name()) {
                out.push(ServiceRef {
                    id: id.to_owned(),
                    arn: arn.to_owned(),
                    name: name.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

/// The namespace id a service belongs to (immutable, so callers cache it).
pub async fn service_namespace(
    cm: &Client,
    pacer: &Pacer,
    svc: &ServiceRef,
) -> Result<String, AwsCallError> {
    let resource = || format!("service {:?} ({})", svc.name, svc.id);
    pacer.wait().await;
    let resp = cm.get_service().id(&svc.id).send().await.map_err(|e| {
        AwsCallError::new(
            "servicediscovery:GetService",
            "servicediscovery:GetService",
            resource(),
            &e,
        )
    })?;
    resp.service()
        .and_then(|s| s.namespace_id())
        .map(str::to_owned)
        .ok_or_else(|| {
            AwsCallError::local(
                "servicediscovery:GetService",
                resource(),
                "response has no NamespaceId",
            )
        })
}

pub async fn service_tags(
    cm: &Client,
    pacer: &Pacer,
    svc: &ServiceRef,
) -> Result<BTreeMap<String, String>, AwsCallError> {
    pacer.wait().await;
    let resp = cm
        .list_tags_for_resource()
        .resource_arn(&svc.arn)
        .send()
        .await
        .map_err(|e| {
            AwsCallError::new(
                "servicediscovery:ListTagsForResource",
                "servicediscovery:ListTagsForResource",
                format!("service {:?} ({})", svc.name, svc.arn),
                &e,
            )
        })?;
    Ok(resp
        .tags()
        .iter()
        .map(|t| (t.key().to_owned(), t.value().to_owned()))
        .collect())
}

pub async fn instances_revision(
    cm: &Client,
    pacer: &Pacer,
    namespace: &str,
    service: &str,
) -> Result<Option<i64>, AwsCallError> {
    pacer.wait().await;
    let resp = cm
        .discover_instances_revision()
        .namespace_name(namespace)
        .service_name(service)
        .send()
        .await
        .map_err(|e| {
            AwsCallError::new(
                "servicediscovery:DiscoverInstancesRevision",
                "servicediscovery:DiscoverInstancesRevision",
                format!("service {service:?} in namespace {namespace:?}"),
                &e,
            )
        })?;
    Ok(resp.instances_revision())
}

/// An instance as `DiscoverInstances` returned it, before its strings are shared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawInstance {
    pub id: String,
    pub attributes: HashMap<String, String>,
}

impl RawInstance {
    /// Whether `known` holds the same id and attributes.
    pub fn is(&self, known: &Instance) -> bool {
        *known.id == *self.id
            && known.attributes.len() == self.attributes.len()
            && known
                .attributes
                .iter()
                .all(|(k, v)| self.attributes.get(k).is_some_and(|mine| mine == v))
    }
}

/// The instances of a service, filtered by health, and the revision they belong to.
pub async fn discover_instances(
    cm: &Client,
    pacer: &Pacer,
    namespace: &str,
    service: &str,
    health: HealthStatus,
) -> Result<(Vec<RawInstance>, Option<i64>), AwsCallError> {
    pacer.wait().await;
    let resp = cm
        .discover_instances()
        .namespace_name(namespace)
        .service_name(service)
        .health_status(health_filter(health))
        .max_results(DISCOVER_MAX_RESULTS)
        .send()
        .await
        .map_err(|e| {
            AwsCallError::new(
                "servicediscovery:DiscoverInstances",
                "servicediscovery:DiscoverInstances",
                format!("service {service:?} in namespace {namespace:?}"),
                &e,
            )
        })?;
    let instances = resp
        .instances()
        .iter()
        .filter_map(|i| {
            Some(RawInstance {
                id: i.instance_id()?.to_owned(),
                attributes: i.attributes().cloned().unwrap_or_default(),
            })
        })
        .collect();
    Ok((instances, resp.instances_revision()))
}

fn health_filter(health: HealthStatus) -> HealthStatusFilter {
    match health {
        HealthStatus::Healthy => HealthStatusFilter::Healthy,
        HealthStatus::Unhealthy => HealthStatusFilter::Unhealthy,
        HealthStatus::All => HealthStatusFilter::All,
        HealthStatus::HealthyOrElseAll => HealthStatusFilter::HealthyOrElseAll,
    }
}
