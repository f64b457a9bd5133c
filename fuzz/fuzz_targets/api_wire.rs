//! The device-model API's socket messages: whatever bytes (and fd count) a client or server
//! sends, decoding returns a value or an error, never panics; and what decodes re-encodes to
//! the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use remio_api::wire::{decode_reply, decode_request, encode_reply};

fuzz_target!(|data: &[u8]| {
    let Some((&fds, msg)) = data.split_first() else {
        return;
    };
    let fds = usize::from(fds % 4);
    if let Ok((tag, req)) = decode_request(msg, fds) {
        let mut out = Vec::new();
        req.encode(tag, &mut out);
        assert_eq!(decode_request(&out, usize::from(req.nfds())), Ok((tag, req)));
    }
    if let Ok(reply) = decode_reply(msg, fds) {
        let mut out = Vec::new();
        encode_reply(reply.opcode, reply.tag, reply.result.as_ref().map_err(|e| *e), &mut out);
        assert_eq!(decode_reply(&out, fds), Ok(reply));
    }
});
