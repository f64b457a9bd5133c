//! A device model's state region after a crash: whatever bytes the region holds (a torn write,
//! a region of another version or configuration, garbage), opening it tells blank, a record or
//! an unusable one, never panics; a record found (usable, of an earlier version, or whole but
//! of another configuration) is written back as this device's and read again unchanged, as
//! this device's own; and only a region of zeros is blank.
#![no_main]

use std::io::Write as _;

use libfuzzer_sys::fuzz_target;
use remio_virtio::persist::{Found, StateRegion, REGION_LEN};

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
    // Records of an earlier version of the device, which it resumes.
    let earlier = [6];
    // The queue count is taken from the input, so that records of another count are reached.
    let queues = usize::from(data.first().copied().unwrap_or(1) % 4);
    let Ok((mut region, found)) =
        StateRegion::open(file.try_clone().unwrap(), fingerprint, &earlier, queues)
    else {
        return;
    };
    assert_eq!(
        found == Found::Blank,
        bytes.iter().all(|&b| b == 0),
        "blank exactly when nothing was ever written"
    );
    let state = match found {
        Found::Blank => return,
        Found::Record(state) => state,
        Found::Unusable { state: None, .. } => return,
        Found::Unusable {
            state: Some(mut state),
            ..
        } => {
            state.queues.resize(queues, Default::default());
            state
        }
    };
    region.write(&state).unwrap();
    let (_, again) = StateRegion::open(file, fingerprint, &[], queues).unwrap();
    assert_eq!(again, Found::Record(state));
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
