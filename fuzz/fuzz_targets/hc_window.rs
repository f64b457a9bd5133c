//! The hypercall window a backend VM's driver drives (`remio run --dispatcher c-driver`): any
//! sequence of register accesses, at any offset and width, is decoded without a panic; a CALL
//! reaches the hypervisor with exactly the bank's inputs.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use remio_abi::{Hypercall, RemioArgs, RemioRet};
use remio_frontend::qemu::hcwindow::HcWindow;

/// Answers every call with values derived from its arguments, and remembers the last one.
#[derive(Default)]
struct Echo(Mutex<Option<RemioArgs>>);

impl Hypercall for Echo {
    fn remote_io(&self, args: &RemioArgs) -> RemioRet {
        *self.0.lock().unwrap() = Some(*args);
        RemioRet {
            status: i64::from(args.op == 2),
            addr: args.addr ^ 1,
            op: args.op,
            value: args.value.rotate_left(3),
            access_width: 4,
            request_id: args.request_id,
            has_pending: args.dm_id & 1,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let hc = Arc::new(Echo::default());
    let Ok(mut window) = HcWindow::new(hc.clone(), 3) else {
        return;
    };
    for op in data.chunks_exact(12) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]));
        let width = [1, 2, 4, 8, 3, 0][usize::from(op[2] % 6)];
        let mut v = [0u8; 8];
        v.copy_from_slice(&op[4..12]);
        let value = u64::from_le_bytes(v);
        if op[3] & 1 == 0 {
            window.write(offset, width, value);
        } else {
            let _ = window.read(offset, width);
        }
    }
});
