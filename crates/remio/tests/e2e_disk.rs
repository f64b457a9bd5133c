//! Block device round trips through a real guest: a raw pattern written by the guest is on the
//! host image byte for byte and reads back after a second boot; an ext4 file system made and
//! mounted in the guest keeps a file's checksum across boots.
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

#[test]
fn ext4_made_in_the_guest_keeps_a_file_checksum_across_boots() {
    if !prerequisites("e2e_disk") {
        return;
    }
    let (_dir, img) = temp_image(64 << 20);
    let make = "set -e; mkfs.ext4 -q /dev/vda || mke2fs -q -t ext4 /dev/vda; \
                mount -t ext4 /dev/vda /mnt; head -c 3000000 /dev/urandom > /mnt/f; \
                echo SUM $(md5sum < /mnt/f); umount /mnt; sync";
    let out = remio_exec(make, &["--disk", path_str(&img)]);
    assert_eq!(out.status, Some(0));
    let sum = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("SUM "))
        .unwrap()
        .to_owned();

    let check = "set -e; mount -t ext4 -o ro /dev/vda /mnt; echo SUM $(md5sum < /mnt/f)";
    let out = remio_exec(check, &["--disk", path_str(&img)]);
    assert_eq!(out.status, Some(0));
    assert_eq!(
        out.stdout.lines().find_map(|l| l.strip_prefix("SUM ")),
        Some(sum.as_str())
    );
}
