//! virtio-blk request parsing: whatever descriptors (addresses, lengths, flags) and memory
//! contents a guest provides, parsing returns a request or an error, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remio_virtio::fuzz::block_request(data);
});
