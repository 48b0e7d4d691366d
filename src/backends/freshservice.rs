//! Freshservice: an agent's API key (Profile Settings → Your API Key; the role needs the "API
//! Key" permission), Basic `key:X`. API v2 works only on `https://{domain}.freshservice.com`,
//! not on custom domains.

use async_trait::async_trait;

use super::freshworks::{self, Product};
use super::{Backend, BackendContext, BackendError, EgressPolicy, Issued, Target};
use crate::model::{AuthCheck, SystemKind};

/// The role permission Freshservice needs for API keys.
pub const API_KEY_PERMISSION: &str = "API Key (role permission)";

const PRODUCT: Product = Product {
    vendor: "Freshservice",
    key_location: "Profile Settings → Your API Key",
    url_hint: "Freshservice's API v2 works only on your {domain}.freshservice.com address, not on \
               a custom domain; enter e.g. https://acme.freshservice.com",
    me_forbidden: Some((
        API_KEY_PERMISSION,
        "an Account Admin must turn on the \"API Key\" permission for this agent's role",
    )),
};

/// The Freshservice backend.
pub struct FreshserviceBackend {
    ctx: BackendContext,
}

impl FreshserviceBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

#[async_trait]
impl Backend for FreshserviceBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::Freshservice
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        freshworks::canonical_root(raw, egress, ".freshservice.com", false, PRODUCT.url_hint)
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        freshworks::verify(&self.ctx, &PRODUCT, target, issued).await
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        freshworks::issue(&PRODUCT, target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let ctx = BackendContext::for_tests();
        let fs = FreshserviceBackend::new(ctx.clone());
        let fd = crate::backends::freshdesk::FreshdeskBackend::new(ctx);
        let p = EgressPolicy::default();
        assert_eq!(
            fs.canonical_base_url("ACME.freshservice.com/", &p).unwrap(),
            "https://acme.freshservice.com"
        );
        assert_eq!(
            fs.canonical_base_url("https://acme.freshservice.com/api/v2", &p)
                .unwrap(),
            "https://acme.freshservice.com"
        );
        let err = fs
            .canonical_base_url("https://help.acme.com", &p)
            .unwrap_err();
        assert!(err.contains("custom domain"), "{err}");
        assert!(fs
            .canonical_base_url("https://acme.freshdesk.com", &p)
            .is_err());
        assert_eq!(
            fd.canonical_base_url("https://acme.freshdesk.com/", &p)
                .unwrap(),
            "https://acme.freshdesk.com"
        );
        assert_eq!(
            fd.canonical_base_url("support.acme.com", &p).unwrap(),
            "https://support.acme.com"
        );
        assert!(fd
            .canonical_base_url("https://acme.freshservice.com", &p)
            .is_err());
        let allow = EgressPolicy {
            allow_http: true,
            allow: crate::backends::egress::AllowList::parse("127.0.0.1").unwrap(),
            ..Default::default()
        };
        assert_eq!(
            fd.canonical_base_url("http://127.0.0.1:5/api/v2", &allow)
                .unwrap(),
            "http://127.0.0.1:5"
        );
    }
}
