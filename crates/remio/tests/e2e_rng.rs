//! virtio-rng through remio: 1 MiB from /dev/hwrng.
#![allow(clippy::unwrap_used)]

mod e2e_common;
use e2e_common::*;

#[test]
fn guest_reads_one_mib_from_the_virtio_rng() {
    if !prerequisites("e2e_rng") {
        return;
    }
    let script = "echo BYTES $(dd if=/dev/hwrng bs=4096 count=256 iflag=fullblock 2>/dev/null | wc -c); \
                  echo DISTINCT $(dd if=/dev/hwrng bs=4096 count=1 2>/dev/null | od -An -v -tx1 | tr ' ' '\\n' | sort -u | grep -c .)";
    let out = remio_exec(script, &["--no-console"]);
    assert_eq!(out.status, Some(0));
    assert!(out.stdout.contains("BYTES 1048576"));
    // 4096 random bytes take (almost) every byte value; a stuck source would not.
    let distinct: u32 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("DISTINCT "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(distinct > 200, "only {distinct} distinct byte values");
}
