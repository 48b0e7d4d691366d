//! Freshdesk: an agent's API key (Profile Settings → View API Key), Basic `key:X`.
//! Base `https://{domain}.freshdesk.com`; workers call `{base}/api/v2`.

use async_trait::async_trait;

use super::freshworks::{self, Product};
use super::{Backend, BackendContext, BackendError, EgressPolicy, Issued, Target};
use crate::model::{AuthCheck, SystemKind};

const PRODUCT: Product = Product {
    vendor: "Freshdesk",
    key_location: "Profile Settings → View API Key",
    url_hint: "enter your helpdesk address, e.g. https://acme.freshdesk.com",
    me_forbidden: None,
};

/// The Freshdesk backend.
pub struct FreshdeskBackend {
    ctx: BackendContext,
}

impl FreshdeskBackend {
    /// A backend using the shared plumbing.
    pub fn new(ctx: BackendContext) -> Self {
        Self { ctx }
    }
}

#[async_trait]
impl Backend for FreshdeskBackend {
    fn kind(&self) -> SystemKind {
        SystemKind::Freshdesk
    }

    fn canonical_base_url(&self, raw: &str, egress: &EgressPolicy) -> Result<String, String> {
        // Freshdesk helpdesks can also be reached on a custom domain.
        freshworks::canonical_root(raw, egress, ".freshdesk.com", true, PRODUCT.url_hint)
    }

    async fn verify(&self, target: &Target<'_>, issued: &Issued) -> AuthCheck {
        freshworks::verify(&self.ctx, &PRODUCT, target, issued).await
    }

    async fn issue(&self, target: &Target<'_>) -> Result<Issued, BackendError> {
        freshworks::issue(&PRODUCT, target)
    }
}
