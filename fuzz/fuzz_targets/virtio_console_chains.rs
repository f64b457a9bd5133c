//! virtio-console over descriptor chains a guest lays in memory (descriptor table, avail ring,
//! indirect tables and buffers all from the input): the device serves or refuses every chain
//! and never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remio_virtio::fuzz::console_chains(data);
});
