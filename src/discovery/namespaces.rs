//! The list of Cloud Map namespaces to discover: parsed from the SSM parameter
//! (re-read every cycle, so operators change it without restarts) or given
//! statically with `DISCOVERY_NAMESPACES`.

use aws_sdk_ssm::operation::get_parameter::GetParameterError;

use crate::aws::AwsCallError;

/// Where the namespace list comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceSource {
    /// `DISCOVERY_NAMESPACES`: fixed for the life of the process.
    Static(Vec<String>),
    /// `DISCOVERY_NAMESPACES_PARAMETER_NAME`: an SSM parameter read every cycle.
    Ssm { parameter: String },
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum NamespaceListError {
    #[error(
        "SSM parameter {parameter:?} does not exist: create it with the comma-separated Cloud Map \
         namespace names (e.g. `aws ssm put-parameter --name {parameter} --type StringList --value \
         ns-a,ns-b`), or set DISCOVERY_NAMESPACES instead"
    )]
    ParameterNotFound { parameter: String },
    #[error(
        "SSM parameter {parameter:?} names no namespace: set it to comma-separated Cloud Map \
         namespace names; the previous list is kept"
    )]
    Empty { parameter: String },
    #[error(transparent)]
    Aws(#[from] AwsCallError),
}

/// Splits a comma-separated list, trims each name, and drops empty names and
/// repeats (the first occurrence keeps its place).
pub fn parse_namespace_list(raw: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in raw.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !out.iter().any(|seen| seen == name) {
            out.push(name.to_owned());
        }
    }
    out
}

/// Reads an SSM parameter's value; `Ok(None)` when it does not exist.
/// `String`, `StringList` and `SecureString` parameters all work (the last is
/// decrypted, which needs `kms:Decrypt` on its key).
pub async fn read_parameter(
    ssm: &aws_sdk_ssm::Client,
    parameter: &str,
) -> Result<Option<String>, AwsCallError> {
    match ssm
        .get_parameter()
        .name(parameter)
        .with_decryption(true)
        .send()
        .await
    {
        Ok(resp) => Ok(Some(
            resp.parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .to_owned(),
        )),
        Err(err) => match err.as_service_error() {
            Some(GetParameterError::ParameterNotFound(_)) => Ok(None),
            _ => Err(AwsCallError::new(
                "ssm:GetParameter",
                "ssm:GetParameter (and kms:Decrypt for a SecureString)",
                format!("parameter {parameter:?}"),
                &err,
            )),
        },
    }
}

/// Reads the namespace list.
pub async fn load(
    source: &NamespaceSource,
    ssm: &aws_sdk_ssm::Client,
) -> Result<Vec<String>, NamespaceListError> {
    let parameter = match source {
        NamespaceSource::Static(names) => return Ok(names.clone()),
        NamespaceSource::Ssm { parameter } => parameter,
    };
    let Some(value) = read_parameter(ssm, parameter).await? else {
        return Err(NamespaceListError::ParameterNotFound {
            parameter: parameter.clone(),
        });
    };
    let names = parse_namespace_list(&value);
    if names.is_empty() {
        return Err(NamespaceListError::Empty {
            parameter: parameter.clone(),
        });
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_trims_and_dedups() {
        assert_eq!(
            parse_namespace_list(" ecs-services, other ,,ecs-services , ,third"),
            ["ecs-services", "other", "third"]
        );
        assert!(parse_namespace_list("").is_empty());
        assert!(parse_namespace_list(" , ,").is_empty());
        assert_eq!(parse_namespace_list("a\n,\tb"), ["a", "b"]);
    }

    proptest! {
        #[test]
        fn parsed_names_are_clean_unique_and_stable(raw in "[a-c ,\t-]{0,40}") {
            let names = parse_namespace_list(&raw);
            for (i, n) in names.iter().enumerate() {
                prop_assert!(!n.is_empty());
                prop_assert_eq!(n.trim(), n.as_str());
                prop_assert!(!n.contains(','));
                prop_assert!(!names[..i].contains(n));
                prop_assert!(raw.split(',').any(|part| part.trim() == n));
            }
            // Every non-empty item of the input is kept.
            for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                prop_assert!(names.iter().any(|n| n == part));
            }
            prop_assert_eq!(parse_namespace_list(&names.join(",")), names);
        }
    }
}
