//! A certs-only PKCS#7 answer from an upstream EST server (base64 or PEM, and raw DER/BER).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::pkcs7_certs_only(data);
});
