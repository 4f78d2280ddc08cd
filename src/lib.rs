#![deny(clippy::all)]
//! `tarabut-token-manager`: keeps per-user OAuth2 access tokens valid.
//!
//! - [`engine`]: the pure Rust core (policy, single flight, per-user table).
//! - `binding`: the napi-rs layer that converts values and errors for Node.

pub mod engine;

mod binding;
