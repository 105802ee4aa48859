//! A DER CSR (Csr::from_der, then policy and issuance).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::csr_der(data);
});
