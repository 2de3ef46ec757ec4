"""Creates the post's Cloud Map and SSM setup on a local moto server.

Namespace `ecs-services` (private DNS), service `webapp-svc` tagged like the post,
the SSM parameter with the namespace list, and one instance per given IP.
"""
import sys

import boto3

endpoint, ips = sys.argv[1], sys.argv[2:]
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="test", aws_secret_access_key="test")
sd = boto3.client("servicediscovery", **kw)
ssm = boto3.client("ssm", **kw)

sd.create_private_dns_namespace(Name="ecs-services", Vpc="vpc-0123456789abcdef0")
ns_id = next(n["Id"] for n in sd.list_namespaces()["Namespaces"] if n["Name"] == "ecs-services")
svc = sd.create_service(
    Name="webapp-svc", NamespaceId=ns_id,
    HealthCheckCustomConfig={},
    Tags=[{"Key": k, "Value": v} for k, v in [
        ("METRICS_PATH", "/metrics"), ("METRICS_PORT", "3000"),
        ("ECS_METRICS_PATH", "/metrics"), ("ECS_METRICS_PORT", "9779")]],
)["Service"]
for i, ip in enumerate(ips):
    sd.register_instance(ServiceId=svc["Id"], InstanceId=f"task{i:02d}0dc5c05b56df432ab6ff2f52f40", Attributes={
        "AWS_INSTANCE_IPV4": ip,
        "ECS_CLUSTER_NAME": "ecs-adot-cluster",
        "ECS_SERVICE_NAME": "WebAppService",
        "ECS_TASK_DEFINITION_FAMILY": "WebAppTask",
        "AVAILABILITY_ZONE": "us-east-1a",
    })
ssm.put_parameter(Name="ECS-ServiceDiscovery-Namespaces", Value="ecs-services", Type="StringList", Overwrite=True)
print(f"demo: namespace ecs-services, service webapp-svc, {len(ips)} instances: {' '.join(ips)}")
