//! The napi-rs layer. It converts JavaScript values into core types and core
//! errors into JavaScript errors with a stable `code`; decisions live in
//! [`crate::engine`]. `index.js` sequences promises around it: calling the
//! refresh function and waiting on the JS thread is ~30x cheaper than a
//! threadsafe function from tokio (see DEVELOPERS.md), so nothing here hops
//! threads on the no-refresh path.

mod direct;
mod error;
mod manager;
mod redis;
mod refresher;
