//! One integration-test binary: the real server over real gRPC, a temp-dir sled store, and fake
//! upstreams on loopback.

// Test helpers unwrap freely: a panic is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin_cli;
mod backup;
mod branches;
mod broker_api;
mod chaos;
mod connect;
mod console;
mod contract;
mod cores;
mod crash;
mod edges;
mod egress_proxy;
mod fake_entra;
mod fakes;
mod fuzz;
mod health;
mod layering;
mod lifecycle;
mod mtls;
mod oauth;
mod observability;
mod pg;
mod proxy;
mod quota;
mod rekey;
mod replicas;
mod security;
mod service_identities;
mod static_backends;
mod storage_faults;
mod store_conformance;
mod support;
mod tamper;
mod vendor_methods;
