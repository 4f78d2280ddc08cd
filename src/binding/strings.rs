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
use std::ptr;

use napi::bindgen_prelude::{FromNapiValue, TypeName, ValidateNapiValue};
use napi::sys::{self, napi_env, napi_value};
use napi::ValueType;
use zeroize::Zeroize;

use crate::engine::EngineError;

/// Longest string option accepted (URLs, client ids and secrets, keys), in
/// UTF-8 bytes: far above any real one, low enough that a wrong value
/// (a file's contents) is refused rather than copied around.
pub const MAX_OPTION_BYTES: usize = 8 * 1024;

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

/// The value's type, read without side effects.
pub(super) unsafe fn type_of(env: napi_env, v: napi_value) -> sys::napi_valuetype {
    let mut t = sys::ValueType::napi_undefined;
    unsafe { sys::napi_typeof(env, v, &mut t) };
    t
}

/// Checks that `v` is a string of at most `max` UTF-8 bytes without copying
/// it; returns its length in UTF-16 units. `Err` holds what was wrong
/// (`Absent` for `null` / `undefined`).
pub(super) unsafe fn measure(env: napi_env, v: napi_value, max: usize) -> Result<usize, Text> {
    unsafe { measured(env, v, max).map(|(units, _)| units) }
}

/// [`measure`], and the UTF-8 length when it had to be measured.
unsafe fn measured(
    env: napi_env,
    v: napi_value,
    max: usize,
) -> Result<(usize, Option<usize>), Text> {
    unsafe {
        match type_of(env, v) {
            sys::ValueType::napi_string => {}
            sys::ValueType::napi_null | sys::ValueType::napi_undefined => return Err(Text::Absent),
            _ => return Err(Text::NotString),
        }
        let mut units = 0usize;
        if sys::napi_get_value_string_utf16(env, v, ptr::null_mut(), 0, &mut units)
            != sys::Status::napi_ok
        {
            return Err(Text::Unreadable);
        }
        if units > max {
            return Err(Text::TooLong { max });
        }
        if units.saturating_mul(3) <= max {
            return Ok((units, None));
        }
        let bytes = utf8_len(env, v).ok_or(Text::Unreadable)?;
        if bytes > max {
            return Err(Text::TooLong { max });
        }
        Ok((units, Some(bytes)))
    }
}

/// Reads `v` as a string of at most `max` UTF-8 bytes, copying only one
/// that fits, into a buffer of exactly its size (a held token costs its
/// length, not three times it).
pub(super) unsafe fn read(env: napi_env, v: napi_value, max: usize) -> Text {
    unsafe {
        let len = match measured(env, v, max) {
            Ok((_, Some(bytes))) => bytes,
            Ok((_, None)) => match utf8_len(env, v) {
                Some(bytes) => bytes,
                None => return Text::Unreadable,
            },
            Err(problem) => return problem,
        };
        let mut buf = Vec::<u8>::with_capacity(len + 1);
        let mut written = 0usize;
        if sys::napi_get_value_string_utf8(
            env,
            v,
            buf.as_mut_ptr() as *mut c_char,
            len + 1,
            &mut written,
        ) != sys::Status::napi_ok
        {
            return Text::Unreadable;
        }
        buf.set_len(written.min(len));
        // Node writes valid UTF-8 (lone surrogates become U+FFFD).
        match String::from_utf8(buf) {
            Ok(s) => Text::Present(s),
            Err(e) => {
                e.into_bytes().zeroize();
                Text::Unreadable
            }
        }
    }
}

/// The UTF-8 length of a string value: a scan, no copy.
unsafe fn utf8_len(env: napi_env, v: napi_value) -> Option<usize> {
    let mut len = 0usize;
    let status = unsafe { sys::napi_get_value_string_utf8(env, v, ptr::null_mut(), 0, &mut len) };
    (status == sys::Status::napi_ok).then_some(len)
}

/// A string argument of a napi-rs export, read with its length checked
/// first (at most `MAX` UTF-8 bytes). Conversion never fails: the export
/// turns what was wrong into an `INVALID_ARGUMENT` naming the argument,
/// inside its panic guard. TypeScript sees `string` (`ts_arg_type` /
/// `ts_type` on each use).
pub struct BoundedString<const MAX: usize>(Text);

impl<const MAX: usize> BoundedString<MAX> {
    pub fn required(self, name: &'static str) -> Result<String, EngineError> {
        self.0.required(name)
    }

    pub fn optional(self, name: &'static str) -> Result<Option<String>, EngineError> {
        self.0.optional(name)
    }
}

impl<const MAX: usize> FromNapiValue for BoundedString<MAX> {
    unsafe fn from_napi_value(env: napi_env, v: napi_value) -> napi::Result<Self> {
        Ok(Self(unsafe { read(env, v, MAX) }))
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
