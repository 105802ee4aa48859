//! Caps on a presented client certificate chain, checked before any path is built: path
//! building tries every presented certificate whose name fits, each at the cost of a signature
//! check, so a chain of hundreds of certificates named like the trust anchors made refusing
//! one request cost tens of milliseconds. The TLS handshake refuses a chain over the caps
//! (`transport::tls`); the API proxy's socket, which has no handshake, refuses a forwarded
//! header of more certificates (`transport::proxy`), and its 16 KiB header limit keeps a
//! forwarded chain far below the bytes cap. Authentication never sees a chain over them.

/// Certificates a client may present, its own included. IoT Edge presents its leaf alone or
/// with its Edge CA; a chain up to a root through two intermediates is four.
pub const MAX_CHAIN_CERTS: usize = 8;
/// Bytes of DER a presented chain may hold in all.
pub const MAX_CHAIN_BYTES: usize = 32 * 1024;
/// Chains of at most this many certificates are verified on the connection's own thread
/// (their cost is bounded by a handful of signature checks per trust set); longer ones on
/// the blocking pool, a few at a time (`server`).
pub const INLINE_CHAIN_CERTS: usize = 2;

/// Whether a chain of `count` certificates and `bytes` bytes is within the caps; the error
/// completes "client certificate rejected: ".
pub fn check_chain_size(count: usize, bytes: usize) -> Result<(), String> {
    if count > MAX_CHAIN_CERTS {
        return Err(format!(
            "the presented chain has {count} certificates; at most {MAX_CHAIN_CERTS} are accepted"
        ));
    }
    if bytes > MAX_CHAIN_BYTES {
        return Err(format!(
            "the presented chain holds {bytes} bytes; at most {MAX_CHAIN_BYTES} are accepted"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps() {
        assert_eq!(check_chain_size(MAX_CHAIN_CERTS, MAX_CHAIN_BYTES), Ok(()));
        assert!(check_chain_size(MAX_CHAIN_CERTS + 1, 100)
            .unwrap_err()
            .contains("9 certificates"));
        assert!(check_chain_size(2, MAX_CHAIN_BYTES + 1)
            .unwrap_err()
            .contains("32769 bytes"));
    }
}
