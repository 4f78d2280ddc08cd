#![deny(clippy::all)]
//! `tarabut-token-manager`: keeps per-user OAuth2 access tokens valid.
//!
//! - [`engine`]: the pure Rust core (policy, single flight, per-user table).
//! - [`refreshers`]: native token refreshers (Tarabut, OAuth2) over reqwest.
//! - [`coordination`]: optional cross-instance coordination on Redis.
//! - `binding`: the napi-rs layer that converts values and errors for Node.
//!
//! ARCHITECTURE.md has the map and the invariants.

pub mod coordination;
pub mod engine;
pub mod refreshers;

mod binding;
