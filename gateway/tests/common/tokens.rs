//! JWTs for the tests: HS256, RS256 and ES256, signed with the keys of `tests/keys/`, and
//! unsigned ones.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The HS256 secret of the tests.
pub const SECRET: &str = "integration-test-secret-5b2f0c6e";

/// Path of a file of `tests/keys/` (test keys, generated with openssl, used nowhere else).
pub fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims for `sub` with subscribe and publish patterns, expiring in an hour.
pub fn claims(sub: &str, channels: &[&str], publish: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() + 3600, "channels": channels, "publish": publish})
}

pub fn hs256(claims: &Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("sign HS256")
}

pub fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(key_path("rsa_private.pem")).expect("RSA test key");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RSA key");
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), claims, &key).expect("sign RS256")
}

pub fn es256(claims: &Value) -> String {
    let pem = std::fs::read(key_path("ec_private.pem")).expect("EC test key");
    let key = EncodingKey::from_ec_pem(&pem).expect("EC key");
    jsonwebtoken::encode(&Header::new(Algorithm::ES256), claims, &key).expect("sign ES256")
}

/// A token with `alg: none` and no signature.
pub fn unsigned(claims: &Value) -> String {
    let header = base64url(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = base64url(claims.to_string().as_bytes());
    format!("{header}.{payload}.")
}

/// Base64url without padding, as JWTs use it.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char);
        }
    }
    out
}
