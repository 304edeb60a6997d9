//! The integration tests, as one test binary: each suite is a module (run one with
//! `cargo test --test it <suite>::`), and the harness in `common` is compiled once for all.

mod common;

mod auth;
mod binary;
mod bitmap;
mod cache;
mod chain;
mod clone;
mod dashboard;
mod errors;
mod evict;
mod fetch;
mod github_app;
mod hostile;
mod idle;
mod interop;
mod inventory;
mod lfs;
mod maintain;
mod mirror;
mod packaging;
mod partial;
mod planner;
mod prewarm;
mod quickstart;
mod secrets;
mod shallow;
mod sharding;
mod tls;
mod webhook;
