//! Random identifiers: sessions, epochs, node names.

use rand::RngCore;

/// `bytes` random bytes from the OS-seeded generator, as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A session id: 128 random bits, as PROTOCOL.md asks.
pub fn session_id() -> String {
    random_hex(16)
}

/// The name of a channel's sequence: it only has to differ from the epochs before it.
pub fn epoch() -> String {
    random_hex(6)
}
