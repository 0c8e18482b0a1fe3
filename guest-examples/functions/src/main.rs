//! A function-sandbox guest with realistic functions (serve it with `pvrun serve`):
//!
//! | function | input | output |
//! |---|---|---|
//! | `upper` | bytes | the input with ASCII letters upper-cased |
//! | `sha256` | bytes | the SHA-256 digest as 64 lower-case hex digits |
//! | `json-transform` | a JSON object | compact JSON: keys sorted, strings upper-cased, numbers doubled, arrays reversed (recursively) |
//! | `compress` | bytes | the input as a zlib stream (RFC 1950, DEFLATE level 6) |
//! | `decompress` | a zlib stream | the decompressed bytes (at most 16 MiB) |
//! | `greet-via-host` | a name | `hello, ` followed by the output of the host function `lookup` on the input |
//!
//! Errors (status 1, UTF-8 message): `invalid JSON: ...`, `expected a JSON object, ...`,
//! `invalid zlib data: ...`, `host function lookup: ...`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use sha2::{Digest, Sha256};

use serde_json::{Number, Value};

pvrun::export_functions! {
    "upper" => upper,
    "sha256" => sha256_hex,
    "json-transform" => json_transform,
    "compress" => compress,
    "decompress" => decompress,
    "greet-via-host" => greet_via_host,
}

/// Largest output `decompress` produces.
const DECOMPRESS_MAX: usize = 16 << 20;

/// ASCII upper-case of the input.
fn upper(input: &[u8]) -> Result<Vec<u8>, String> {
    Ok(input.to_ascii_uppercase())
}

/// Lower-case hex SHA-256 of the input.
fn sha256_hex(input: &[u8]) -> Result<Vec<u8>, String> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(input);
    let mut out = Vec::with_capacity(64);
    for b in digest {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 15) as usize]);
    }
    Ok(out)
}

/// Parses a JSON object and prints it back transformed (see [`transform`]).
fn json_transform(input: &[u8]) -> Result<Vec<u8>, String> {
    let value: Value = serde_json::from_slice(input).map_err(|e| format!("invalid JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!("expected a JSON object, found {}", kind(&value)));
    }
    let out = transform(value)?;
    serde_json::to_vec(&out).map_err(|e| format!("cannot print JSON: {e}"))
}

/// Upper-cases strings, doubles numbers and reverses arrays, at every depth. Objects come
/// out with their keys sorted (serde_json's map is ordered by key without `preserve_order`).
fn transform(value: Value) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(s.to_uppercase()),
        Value::Number(n) => Value::Number(double(&n)?),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .rev()
                .map(transform)
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| Ok((k, transform(v)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other,
    })
}

/// Twice `n`: an integer while it fits in 64 bits, otherwise a float.
fn double(n: &Number) -> Result<Number, String> {
    if let Some(d) = n.as_i64().and_then(|i| i.checked_mul(2)) {
        return Ok(d.into());
    }
    if let Some(d) = n.as_u64().and_then(|u| u.checked_mul(2)) {
        return Ok(d.into());
    }
    n.as_f64()
        .and_then(|f| Number::from_f64(f * 2.0))
        .ok_or_else(|| format!("number {n} is out of range when doubled"))
}

/// The JSON type name of `value`, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// zlib-compresses the input (DEFLATE level 6).
fn compress(input: &[u8]) -> Result<Vec<u8>, String> {
    Ok(miniz_oxide::deflate::compress_to_vec_zlib(input, 6))
}

/// Decompresses a zlib stream made by `compress` (or any zlib encoder).
fn decompress(input: &[u8]) -> Result<Vec<u8>, String> {
    miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(input, DECOMPRESS_MAX)
        .map_err(|e| format!("invalid zlib data: {e}"))
}

/// `hello, ` followed by what the host function `lookup` answers for the input.
fn greet_via_host(input: &[u8]) -> Result<Vec<u8>, String> {
    let name = pvrun::function::call_host("lookup", input)
        .map_err(|e| format!("host function lookup: {e}"))?;
    let mut out = b"hello, ".to_vec();
    out.extend_from_slice(&name);
    Ok(out)
}
