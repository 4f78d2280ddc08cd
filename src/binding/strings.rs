//! Strings from JavaScript, measured before they are copied: every native
//! entry reads its string arguments here, so a 256 MB `userId` is refused
//! from its length (O(1) in UTF-16 units) and never copied into Rust.
//!
//! A UTF-16 unit is at least one UTF-8 byte and at most three, so `units >
//! max` is too long without looking further, and `3 * units <= max` fits
//! without looking further; only in between is the exact UTF-8 length
//! measured (a scan, no copy) before deciding. A string that is read is
//! then copied into a buffer of its exact UTF-8 size.

use std::ffi::c_char;

use napi::bindgen_prelude::{FromNapiValue, TypeName, ValidateNapiValue};
use napi::sys::{self, napi_env, napi_value};
use napi::{JsString, JsValue, Unknown, ValueType};
use zeroize::Zeroize;

use crate::engine::EngineError;

/// Longest string option accepted (URLs, client ids and secrets, keys), in
/// UTF-8 bytes: far above any real one, low enough that a wrong value
/// (a file's contents) is refused rather than copied around.
pub const MAX_OPTION_BYTES: usize = 8 * 1024;
/// Longest PEM (or JWK) option accepted: a certificate chain or a CA bundle
/// of a few dozen certificates, or a large RSA key.
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// What reading a JS value as a bounded string found.
pub(super) enum Text {
    /// `null` or `undefined`.
    Absent,
    Present(String),
    NotString,
    /// More than the limit, in UTF-8 bytes: not copied.
    TooLong {
        max: usize,
    },
    /// Node-API could not read it (never expected).
    Unreadable,
}

impl Text {
    /// The string, or `INVALID_ARGUMENT` naming `name` (absent is an error).
    pub fn required(self, name: &'static str) -> Result<String, EngineError> {
        self.optional(name)?
            .ok_or_else(|| EngineError::invalid_argument(name, "must be a string"))
    }

    /// The string, `None` for `null` / `undefined`, or `INVALID_ARGUMENT`.
    pub fn optional(self, name: &'static str) -> Result<Option<String>, EngineError> {
        match self {
            Text::Absent => Ok(None),
            Text::Present(s) => Ok(Some(s)),
            Text::NotString => Err(EngineError::invalid_argument(name, "must be a string")),
            Text::TooLong { max } => Err(too_long(name, max)),
            Text::Unreadable => Err(EngineError::invalid_argument(name, "could not be read")),
        }
    }
}

/// The error for a string over its limit; the message names the limit.
pub fn too_long(name: &'static str, max: usize) -> EngineError {
    EngineError::invalid_argument(name, format!("must be at most {max} bytes long (UTF-8)"))
}

/// Checks that `s` is at most `max` UTF-8 bytes without copying it;
/// returns its length in UTF-16 units.
pub(super) fn measure(s: &JsString<'_>, max: usize) -> Result<usize, Text> {
    let units = s.utf16_len().map_err(|_| Text::Unreadable)?;
    if units > max {
        return Err(Text::TooLong { max });
    }
    if units.saturating_mul(3) > max && s.utf8_len().map_err(|_| Text::Unreadable)? > max {
        return Err(Text::TooLong { max });
    }
    Ok(units)
}

/// Reads `s` if it is at most `max` UTF-8 bytes, into a buffer of its exact
/// size (a held token costs its length, not three times it), with no other
/// copy left behind: napi-rs's own conversion copies out of a buffer it
/// frees without wiping, which would leave a token in freed memory.
pub(super) fn bounded(s: JsString<'_>, max: usize) -> Text {
    let len = match measure(&s, max).and_then(|_| s.utf8_len().map_err(|_| Text::Unreadable)) {
        Ok(len) => len,
        Err(problem) => return problem,
    };
    let mut buf = Vec::<u8>::with_capacity(len + 1);
    let mut written = 0usize;
    let value = s.value();
    // SAFETY: `value` is a live string of the calling export's environment;
    // Node writes at most `len + 1` bytes (the string and a NUL) into
    // `buf`'s capacity and, once it succeeded, `written` says how many of
    // them are the string.
    let read = unsafe {
        let status = sys::napi_get_value_string_utf8(
            value.env,
            value.value,
            buf.as_mut_ptr().cast::<c_char>(),
            len + 1,
            &mut written,
        );
        if status == sys::Status::napi_ok {
            buf.set_len(written.min(len));
        }
        status == sys::Status::napi_ok
    };
    if !read {
        return Text::Unreadable;
    }
    // Node writes valid UTF-8 (lone surrogates become U+FFFD).
    match String::from_utf8(buf) {
        Ok(s) => Text::Present(s),
        Err(e) => {
            e.into_bytes().zeroize();
            Text::Unreadable
        }
    }
}

/// A string argument of a napi-rs export, read with its length checked
/// first (at most `MAX` UTF-8 bytes). Conversion never fails: the export
/// turns what was wrong into an `INVALID_ARGUMENT` naming the argument,
/// inside its panic guard. TypeScript sees `string` (`ts_arg_type` /
/// `ts_type` on each use).
pub struct BoundedString<const MAX: usize>(Text);

impl<const MAX: usize> BoundedString<MAX> {
    pub(super) fn into_text(self) -> Text {
        self.0
    }

    pub fn required(self, name: &'static str) -> Result<String, EngineError> {
        self.0.required(name)
    }

    pub fn optional(self, name: &'static str) -> Result<Option<String>, EngineError> {
        self.0.optional(name)
    }
}

impl<const MAX: usize> FromNapiValue for BoundedString<MAX> {
    unsafe fn from_napi_value(env: napi_env, v: napi_value) -> napi::Result<Self> {
        // SAFETY: napi-rs hands over a live value of the calling export's
        // environment; it is read as a string only once its type says so.
        let text = unsafe {
            match Unknown::from_raw_unchecked(env, v).get_type() {
                Ok(ValueType::String) => bounded(JsString::from_napi_value(env, v)?, MAX),
                Ok(ValueType::Null | ValueType::Undefined) => Text::Absent,
                Ok(_) => Text::NotString,
                Err(_) => Text::Unreadable,
            }
        };
        Ok(Self(text))
    }
}

impl<const MAX: usize> TypeName for BoundedString<MAX> {
    fn type_name() -> &'static str {
        "string"
    }

    fn value_type() -> ValueType {
        ValueType::String
    }
}

impl<const MAX: usize> ValidateNapiValue for BoundedString<MAX> {}
