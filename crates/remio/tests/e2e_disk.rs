//! Block device round trips through a real guest: a raw pattern written by the guest is on the
//! host image byte for byte and reads back after a second boot; an ext4 file system written by
//! the guest is clean on the host, holds the guest's file, and keeps its checksum across boots;
//! a bao-virtio-dm YAML config given to `remio run --config` serves a read-only disk the guest
//! reads but cannot change; sequential direct reads answered from the device model's read-ahead
//! read back what the host wrote, and what the guest wrote in between.
#![allow(clippy::unwrap_used)]

mod e2e_common;
use e2e_common::*;

const PATTERN_LINE: &[u8] = b"remio-pattern-0123456789\n";
const OFFSET: usize = 1 << 20;
const LEN: usize = 1 << 20;

#[test]
fn pattern_written_by_the_guest_is_on_the_host_image_and_reads_back_after_reboot() {
    if !prerequisites("e2e_disk") {
        return;
    }
    let (_dir, img) = temp_image(16 << 20);
    let write = "yes remio-pattern-0123456789 | head -c 1048576 > /tmp/p && \
                 dd if=/tmp/p of=/dev/vda bs=65536 seek=16 conv=fsync 2>/dev/null && sync && \
                 echo WROTE $(md5sum < /tmp/p)";
    let out = remio_exec(write, &["--disk", path_str(&img)]);
    assert_eq!(out.status, Some(0));
    let sum = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("WROTE "))
        .unwrap()
        .to_owned();

    let host = std::fs::read(&img).unwrap();
    let expected: Vec<u8> = PATTERN_LINE.iter().copied().cycle().take(LEN).collect();
    assert!(
        host[OFFSET..OFFSET + LEN] == expected[..],
        "host image differs from the pattern"
    );
    assert!(
        host[..OFFSET].iter().all(|&b| b == 0),
        "bytes before the pattern changed"
    );
    assert!(
        host[OFFSET + LEN..].iter().all(|&b| b == 0),
        "bytes after the pattern changed"
    );

    let read = "echo READ $(dd if=/dev/vda bs=65536 skip=16 count=16 2>/dev/null | md5sum)";
    let out = remio_exec(read, &["--disk", path_str(&img)]);
    assert_eq!(out.status, Some(0));
    assert_eq!(
        out.stdout.lines().find_map(|l| l.strip_prefix("READ ")),
        Some(sum.as_str())
    );
}

/// The guest's busybox has no mkfs.ext4, so the host makes the file system; the guest mounts
/// it as ext4, writes a file and unmounts; the host checks the file system is clean and holds
/// the same file; a second boot reads the same checksum back.
#[test]
fn ext4_written_in_the_guest_is_clean_on_the_host_and_keeps_a_checksum_across_boots() {
    if !prerequisites("e2e_disk") {
        return;
    }
    let Some(trip) = ext4_round_trip("e2e_disk ext4", "remio", |script, img| {
        remio_exec(script, &["--disk", path_str(img)])
    }) else {
        return;
    };

    let read = "set -e; mount -t ext4 -o ro /dev/vda /mnt; echo SUM $(md5sum < /mnt/f)";
    let out = remio_exec(read, &["--disk", path_str(&trip.img)]);
    assert_eq!(out.status, Some(0));
    assert_eq!(guest_sum(&out.stdout), Some(trip.sum.as_str()));
}

#[test]
fn a_bao_virtio_dm_yaml_config_serves_a_read_only_disk_the_guest_cannot_write() {
    if !prerequisites("e2e_disk") {
        return;
    }
    let (dir, img) = temp_image(16 << 20);
    std::fs::write(&img, vec![0x5a; 16 << 20]).unwrap();
    let config = dir.as_path().join("devices.yaml");
    // bao-virtio-dm's own format, as its users have it (shmem_addr 0: remio run shares the
    // guest RAM from guest-physical 0).
    std::fs::write(
        &config,
        format!(
            "devices:\n  - id: 0\n    type: block\n    shmem_addr: 0x0\n    mmio_addr: 0x10000000\n    \
             data_plane: virtio\n    file_path: {}\n    read_only: true\n  \
             - id: 1\n    type: rng\n    mmio_addr: 0x10000200\n    data_plane: virtio\n",
            path_str(&img)
        ),
    )
    .unwrap();
    let script = "echo RO $(cat /sys/block/vda/ro); \
                  echo FIRST $(dd if=/dev/vda bs=1 count=1 2>/dev/null | od -An -tx1); \
                  dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null; \
                  echo WRITE $?; echo RNG $(cat /sys/class/misc/hw_random/rng_current)";
    let out = remio_exec(script, &["--config", path_str(&config)]);
    assert_eq!(out.status, Some(0));
    assert!(
        out.stdout.contains("RO 1"),
        "the guest sees a read-only disk"
    );
    assert!(out.stdout.contains("FIRST 5a"), "and reads the image");
    assert!(out.stdout.contains("WRITE 1"), "a write fails");
    assert!(out.stdout.contains("RNG virtio_rng"));
    let image = std::fs::read(&img).unwrap();
    assert!(image.iter().all(|&b| b == 0x5a), "the image is unchanged");
}

/// The 1 MiB block `i` of the read-ahead test's image: a line naming it, repeated.
fn mib_block(i: usize) -> Vec<u8> {
    format!("remio-mib-{i:02}-abcdefghij\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(1 << 20)
        .collect()
}

/// Sequential 1 MiB direct reads, one `dd` each, are what the device model reads ahead
/// (`REMIO_BLK_READAHEAD_KIB`): each block reads back as the host wrote it, a block the guest
/// writes after it was read ahead reads back as written, and the device model answered reads
/// from its read-ahead (its counters in the `virtio-blk: stopped` line).
#[test]
fn sequential_direct_reads_are_read_ahead_and_a_write_between_them_is_seen() {
    if !prerequisites("e2e_disk") {
        return;
    }
    let (dir, img) = temp_image(0);
    let image: Vec<u8> = (0..16).flat_map(mib_block).collect();
    std::fs::write(&img, &image).unwrap();
    // Blocks 0-3 read in a row (2 and 3 from the read-ahead, which then holds 4), block 4
    // written, then 4-7 read.
    let script = "r() { dd if=/dev/vda bs=1048576 skip=$1 count=1 iflag=direct 2>/dev/null \
                      | md5sum | cut -d' ' -f1; }; \
                  for i in 0 1 2 3; do echo \"SUM $i $(r $i)\"; done; \
                  yes remio-new-data | head -c 1048576 > /tmp/n; \
                  dd if=/tmp/n of=/dev/vda bs=1048576 seek=4 count=1 oflag=direct conv=fsync \
                      2>/dev/null || echo WRITE-FAILED; \
                  echo \"NEW $(md5sum < /tmp/n | cut -d' ' -f1)\"; \
                  for i in 4 5 6 7; do echo \"SUM $i $(r $i)\"; done";
    let out = remio_exec(
        script,
        &["--disk", path_str(&img), "--no-console", "--no-rng"],
    );
    assert_eq!(out.status, Some(0), "the guest did not finish its script");
    assert!(!out.stdout.contains("WRITE-FAILED"));
    let new = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("NEW "))
        .expect("the guest's NEW line")
        .to_owned();
    let sums: Vec<(usize, String)> = out
        .stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("SUM ")?.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_owned()))
        })
        .collect();
    assert_eq!(
        sums.iter().map(|s| s.0).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );
    for (i, sum) in &sums {
        let want = if *i == 4 {
            new.clone()
        } else {
            let block = dir.as_path().join(format!("block{i}"));
            std::fs::write(&block, mib_block(*i)).unwrap();
            md5_of(&block)
        };
        assert_eq!(sum, &want, "block {i} read back wrong");
    }
    // "<n> extents read ahead, <m> reads answered from them"
    let answered = out
        .stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split(" extents read ahead, ").nth(1)?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum::<u64>();
    // Blocks 2, 3, 6 and 7 (not 4: the write dropped it and broke the stream).
    assert!(
        answered >= 4,
        "the device model answered {answered} reads from its read-ahead: {}",
        out.stderr
    );
}
