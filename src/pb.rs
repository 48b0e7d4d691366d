//! Generated protobuf and gRPC types for `credbroker.v1`, plus redacting `Debug` impls for every
//! message that carries a secret (their derived `Debug` is switched off in `build.rs`).

// Generated code: its long functions are not ours to split.
#![allow(
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines
)]

use std::fmt;

tonic::include_proto!("credbroker.v1");

/// The encoded `FileDescriptorSet` for server reflection (the same set the code came from).
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/credbroker_descriptor.bin"));

macro_rules! redacted_debug {
    ($($t:ident),* $(,)?) => {
        $(impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($t)).finish_non_exhaustive()
            }
        })*
    };
}

redacted_debug!(
    PersonalAccessToken,
    ApiKey,
    BasicCredential,
    OAuthClientCredentials,
    OAuthRefreshToken,
    OAuthPasswordGrant,
    SalesforceLogin,
    OAuthAuthorizationCode,
    EmailApiToken,
    EntraClientCredentials,
    SalesforceJwtBearer,
);

impl fmt::Debug for HttpHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpHeader")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for CreateCallerResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateCallerResponse")
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_messages_redact_in_debug() {
        let canary = "canary-5f3a9";
        let req = RegisterSystemRequest {
            credential: Some(Credential {
                credential: Some(credential::Credential::PersonalAccessToken(
                    PersonalAccessToken {
                        token: canary.into(),
                        ..Default::default()
                    },
                )),
            }),
            ..Default::default()
        };
        let resp = GetAccessTokenResponse {
            headers: vec![HttpHeader {
                name: "authorization".into(),
                value: format!("Bearer {canary}"),
            }],
            ..Default::default()
        };
        let caller = CreateCallerResponse {
            token: canary.into(),
            ..Default::default()
        };
        for s in [
            format!("{req:?}"),
            format!("{resp:?}"),
            format!("{caller:?}"),
        ] {
            assert!(!s.contains(canary), "{s}");
        }
    }
}
