//! The broker's one error type and its one mapping to `tonic::Status`.
//!
//! Variants are named for what they mean. Messages are written for the caller and never contain a
//! secret or a raw upstream body; storage, crypto and unexpected errors become `Internal` with a
//! fixed message while the detail is logged server-side.

use tonic::{Code, Status};

/// Every error an RPC can end with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The request is malformed; `field` names the offending field.
    #[error("invalid {field}: {message}")]
    InvalidArgument {
        /// The request field (proto name) that is wrong.
        field: &'static str,
        /// What is wrong and what to send instead.
        message: String,
    },
    /// No system or caller with that name.
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in a state that allows this (failed check, reauthorization needed, …).
    #[error("{0}")]
    FailedPrecondition(String),
    /// No or an unknown caller token.
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's role does not allow this RPC.
    #[error("{0}")]
    PermissionDenied(String),
    /// A retryable condition: starting up, storage briefly unavailable, upstream down.
    #[error("{0}")]
    Unavailable(String),
    /// A resource of the broker's own is used up (the store's disk is full).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The system kind or credential type is not implemented by this build.
    #[error("{0}")]
    Unimplemented(String),
    /// A stored record failed authentication (tampered, swapped or corrupt).
    #[error("{0}")]
    DataLoss(String),
    /// The caller went away, or its request stream broke off.
    #[error("{0}")]
    Cancelled(String),
    /// A position (a watch cursor) outside what is kept.
    #[error("{0}")]
    OutOfRange(String),
    /// Storage, crypto or another internal fault; the message is fixed and safe.
    #[error("{0}")]
    Internal(&'static str),
}

impl BrokerError {
    /// Shorthand for [`BrokerError::InvalidArgument`].
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            message: message.into(),
        }
    }

    /// The same error with `note` added to its message (an internal fault, whose message is
    /// fixed, becomes `Unavailable` to carry it).
    pub fn noted(self, note: &str) -> Self {
        let add = |m: String| format!("{m}; {note}");
        match self {
            Self::InvalidArgument { field, message } => Self::InvalidArgument {
                field,
                message: add(message),
            },
            Self::NotFound(m) => Self::NotFound(add(m)),
            Self::AlreadyExists(m) => Self::AlreadyExists(add(m)),
            Self::FailedPrecondition(m) => Self::FailedPrecondition(add(m)),
            Self::Unauthenticated(m) => Self::Unauthenticated(add(m)),
            Self::PermissionDenied(m) => Self::PermissionDenied(add(m)),
            Self::Unavailable(m) => Self::Unavailable(add(m)),
            Self::ResourceExhausted(m) => Self::ResourceExhausted(add(m)),
            Self::Unimplemented(m) => Self::Unimplemented(add(m)),
            Self::DataLoss(m) => Self::DataLoss(add(m)),
            Self::Cancelled(m) => Self::Cancelled(add(m)),
            Self::OutOfRange(m) => Self::OutOfRange(add(m)),
            Self::Internal(m) => Self::Unavailable(add(m.to_owned())),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::Unavailable(_) => Code::Unavailable,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::DataLoss(_) => Code::DataLoss,
            Self::Cancelled(_) => Code::Cancelled,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::Internal(_) => Code::Internal,
        }
    }
}

impl From<BrokerError> for Status {
    fn from(err: BrokerError) -> Self {
        Status::new(err.code(), err.to_string())
    }
}

/// The canonical gRPC code name (`PERMISSION_DENIED`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_names_the_field() {
        let status: Status = BrokerError::invalid("base_url", "must be https").into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("base_url"));
    }
}
