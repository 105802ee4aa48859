//! An HTTP Basic Authorization header value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::basic_auth(data);
});
