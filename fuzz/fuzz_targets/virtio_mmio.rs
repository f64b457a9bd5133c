//! The virtio-mmio register file: whatever sequence of reads and writes (any offset, any
//! width, any value) a guest issues, the transport answers without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    remio_virtio::fuzz::mmio_transport(data);
});
