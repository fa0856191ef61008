//! EC2 errors sorted by what the engine does about them.

/// What the caller must do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The account's request bucket is empty: the call did not happen; retry later.
    Throttled,
    /// The subnet has no free address.
    InsufficientAddresses,
    /// The subnet has no free aligned /28 (prefix delegation).
    InsufficientCidr,
    /// The ENI or the instance type cannot take more addresses: resync the ENI from EC2.
    AddressLimitExceeded,
    /// No free ENI slot on the instance.
    AttachmentLimitExceeded,
    /// The ENI, attachment, instance or subnet does not exist (done, for delete and detach).
    NotFound,
    /// The ENI is attached (delete) or already attached (attach).
    InUse,
    /// The role lacks an IAM permission; the message names the action.
    Unauthorized,
    /// A parameter EC2 refused: a bug on our side or a misconfiguration.
    InvalidParameter,
    /// EC2 or the network failed; the call may or may not have happened.
    Unavailable,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{operation}: {code}: {message}")]
pub struct CloudError {
    pub kind: ErrorKind,
    pub operation: &'static str,
    /// EC2's error code, or a description of the transport failure.
    pub code: String,
    pub message: String,
}

/// EC2's error codes, by kind.
pub fn classify(code: &str) -> ErrorKind {
    match code {
        "RequestLimitExceeded" | "Throttling" | "ThrottlingException" => ErrorKind::Throttled,
        "InsufficientFreeAddressesInSubnet" => ErrorKind::InsufficientAddresses,
        "InsufficientCidrBlocks" => ErrorKind::InsufficientCidr,
        "PrivateIpAddressLimitExceeded" | "InvalidParameterValue.PrivateIpAddressLimitExceeded" => {
            ErrorKind::AddressLimitExceeded
        }
        "AttachmentLimitExceeded" => ErrorKind::AttachmentLimitExceeded,
        "InvalidNetworkInterface.InUse" => ErrorKind::InUse,
        "InvalidInstanceType" => ErrorKind::NotFound,
        "UnauthorizedOperation" | "AuthFailure" => ErrorKind::Unauthorized,
        "Unavailable" | "InternalError" | "ServiceUnavailable" | "RequestTimeout" => {
            ErrorKind::Unavailable
        }
        c if c.ends_with(".NotFound") || c.ends_with(".Malformed") && c.contains("ID") => {
            ErrorKind::NotFound
        }
        c if c.starts_with("InvalidParameter") || c == "MissingParameter" => {
            ErrorKind::InvalidParameter
        }
        _ => ErrorKind::Other,
    }
}

impl CloudError {
    pub fn new(operation: &'static str, code: &str, message: &str) -> CloudError {
        let kind = classify(code);
        let message = if kind == ErrorKind::Unauthorized {
            format!("the node's IAM role lacks ec2:{operation} ({message})")
        } else {
            message.to_string()
        };
        CloudError {
            kind,
            operation,
            code: code.to_string(),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_codes_the_engine_reacts_to() {
        assert_eq!(classify("RequestLimitExceeded"), ErrorKind::Throttled);
        assert_eq!(
            classify("InsufficientCidrBlocks"),
            ErrorKind::InsufficientCidr
        );
        assert_eq!(
            classify("InsufficientFreeAddressesInSubnet"),
            ErrorKind::InsufficientAddresses
        );
        assert_eq!(
            classify("PrivateIpAddressLimitExceeded"),
            ErrorKind::AddressLimitExceeded
        );
        assert_eq!(
            classify("AttachmentLimitExceeded"),
            ErrorKind::AttachmentLimitExceeded
        );
        assert_eq!(
            classify("InvalidNetworkInterfaceID.NotFound"),
            ErrorKind::NotFound
        );
        assert_eq!(
            classify("InvalidAttachmentID.NotFound"),
            ErrorKind::NotFound
        );
        assert_eq!(classify("InvalidNetworkInterface.InUse"), ErrorKind::InUse);
        assert_eq!(
            classify("InvalidParameterCombination"),
            ErrorKind::InvalidParameter
        );
        assert_eq!(classify("SomethingNew"), ErrorKind::Other);
    }

    #[test]
    fn unauthorized_names_the_missing_action() {
        let e = CloudError::new("CreateNetworkInterface", "UnauthorizedOperation", "denied");
        assert!(e.to_string().contains("ec2:CreateNetworkInterface"), "{e}");
    }
}
