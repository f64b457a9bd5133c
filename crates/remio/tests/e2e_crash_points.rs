//! Issue 14's crash points with a real guest: `remio run` serves the disk of an unmodified
//! Linux guest that writes blocks of a known pattern (with fdatasync) and reads them back
//! (`blkverify`, O_DIRECT), while the device model kills itself at each step of a block
//! request's life in turn — after the pop, after the write, before the used ring update, after
//! it, before the interrupt (`crates/virtio/src/crash_point.rs`). One boot goes through all
//! five: `REMIO_CRASH_POINT` holds a list, and the device model `remio run` starts as its `k`-th
//! restart (`REMIO_DM_GENERATION=k`) is armed with the list's entry `k`.
//!
//! Expected: every point fired (each device model says which point killed it before it dies),
//! `remio run` restarted each and the new one resumed the disk from its state region, the guest
//! saw no I/O error (blkverify, its kernel log), every block blkverify wrote reads back as it
//! last wrote it (in the guest), and on the host image afterwards every block is either
//! untouched or a whole block of that run (its number, the run's seed, its checksum and the
//! payload its generation holds), as many as blkverify wrote.
//!
//! The test binary's `remio` has the crash points (the `crash-points` feature, turned on by
//! `remio`'s dev-dependency on `remio-virtio`); a build without it has none.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_common;
use e2e_common::*;

/// The steps of a request's life, in order, each with the hit of it that kills its device
/// model: far enough into blkverify's run to be past the guest's boot-time probe of the disk
/// (a few reads), early enough to leave most of the run to the next device models.
const POINTS: [(&str, u32); 5] = [
    ("popped", 150),
    ("blk-written", 100),
    ("executed", 100),
    ("used", 100),
    ("before-interrupt", 60),
];

/// blkverify's working set (4 KiB blocks) and run time. The run time bounds the test; the five
/// crashes need a few hundred requests and five restarts, a small part of it even on a loaded
/// machine (the test fails, saying so, if a point did not fire before the guest finished).
const BLOCKS: u64 = 2048;
const SECS: u32 = 30;

/// The value of `key=` in the first line starting with `prefix`.
fn field<'a>(out: &'a str, prefix: &str, key: &str) -> Option<&'a str> {
    let line = out.lines().find(|l| l.starts_with(prefix))?;
    let pat = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(pat.as_str()))
}

fn num(out: &str, prefix: &str, key: &str) -> u64 {
    field(out, prefix, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in a line `{prefix} ...`"))
}

/// blkverify.c's block format, re-derived on the host: magic, block, generation, seed,
/// checksum (FNV-1a 64 over the rest of the block), then an xorshift payload seeded by
/// `mix(seed, block, generation)`.
mod blkverify {
    pub const BS: usize = 4096;
    const MAGIC: u64 = 0x5946_4952_4556_424b;
    const HEADER: usize = 40;

    fn mix(a: u64, b: u64, c: u64) -> u64 {
        let s = a.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ b.wrapping_add(0x632b_e59b_d9b4_e019)
                .wrapping_mul(0xbf58_476d_1ce4_e5b9)
            ^ c.wrapping_add(1).wrapping_mul(0x94d0_49bb_1331_11eb);
        if s == 0 {
            1
        } else {
            s
        }
    }

    fn xorshift(s: &mut u64) -> u64 {
        let mut x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *s = x;
        x
    }

    fn fnv1a(p: &[u8], mut h: u64) -> u64 {
        for &b in p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    }

    fn word(block: &[u8], i: usize) -> u64 {
        u64::from_le_bytes(block[i * 8..i * 8 + 8].try_into().unwrap())
    }

    /// What block `index` of the image holds: `Ok(None)` untouched (zeros), `Ok(Some(gen))` a
    /// whole block of the run with `seed`, `Err(why)` anything else.
    pub fn check(block: &[u8], index: u64, seed: u64) -> Result<Option<u64>, String> {
        if block.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let (magic, blk, generation, s, sum) = (
            word(block, 0),
            word(block, 1),
            word(block, 2),
            word(block, 3),
            word(block, 4),
        );
        if magic != MAGIC || blk != index || s != seed {
            return Err(format!(
                "header: magic_ok={} block={blk} seed_ok={}",
                magic == MAGIC,
                s == seed
            ));
        }
        let h = fnv1a(&block[..32], 0xcbf2_9ce4_8422_2325);
        if fnv1a(&block[HEADER..], h) != sum {
            return Err(format!("generation {generation}: bad checksum"));
        }
        let mut st = mix(seed, index, generation);
        for i in HEADER / 8..BS / 8 {
            if word(block, i) != xorshift(&mut st) {
                return Err(format!("generation {generation}: payload differs"));
            }
        }
        Ok(Some(generation))
    }
}

#[test]
fn a_guest_sees_no_error_when_its_device_model_dies_at_every_step_of_a_block_request() {
    if !prerequisites("e2e_crash_points") {
        return;
    }
    let (_dir, img) = temp_image(16 << 20);
    let spec = POINTS
        .iter()
        .map(|(p, n)| format!("{p}:{n}"))
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "command -v blkverify >/dev/null || {{ echo 'BLKVERIFY-MISSING: rebuild the guest (remio guest build)'; exit 9; }}
blkverify /dev/vda {SECS} 4 {BLOCKS}; echo \"BV-STATUS $?\"
echo IOERRORS $(dmesg | grep -ci 'i/o error')"
    );
    let restarts = (POINTS.len() + 2).to_string();

    let out = remio_exec_env(
        &script,
        &[
            "--disk",
            path_str(&img),
            "--no-console",
            "--no-rng",
            "--dm-restarts",
            &restarts,
            "--access-timeout-ms",
            "30000",
        ],
        &[("REMIO_CRASH_POINT", &spec)],
    );

    assert!(
        !out.stdout.contains("BLKVERIFY-MISSING"),
        "the guest image has no blkverify: run `remio guest build`"
    );
    assert_eq!(out.status, Some(0), "the guest did not finish its script");
    // Every point fired, in turn, each in the device model armed with it.
    for (k, (point, n)) in POINTS.iter().enumerate() {
        let line = format!("crash point {point} reached (hit {n}, generation {k}): killing");
        assert!(
            out.stderr.contains(&line),
            "device model {k} did not die at `{point}` (blkverify ended first, or the hook \
             did not fire)"
        );
    }
    assert_eq!(
        out.stderr.matches("crash point ").count(),
        POINTS.len(),
        "one crash per armed device model, none after"
    );
    // remio run restarted each, and each new one resumed the live disk.
    assert_eq!(
        out.stderr.matches("restarting it in").count(),
        POINTS.len(),
        "remio run restarted the device model once per crash"
    );
    assert_eq!(
        out.stderr.matches("the devices are served again").count(),
        POINTS.len()
    );
    assert_eq!(
        out.stderr
            .matches("resumed from the previous device model: Live")
            .count(),
        POINTS.len(),
        "every new device model resumed the disk from its state region"
    );
    assert!(
        !out.stderr.contains("fail their requests"),
        "remio run failed the devices"
    );
    // The guest saw no error and found every block as it last wrote it.
    let done = "BLKVERIFY done";
    assert!(out.stdout.contains("BV-STATUS 0"), "blkverify failed");
    assert_eq!(num(&out.stdout, done, "errors"), 0, "data mismatches");
    assert_eq!(num(&out.stdout, done, "io_errors"), 0, "I/O errors");
    assert!(
        out.stdout.lines().any(|l| l == "IOERRORS 0"),
        "the guest's kernel logged I/O errors"
    );
    let written = num(&out.stdout, done, "written_blocks");
    assert!(num(&out.stdout, done, "flushes") > 0, "no fdatasync ran");
    assert_eq!(
        num(&out.stdout, done, "final_verified"),
        written,
        "every written block reads back intact in the guest"
    );
    // On the host: the image holds exactly those blocks, each whole.
    let seed = u64::from_str_radix(
        field(&out.stdout, "BLKVERIFY start", "seed").expect("blkverify's seed"),
        16,
    )
    .unwrap();
    let image = std::fs::read(&img).unwrap();
    let mut on_host = 0;
    for (i, block) in (0u64..).zip(image.chunks(blkverify::BS)) {
        match blkverify::check(block, i, seed) {
            Ok(Some(_)) => on_host += 1,
            Ok(None) => {}
            Err(why) => panic!("block {i} on the host image: {why}"),
        }
        assert!(
            i < BLOCKS || block.iter().all(|&b| b == 0),
            "block {i}, beyond blkverify's, was written"
        );
    }
    assert_eq!(
        on_host, written,
        "the host image holds every block blkverify wrote"
    );
    eprintln!(
        "e2e_crash_points: {} crashes, {} writes, {} verifies, {} flushes, {written} blocks \
         intact in the guest and on the host",
        POINTS.len(),
        num(&out.stdout, done, "writes"),
        num(&out.stdout, done, "verifies"),
        num(&out.stdout, done, "flushes"),
    );
}
