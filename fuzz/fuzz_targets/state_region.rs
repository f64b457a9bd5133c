//! A device model's state region after a crash: whatever bytes the region holds (a torn write,
//! a region of another version, garbage), opening it returns a record or none, never panics;
//! and a record that is returned is written back and read again unchanged.
#![no_main]

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;
use remio_virtio::persist::{StateRegion, REGION_LEN};

fuzz_target!(|data: &[u8]| {
    let Ok(mut file) = tempfile() else {
        return;
    };
    let len = usize::try_from(REGION_LEN).unwrap_or(8192);
    let mut bytes = data.to_vec();
    bytes.resize(len, 0);
    if file.write_all(&bytes).is_err() {
        return;
    }
    let fingerprint = 7;
    let Ok((mut region, record)) = StateRegion::open(file.try_clone().unwrap(), fingerprint)
    else {
        return;
    };
    if let Some(state) = record {
        region.write(&state).unwrap();
        let (_, again) = StateRegion::open(file, fingerprint).unwrap();
        assert_eq!(again, Some(state));
    }
});

fn tempfile() -> std::io::Result<std::fs::File> {
    let path = std::env::temp_dir().join(format!("remio-fuzz-state-{}", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}
