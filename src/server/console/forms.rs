//! The console's credential forms: which fields each credential type has, and the proto
//! credential a submitted form makes. The RPC validates what it receives, as it does for any
//! caller; this only maps fields.

use std::collections::HashMap;

use crate::model::CredentialType;
use crate::pb;
use crate::pb::credential::Credential as C;

/// How a field is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// One line, shown.
    Text,
    /// One line, never shown or sent back (a password input).
    Secret,
    /// Several lines, never shown or sent back (a PEM key).
    SecretBlock,
    /// Words separated by spaces (scopes).
    List,
    /// A checkbox.
    Flag,
}

/// One field of a credential form.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    /// The form field's name (`cred_` + the proto field).
    pub name: &'static str,
    /// What the admin reads.
    pub label: &'static str,
    /// How it is entered.
    pub input: Input,
}

macro_rules! f {
    ($name:expr, $label:expr, $input:expr) => {
        Field {
            name: $name,
            label: $label,
            input: $input,
        }
    };
}

const CLIENT_ID: Field = f!("cred_client_id", "Client id", Input::Text);
const CLIENT_SECRET: Field = f!("cred_client_secret", "Client secret", Input::Secret);
const USERNAME: Field = f!("cred_username", "Username", Input::Text);
const PASSWORD: Field = f!("cred_password", "Password", Input::Secret);
const SCOPES: Field = f!("cred_scopes", "Scopes (space-separated)", Input::List);

/// The fields of credential type `t`, in the order the form shows them.
pub fn fields(t: CredentialType) -> &'static [Field] {
    use CredentialType as T;
    match t {
        T::PersonalAccessToken => &[
            f!("cred_token", "Personal access token", Input::Secret),
            f!(
                "cred_username",
                "Username (where the vendor needs one)",
                Input::Text
            ),
        ],
        T::ApiKey => &[f!("cred_key", "API key", Input::Secret)],
        T::Basic => &[USERNAME, PASSWORD],
        T::OAuthClientCredentials => &[CLIENT_ID, CLIENT_SECRET, SCOPES],
        T::OAuthRefreshToken => &[
            CLIENT_ID,
            CLIENT_SECRET,
            f!("cred_refresh_token", "Refresh token", Input::Secret),
            USERNAME,
        ],
        T::OAuthPasswordGrant => &[CLIENT_ID, CLIENT_SECRET, USERNAME, PASSWORD],
        T::SalesforceLogin => &[
            USERNAME,
            PASSWORD,
            f!("cred_security_token", "Security token", Input::Secret),
            CLIENT_ID,
            CLIENT_SECRET,
        ],
        T::OAuthAuthorizationCode => &[CLIENT_ID, CLIENT_SECRET, SCOPES],
        T::EntraClientCredentials => &[
            f!("cred_tenant_id", "Tenant id", Input::Text),
            CLIENT_ID,
            CLIENT_SECRET,
            f!(
                "cred_client_certificate_pem",
                "Client certificate (PEM)",
                Input::SecretBlock
            ),
            f!(
                "cred_client_private_key_pem",
                "Certificate's private key (PEM)",
                Input::SecretBlock
            ),
            f!(
                "cred_federated_token_file",
                "Federated token file",
                Input::Text
            ),
            f!("cred_authority_url", "Authority URL", Input::Text),
        ],
        T::SalesforceJwtBearer => &[
            CLIENT_ID,
            USERNAME,
            f!(
                "cred_private_key_pem",
                "Private key (PEM)",
                Input::SecretBlock
            ),
            f!("cred_login_url", "Login URL", Input::Text),
        ],
        T::EmailApiToken => &[
            f!("cred_email", "Account email", Input::Text),
            f!("cred_token", "API token", Input::Secret),
            f!("cred_scoped", "Scoped token", Input::Flag),
        ],
    }
}

/// The credential a submitted form for type `t` makes.
pub fn credential(t: CredentialType, form: &HashMap<String, String>) -> pb::Credential {
    let s = |name: &str| form.get(name).cloned().unwrap_or_default();
    let scopes = || {
        s("cred_scopes")
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    use CredentialType as T;
    let c = match t {
        T::PersonalAccessToken => C::PersonalAccessToken(pb::PersonalAccessToken {
            token: s("cred_token"),
            username: s("cred_username"),
            expires_at: None,
        }),
        T::ApiKey => C::ApiKey(pb::ApiKey {
            key: s("cred_key"),
            expires_at: None,
        }),
        T::Basic => C::Basic(pb::BasicCredential {
            username: s("cred_username"),
            password: s("cred_password"),
        }),
        T::OAuthClientCredentials => C::OauthClientCredentials(pb::OAuthClientCredentials {
            client_id: s("cred_client_id"),
            client_secret: s("cred_client_secret"),
            scopes: scopes(),
            secret_expires_at: None,
        }),
        T::OAuthRefreshToken => C::OauthRefreshToken(pb::OAuthRefreshToken {
            client_id: s("cred_client_id"),
            client_secret: s("cred_client_secret"),
            refresh_token: s("cred_refresh_token"),
            username: s("cred_username"),
        }),
        T::OAuthPasswordGrant => C::OauthPasswordGrant(pb::OAuthPasswordGrant {
            client_id: s("cred_client_id"),
            client_secret: s("cred_client_secret"),
            username: s("cred_username"),
            password: s("cred_password"),
        }),
        T::SalesforceLogin => C::SalesforceLogin(pb::SalesforceLogin {
            username: s("cred_username"),
            password: s("cred_password"),
            security_token: s("cred_security_token"),
            client_id: s("cred_client_id"),
            client_secret: s("cred_client_secret"),
        }),
        T::OAuthAuthorizationCode => C::OauthAuthorizationCode(pb::OAuthAuthorizationCode {
            client_id: s("cred_client_id"),
            client_secret: s("cred_client_secret"),
            scopes: scopes(),
        }),
        T::EntraClientCredentials => C::EntraClientCredentials(pb::EntraClientCredentials {
            tenant_id: s("cred_tenant_id"),
            client_id: s("cred_client_id"),
            client_secret: s("cred_client_secret"),
            client_certificate_pem: s("cred_client_certificate_pem"),
            client_private_key_pem: s("cred_client_private_key_pem"),
            federated_token_file: s("cred_federated_token_file"),
            authority_url: s("cred_authority_url"),
            secret_expires_at: None,
        }),
        T::SalesforceJwtBearer => C::SalesforceJwtBearer(pb::SalesforceJwtBearer {
            client_id: s("cred_client_id"),
            username: s("cred_username"),
            private_key_pem: s("cred_private_key_pem"),
            login_url: s("cred_login_url"),
        }),
        T::EmailApiToken => C::EmailApiToken(pb::EmailApiToken {
            email: s("cred_email"),
            token: s("cred_token"),
            expires_at: None,
            scoped: form.contains_key("cred_scoped"),
        }),
    };
    pb::Credential {
        credential: Some(c),
    }
}

/// The credential type named `slug` (its proto field name).
pub fn credential_type(slug: &str) -> Option<CredentialType> {
    CredentialType::ALL
        .into_iter()
        .find(|t| t.field_name() == slug)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_a_form_shows_reaches_the_credential() {
        for t in CredentialType::ALL {
            let form: HashMap<String, String> = fields(t)
                .iter()
                .map(|f| (f.name.to_owned(), format!("v-{}", f.name)))
                .collect();
            // The wire form (the proto types' Debug redacts secrets).
            let wire =
                String::from_utf8_lossy(&prost::Message::encode_to_vec(&credential(t, &form)))
                    .into_owned();
            for field in fields(t).iter().filter(|f| f.input != Input::Flag) {
                assert!(
                    wire.contains(&format!("v-{}", field.name)),
                    "{t:?} {}",
                    field.name
                );
            }
        }
    }
}
