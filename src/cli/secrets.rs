//! Credential input: non-secret fields from flags, secrets from a file, standard input, an
//! environment variable or a prompt, never from the command line.

use std::io::{IsTerminal, Read};

use anyhow::{anyhow, bail, Context, Result};

use super::format::parse_time;
use super::CredentialArgs;
use crate::model::{CredentialType, SystemKind};
use crate::pb;

fn parse_credential_type(s: &str) -> Result<CredentialType> {
    let norm = s.trim().to_ascii_lowercase().replace('-', "_");
    CredentialType::ALL
        .into_iter()
        .find(|t| t.field_name() == norm)
        .ok_or_else(|| anyhow!("unknown credential type '{s}'"))
}

/// The secret fields of a credential type, main secret first, with whether each is required.
fn secret_fields(t: CredentialType) -> &'static [(&'static str, bool)] {
    match t {
        CredentialType::PersonalAccessToken => &[("token", true)],
        CredentialType::ApiKey => &[("key", true)],
        CredentialType::Basic => &[("password", true)],
        CredentialType::OAuthClientCredentials => &[("client_secret", true)],
        CredentialType::OAuthRefreshToken => &[("client_secret", true), ("refresh_token", true)],
        CredentialType::OAuthPasswordGrant => &[("password", true), ("client_secret", true)],
        CredentialType::SalesforceLogin => &[
            ("password", true),
            ("security_token", true),
            ("client_secret", false),
        ],
        CredentialType::OAuthAuthorizationCode => &[("client_secret", true)],
        CredentialType::EmailApiToken => &[("token", true)],
        // Exactly one way in: a secret, a certificate + key, or --federated-token-file.
        CredentialType::EntraClientCredentials => &[
            ("client_secret", false),
            ("private_key", false),
            ("certificate", false),
        ],
        CredentialType::SalesforceJwtBearer => &[("private_key", true)],
    }
}

struct SecretReader {
    stdin_used: bool,
}

impl SecretReader {
    fn read(&mut self, field: &str, source: &str) -> Result<String> {
        let value = if source == "stdin" {
            if self.stdin_used {
                bail!("only one secret can come from standard input");
            }
            self.stdin_used = true;
            if std::io::stdin().is_terminal() {
                // Typed, not piped: not shown on the screen.
                return rpassword::prompt_password(format!("{field}: "))
                    .with_context(|| format!("reading {field} from the terminal"));
            }
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the secret from standard input")?;
            s
        } else if let Some(path) = source.strip_prefix("file:") {
            // The path is not repeated: a secret pasted in its place would be printed.
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {field} from the file given after file:"))?
        } else if let Some(var) = source.strip_prefix("env:") {
            // Neither the name nor the value is repeated (a value that is not UTF-8 would be
            // printed by the error itself).
            std::env::var(var).map_err(|_| {
                anyhow!("reading {field} from the environment variable given after env: it is unset or not UTF-8")
            })?
        } else {
            bail!("secret source for {field} must be file:PATH, stdin or env:VAR");
        };
        Ok(value.trim_end_matches(['\r', '\n']).to_owned())
    }
}

fn gather_secrets(
    t: CredentialType,
    a: &CredentialArgs,
) -> Result<std::collections::HashMap<&'static str, String>> {
    let fields = secret_fields(t);
    let mut reader = SecretReader { stdin_used: false };
    let mut out = std::collections::HashMap::new();
    let main = fields[0].0;
    if let Some(path) = &a.secret_file {
        out.insert(
            main,
            reader.read(main, &format!("file:{}", path.display()))?,
        );
    }
    if a.secret_stdin {
        if out.contains_key(main) {
            bail!("--secret-file and --secret-stdin both give {main}");
        }
        out.insert(main, reader.read(main, "stdin")?);
    }
    for spec in &a.secrets {
        let (field, source) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--secret takes FIELD=SOURCE, e.g. token=file:/run/pat"))?;
        let known = fields
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                // The name given is not repeated: it may be the secret itself, pasted by
                // mistake (a base64 value holds '=').
                let names: Vec<&str> = fields.iter().map(|(f, _)| *f).collect();
                anyhow!(
                    "{} has no secret field by the name given before '=' in --secret (fields: {})",
                    t,
                    names.join(", ")
                )
            })?;
        if out.contains_key(known) {
            bail!("{known} is given twice (--secret-file, --secret-stdin or --secret)");
        }
        out.insert(known, reader.read(known, source)?);
    }
    for (field, required) in fields {
        if out.contains_key(field) || !required {
            continue;
        }
        if std::io::stdin().is_terminal() {
            let v = rpassword::prompt_password(format!("{field}: "))
                .with_context(|| format!("reading {field} from the terminal"))?;
            out.insert(field, v);
        } else {
            bail!(
                "{field} is required: use --secret-file PATH, --secret-stdin or --secret {field}=file:PATH \
                 (secrets are never taken from the command line)"
            );
        }
    }
    Ok(out)
}

/// Flags that only some credential types read are refused for the others, never ignored.
fn refuse_foreign_flags(t: CredentialType, a: &CredentialArgs) -> Result<()> {
    use CredentialType as C;
    let email_token = t == C::EmailApiToken;
    if a.email.is_some() && !email_token {
        bail!("--email is for --credential-type email-api-token, not {t}");
    }
    if a.scoped && !email_token {
        bail!("--scoped is for --credential-type email-api-token, not {t}");
    }
    let expiring = matches!(
        t,
        C::PersonalAccessToken
            | C::ApiKey
            | C::EmailApiToken
            | C::OAuthClientCredentials
            | C::EntraClientCredentials
    );
    if a.expires_at.is_some() && !expiring {
        bail!("--expires-at does not apply to {t}");
    }
    let entra = t == C::EntraClientCredentials;
    for (given, flag) in [
        (a.tenant_id.is_some(), "--tenant-id"),
        (a.authority_url.is_some(), "--authority-url"),
        (a.federated_token_file.is_some(), "--federated-token-file"),
    ] {
        if given && !entra {
            bail!("{flag} is for --credential-type entra-client-credentials, not {t}");
        }
    }
    if a.login_url.is_some() && t != C::SalesforceJwtBearer {
        bail!("--login-url is for --credential-type salesforce-jwt-bearer, not {t}");
    }
    Ok(())
}

pub(super) fn build_credential(kind: SystemKind, a: &CredentialArgs) -> Result<pb::Credential> {
    use pb::credential::Credential as C;
    let t = match &a.credential_type {
        Some(s) => parse_credential_type(s)?,
        None => kind.accepted_credentials()[0],
    };
    refuse_foreign_flags(t, a)?;
    let mut s = gather_secrets(t, a)?;
    let mut take = |f: &str| s.remove(f).unwrap_or_default();
    let username = a.username.clone().unwrap_or_default();
    let expires_at = a
        .expires_at
        .as_deref()
        .map(parse_time)
        .transpose()?
        .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 });
    let client_id = a.client_id.clone().unwrap_or_default();
    let inner = match t {
        CredentialType::PersonalAccessToken => C::PersonalAccessToken(pb::PersonalAccessToken {
            token: take("token"),
            username,
            expires_at,
        }),
        CredentialType::ApiKey => C::ApiKey(pb::ApiKey {
            key: take("key"),
            expires_at,
        }),
        CredentialType::EntraClientCredentials => {
            C::EntraClientCredentials(pb::EntraClientCredentials {
                tenant_id: a.tenant_id.clone().unwrap_or_default(),
                client_id,
                client_secret: take("client_secret"),
                client_certificate_pem: take("certificate"),
                client_private_key_pem: take("private_key"),
                federated_token_file: a.federated_token_file.clone().unwrap_or_default(),
                authority_url: a.authority_url.clone().unwrap_or_default(),
                secret_expires_at: expires_at,
            })
        }
        CredentialType::SalesforceJwtBearer => C::SalesforceJwtBearer(pb::SalesforceJwtBearer {
            client_id,
            username,
            private_key_pem: take("private_key"),
            login_url: a.login_url.clone().unwrap_or_default(),
        }),
        CredentialType::EmailApiToken => C::EmailApiToken(pb::EmailApiToken {
            email: a.email.clone().unwrap_or_default(),
            token: take("token"),
            expires_at,
            scoped: a.scoped,
        }),
        CredentialType::Basic => C::Basic(pb::BasicCredential {
            username,
            password: take("password"),
        }),
        CredentialType::OAuthClientCredentials => {
            C::OauthClientCredentials(pb::OAuthClientCredentials {
                client_id,
                client_secret: take("client_secret"),
                scopes: a.scopes.clone(),
                secret_expires_at: expires_at,
            })
        }
        CredentialType::OAuthRefreshToken => C::OauthRefreshToken(pb::OAuthRefreshToken {
            client_id,
            client_secret: take("client_secret"),
            refresh_token: take("refresh_token"),
            username,
        }),
        CredentialType::OAuthPasswordGrant => C::OauthPasswordGrant(pb::OAuthPasswordGrant {
            client_id,
            client_secret: take("client_secret"),
            username,
            password: take("password"),
        }),
        CredentialType::SalesforceLogin => C::SalesforceLogin(pb::SalesforceLogin {
            username,
            password: take("password"),
            security_token: take("security_token"),
            client_id,
            client_secret: take("client_secret"),
        }),
        CredentialType::OAuthAuthorizationCode => {
            C::OauthAuthorizationCode(pb::OAuthAuthorizationCode {
                client_id,
                client_secret: take("client_secret"),
                scopes: a.scopes.clone(),
            })
        }
    };
    Ok(pb::Credential {
        credential: Some(inner),
    })
}
