//! AWS SDK plumbing shared by every module that calls AWS: client construction
//! (region, endpoint, retries, timeouts), request accounting, and errors that
//! name the operation, the resource and the IAM action at fault.
//!
//! Throttling (`ThrottlingException`, `RequestLimitExceeded`, ...) is retried by
//! the SDK's standard retry strategy, which backs off exponentially with full
//! jitter; this module only sizes it. Every HTTP attempt is counted per service,
//! operation and outcome, so a discovery cycle can report what it cost. Cloud Map
//! calls are paced on the client side ([`pacer`]).

pub mod pacer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::endpoint::EndpointPrefix;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextMut, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

/// Error codes AWS uses for throttling. The SDK retries these by itself; they are
/// listed here to count them and to word the final error.
const THROTTLING_CODES: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ProvisionedThroughputExceededException",
    "RequestThrottled",
    "RequestThrottledException",
];

/// How the SDK clients are built.
#[derive(Clone, Debug)]
pub struct AwsOptions {
    /// `None`: the SDK's default chain (environment, profile, ECS/IMDS).
    pub region: Option<String>,
    /// A custom endpoint (moto, LocalStack, a VPC endpoint). `None`: AWS itself.
    pub endpoint_url: Option<String>,
    /// Limit for one HTTP attempt; a whole call (with retries) gets three times this.
    pub call_timeout: Duration,
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Cloud Map calls per second at most, in all (`AWS_MAX_RPS`).
    pub max_rps: f64,
}

/// The AWS clients shard-sd uses, with their shared request accounting.
#[derive(Clone, Debug)]
pub struct AwsClients {
    pub sdk: aws_config::SdkConfig,
    pub ssm: aws_sdk_ssm::Client,
    pub cloudmap: aws_sdk_servicediscovery::Client,
    /// For the host ports of bridge-mode tasks (`DescribeTasks` only).
    pub ecs: aws_sdk_ecs::Client,
    /// Every Cloud Map call waits its turn here.
    pub pacer: Arc<pacer::Pacer>,
    pub stats: Arc<RequestStats>,
    pub region: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AwsSetupError {
    #[error(
        "no AWS region configured: set AWS_REGION (ECS sets it for tasks), or AWS_DEFAULT_REGION, \
         or a region in the AWS profile"
    )]
    NoRegion,
}

/// Builds the clients. Reads credentials lazily: a missing credential shows up as
/// an error on the first call, naming the call.
pub async fn connect(opts: &AwsOptions) -> Result<AwsClients, AwsSetupError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(opts.max_attempts.max(1))
                .with_initial_backoff(Duration::from_millis(200))
                .with_max_backoff(Duration::from_secs(5)),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(opts.call_timeout.min(Duration::from_secs(5)))
                .operation_attempt_timeout(opts.call_timeout)
                .operation_timeout(opts.call_timeout * 3)
                .build(),
        );
    if let Some(region) = &opts.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    if let Some(url) = &opts.endpoint_url {
        loader = loader.endpoint_url(url.clone());
    }
    let mut clients = clients_from(&loader.load().await)?;
    clients.pacer = Arc::new(pacer::Pacer::new(Some(opts.max_rps), clients.stats.clone()));
    Ok(clients)
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// `AWS_ENDPOINT_URL_<SERVICE>`, which wins over `AWS_ENDPOINT_URL` as in the AWS
/// SDKs' own precedence (an empty value counts as unset).
fn service_endpoint(env: &impl Fn(&str) -> Option<String>, service: &str) -> Option<String> {
    env(&format!("AWS_ENDPOINT_URL_{service}")).filter(|url| !url.trim().is_empty())
}

/// Builds the clients from an SDK configuration (tests pass their own), with
/// unpaced Cloud Map calls.
pub fn clients_from(sdk: &aws_config::SdkConfig) -> Result<AwsClients, AwsSetupError> {
    let region = sdk.region().ok_or(AwsSetupError::NoRegion)?.to_string();
    let stats = Arc::new(RequestStats::default());
    let custom_endpoint =
        sdk.endpoint_url().is_some() || service_endpoint(&env_var, "SERVICEDISCOVERY").is_some();

    let mut ssm =
        aws_sdk_ssm::config::Builder::from(sdk).interceptor(CountRequests::other(stats.clone()));
    if let Some(url) = service_endpoint(&env_var, "SSM") {
        ssm = ssm.endpoint_url(url);
    }
    let mut cloudmap = aws_sdk_servicediscovery::config::Builder::from(sdk)
        .interceptor(CountRequests::cloud_map(stats.clone()));
    if let Some(url) = service_endpoint(&env_var, "SERVICEDISCOVERY") {
        cloudmap = cloudmap.endpoint_url(url);
    }
    let mut ecs =
        aws_sdk_ecs::config::Builder::from(sdk).interceptor(CountRequests::other(stats.clone()));
    if let Some(url) = service_endpoint(&env_var, "ECS") {
        ecs = ecs.endpoint_url(url);
    }
    if custom_endpoint {
        // DiscoverInstances is a data-plane call: the SDK prefixes the host with
        // `data-`, which only resolves on AWS's own endpoints.
        cloudmap = cloudmap.interceptor(NoHostPrefix);
    }
    Ok(AwsClients {
        sdk: sdk.clone(),
        ssm: aws_sdk_ssm::Client::from_conf(ssm.build()),
        cloudmap: aws_sdk_servicediscovery::Client::from_conf(cloudmap.build()),
        ecs: aws_sdk_ecs::Client::from_conf(ecs.build()),
        pacer: Arc::new(pacer::Pacer::new(None, stats.clone())),
        stats,
        region,
    })
}

impl AwsClients {
    /// A DynamoDB client for leases: an attempt may take at most `attempt_timeout`
    /// and a call with its retries `call_timeout`, so a slow table makes a renewal
    /// fail before the renew deadline rather than after it.
    pub fn dynamodb(
        &self,
        attempt_timeout: Duration,
        call_timeout: Duration,
    ) -> aws_sdk_dynamodb::Client {
        let conf = aws_sdk_dynamodb::config::Builder::from(&self.sdk)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(attempt_timeout)
                    .operation_attempt_timeout(attempt_timeout)
                    .operation_timeout(call_timeout)
                    .build(),
            )
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(50))
                    .with_max_backoff(attempt_timeout),
            )
            .interceptor(CountRequests::other(self.stats.clone()));
        let conf = match service_endpoint(&env_var, "DYNAMODB") {
            Some(url) => conf.endpoint_url(url),
            None => conf,
        };
        aws_sdk_dynamodb::Client::from_conf(conf.build())
    }

    /// An SQS client for the events queue: an attempt may last a long poll of
    /// `long_poll` and `margin` more.
    pub fn sqs(&self, long_poll: Duration, margin: Duration) -> aws_sdk_sqs::Client {
        let conf = aws_sdk_sqs::config::Builder::from(&self.sdk)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(margin)
                    .operation_attempt_timeout(long_poll + margin)
                    .operation_timeout(long_poll + 2 * margin)
                    .build(),
            )
            // The consumer retries, backing off, and falls back meanwhile.
            .retry_config(RetryConfig::standard().with_max_attempts(1))
            .interceptor(CountRequests::other(self.stats.clone()));
        let conf = match service_endpoint(&env_var, "SQS") {
            Some(url) => conf.endpoint_url(url),
            None => conf,
        };
        aws_sdk_sqs::Client::from_conf(conf.build())
    }
}

/// Drops the `data-` host prefix of Cloud Map's data-plane operations. Installed
/// only with a custom endpoint URL, so real AWS keeps its data-plane hosts.
#[derive(Debug)]
struct NoHostPrefix;

impl Intercept for NoHostPrefix {
    fn name(&self) -> &'static str {
        "NoHostPrefix"
    }

    fn modify_before_retry_loop(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state().unset::<EndpointPrefix>();
        Ok(())
    }
}

/// Outcome of one HTTP attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    Ok,
    Throttled,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Throttled => "throttled",
            Outcome::Error => "error",
        }
    }
}

/// Labels of `shard_sd_aws_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AwsRequestLabels {
    pub service: String,
    pub operation: String,
    pub outcome: String,
}

/// HTTP attempts to AWS since start, per service, operation and outcome.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Exposed on `/metrics`.
    pub by_operation: Family<AwsRequestLabels, Counter>,
    /// Throttled attempts, exposed on `/metrics`.
    pub throttles: Counter,
    /// Throttled Cloud Map attempts only: what the pacer slows down for (a
    /// throttled lease table is another quota).
    cloud_map_throttles: AtomicU64,
    /// ECS attempts only: what bridge-mode tasks cost.
    ecs: AtomicU64,
    total: AtomicU64,
}

impl RequestStats {
    fn record(&self, service: &str, operation: &str, outcome: Outcome, cloud_map: bool) {
        self.by_operation
            .get_or_create(&AwsRequestLabels {
                service: service.to_owned(),
                operation: operation.to_owned(),
                outcome: outcome.as_str().to_owned(),
            })
            .inc();
        if outcome == Outcome::Throttled {
            self.throttles.inc();
            if cloud_map {
                self.cloud_map_throttles.fetch_add(1, Ordering::Relaxed);
            }
        }
        if service.eq_ignore_ascii_case("ecs") {
            self.ecs.fetch_add(1, Ordering::Relaxed);
        }
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// ECS attempts so far.
    pub fn ecs(&self) -> u64 {
        self.ecs.load(Ordering::Relaxed)
    }

    /// Total attempts so far.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Throttled attempts so far.
    pub fn throttled(&self) -> u64 {
        self.throttles.get()
    }

    /// Throttled Cloud Map attempts so far.
    pub fn cloud_map_throttled(&self) -> u64 {
        self.cloud_map_throttles.load(Ordering::Relaxed)
    }
}

/// Counts every HTTP attempt of one client into the shared stats.
#[derive(Debug)]
struct CountRequests {
    stats: Arc<RequestStats>,
    /// Whether the client is Cloud Map's, whose throttling the pacer answers.
    cloud_map: bool,
}

impl CountRequests {
    fn cloud_map(stats: Arc<RequestStats>) -> Self {
        CountRequests {
            stats,
            cloud_map: true,
        }
    }

    fn other(stats: Arc<RequestStats>) -> Self {
        CountRequests {
            stats,
            cloud_map: false,
        }
    }
}

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountRequests"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let (service, operation) = cfg
            .load::<Metadata>()
            .map(|m| (m.service().to_owned(), m.name().to_owned()))
            .unwrap_or_else(|| ("unknown".into(), "unknown".into()));
        let outcome = match context.response() {
            Some(resp) if resp.status().is_success() => Outcome::Ok,
            Some(resp) => {
                let body = resp.body().bytes().unwrap_or_default();
                let text = String::from_utf8_lossy(body);
                if resp.status().as_u16() == 429
                    || THROTTLING_CODES.iter().any(|c| text.contains(c))
                {
                    Outcome::Throttled
                } else {
                    Outcome::Error
                }
            }
            None => Outcome::Error,
        };
        self.stats
            .record(&service, &operation, outcome, self.cloud_map);
        Ok(())
    }
}

/// A failed AWS call, naming the operation, the resource and, for access errors,
/// the IAM action the task role lacks.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{operation} on {resource} failed: {detail}{hint}")]
pub struct AwsCallError {
    pub operation: &'static str,
    pub resource: String,
    /// The AWS error code, when the service answered with one.
    pub code: Option<String>,
    pub detail: String,
    pub(crate) hint: String,
}

impl AwsCallError {
    /// The failure without the resource: the operation, what AWS answered and
    /// the IAM hint.
    pub fn brief(&self) -> String {
        format!("{} failed: {}{}", self.operation, self.detail, self.hint)
    }

    /// `iam_action` is the permission the call needs, e.g. `servicediscovery:ListServices`.
    pub fn new<E, R>(
        operation: &'static str,
        iam_action: &'static str,
        resource: impl Into<String>,
        err: &SdkError<E, R>,
    ) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        let code = err.code().map(str::to_owned);
        let detail = match (&code, err.message()) {
            (Some(code), Some(msg)) => format!("{code}: {msg}"),
            (Some(code), None) => code.clone(),
            _ => DisplayErrorContext(err).to_string(),
        };
        let hint = match code.as_deref() {
            Some(c) if c.contains("AccessDenied") || c == "UnauthorizedOperation" => {
                format!(" (grant IAM action {iam_action} to the task role)")
            }
            Some(c) if THROTTLING_CODES.contains(&c) => {
                " (throttled after all retries; the previous result is kept)".to_owned()
            }
            Some(c)
                if c.contains("Credential") || c.contains("Token") || c.contains("Signature") =>
            {
                " (check the task role or AWS credentials)".to_owned()
            }
            Some(_) => String::new(),
            None => " (check network access to the AWS endpoint)".to_owned(),
        };
        AwsCallError {
            operation,
            resource: resource.into(),
            code,
            detail,
            hint,
        }
    }

    /// An error found in a response rather than returned by AWS.
    pub fn local(
        operation: &'static str,
        resource: impl Into<String>,
        detail: impl std::fmt::Display,
    ) -> Self {
        AwsCallError {
            operation,
            resource: resource.into(),
            code: None,
            detail: detail.to_string(),
            hint: String::new(),
        }
    }

    pub fn is_throttling(&self) -> bool {
        self.code
            .as_deref()
            .is_some_and(|c| THROTTLING_CODES.contains(&c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_specific_endpoint_wins_and_empty_means_unset() {
        let env = |name: &str| match name {
            "AWS_ENDPOINT_URL_DYNAMODB" => Some("http://127.0.0.1:7000".to_owned()),
            "AWS_ENDPOINT_URL_SSM" => Some("  ".to_owned()),
            _ => None,
        };
        assert_eq!(
            service_endpoint(&env, "DYNAMODB").as_deref(),
            Some("http://127.0.0.1:7000")
        );
        assert_eq!(service_endpoint(&env, "SSM"), None);
        assert_eq!(service_endpoint(&env, "SERVICEDISCOVERY"), None);
    }
}
