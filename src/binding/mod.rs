//! The napi-rs layer: it only converts. JavaScript values become core types
//! and core errors become JavaScript errors with a stable `code`; decisions
//! live in [`crate::engine`], [`crate::refreshers`] and
//! [`crate::coordination`]. Every napi-facing type is named `Binding*`.
//! Each file has a JS counterpart of the same name in `lib/`, which
//! sequences promises around it: calling the refresh function and waiting
//! on the JS thread costs ~1 µs where a threadsafe function from tokio costs
//! 40-65 µs, so nothing here hops threads on the no-refresh path.

mod coordination;
mod errors;
mod manager;
mod refreshers;
mod strings;
