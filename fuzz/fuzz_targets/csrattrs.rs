//! csr_attributes entries of the configuration, one per line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::csr_attrs(data);
});
