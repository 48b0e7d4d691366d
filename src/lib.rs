//! credbroker: a gRPC credential broker for sync engines.
//!
//! It registers upstream systems (Azure DevOps, Salesforce, ServiceNow, Zendesk, Jira Cloud,
//! Freshdesk, Freshservice, Asana) with their credentials encrypted at rest, checks that the
//! credentials really authenticate, and hands sync workers ready-to-send auth headers.
//!
//! # Layout
//! - [`server`]: the tonic server (`run`), the gRPC service and proto ⇄ domain conversion.
//! - [`broker`]: the domain core: registration, checks, token cache, rotation, callers.
//! - [`backends`]: one module per upstream system behind the `Backend` trait, plus the shared
//!   outbound HTTP client and base-URL rules.
//! - [`store`]: the `CredentialStore` trait, the sled store and an in-memory store.
//! - [`crypto`]: envelope encryption (AES-256-GCM) and master key handling.
//! - [`model`]: domain types; [`secret`]: redacting secret types; [`error`]: the error type
//!   and its one mapping to gRPC status codes.
//! - [`config`], [`telemetry`], [`shutdown`]: process plumbing; [`cli`]: `credbrokerctl`.
//! - [`pb`]: generated protobuf types.

pub mod admin_token;
pub mod audit;
pub mod authorize;
pub mod backends;
pub mod backup;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod error;
pub mod keyops;
pub mod metrics;
pub mod model;
pub mod pb;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tokens;
pub mod util;
