//! Any bytes as the body of a control message the proxy reads from a server.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patroxy::protocol::messages;

fuzz_target!(|data: &[u8]| {
    let _ = messages::error_fields(data);
    let _ = messages::parameter_status(data);
    let _ = messages::backend_key(data);
    let _ = messages::auth_code(data);
});
