#![deny(clippy::all)]
//! `tarabut-token-manager`: keeps per-user OAuth2 access tokens valid.
//!
//! - [`engine`]: the pure Rust core (policy, single flight, per-user table).
//! - [`refresh`]: native token refreshers (Tarabut, OAuth2) over reqwest.
//! - [`redis`]: optional cross-instance coordination on Redis.
//! - `binding`: the napi-rs layer that converts values and errors for Node.

pub mod engine;
pub mod redis;
pub mod refresh;

mod binding;
