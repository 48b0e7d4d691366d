//! credbroker: a gRPC credential broker for sync engines.
//!
//! It registers upstream systems (Azure DevOps, Salesforce, ServiceNow, Zendesk, Jira Cloud,
//! Freshdesk, Freshservice, Asana) with their credentials encrypted at rest, checks that the
//! credentials really authenticate, and hands sync workers ready-to-send auth headers.
//!
//! # Layout (each module uses only those listed below it; `tests/integration/layering.rs`
//! checks there is no import cycle)
//! - [`cli`]: `credbrokerctl`, a gRPC client of the server.
//! - [`server`]: the process: the tonic service, proto ⇄ domain conversion, the HTTP listener
//!   (OAuth callback, proxy, `/metrics`, `/readyz`), TLS; [`config`] is its configuration.
//! - [`broker`]: the domain core: registration, checks, rotation and callers, with its parts in
//!   one folder: `tokens` (token cache and refresher), `connect` (the OAuth code flow), `proxy`
//!   (leases and the proxied call), `keys` (master-key rotation and re-wrap), `backup`.
//! - [`admin_token`]: the admin token file written on first start.
//! - [`audit`]: the audit trail; [`metrics`]: Prometheus counters.
//! - [`backends`]: one module per upstream system behind the `Backend` trait, plus the shared
//!   outbound HTTP client, the egress guard and base-URL rules.
//! - [`store`]: the `CredentialStore` trait, the sled, PostgreSQL and in-memory stores, the
//!   record-authenticating wrapper, the write monitor and the fault injector.
//! - [`crypto`]: envelope encryption (AES-256-GCM) and master key handling.
//! - [`model`]: domain types; [`secret`]: redacting secret types; [`error`]: the error type, its
//!   one mapping to gRPC status codes and the code names.
//! - [`telemetry`], [`shutdown`]: process plumbing; [`pb`]: generated protobuf types.
//! - [`util`]: leaf helpers (hex, random ids, civil dates, lock poisoning).

// Functions fit on a screen: the threshold (100 lines) is in .clippy.toml; CI denies warnings.
#![warn(clippy::too_many_lines)]

pub mod admin_token;
pub mod audit;
pub mod backends;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod pb;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod util;
