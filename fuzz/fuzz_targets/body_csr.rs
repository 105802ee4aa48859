//! A simpleenroll request body: decoded (base64 / PEM / DER), parsed and verified as a CSR,
//! authorized and issued, as the server does.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::body_csr(data);
});
