//! A configuration document (module twin JSON, or TOML): Config, then check_no_secrets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = edge_est_fuzz::config(data);
});
