//! A CertificationRequestInfo, signed by the harness with a fixed Ed25519 key so that
//! mutations get past the proof of possession (subject, attributes, extensions, policy, issuance).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::csr_signed(data);
});
