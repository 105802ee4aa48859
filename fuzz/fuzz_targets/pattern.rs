//! Policy name patterns: pattern, value, client CN and user, one per line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::pattern(data);
});
