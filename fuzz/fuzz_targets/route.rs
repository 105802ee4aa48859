//! An EST request path through the router (and the same text as a Content-Type).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::route(data);
});
