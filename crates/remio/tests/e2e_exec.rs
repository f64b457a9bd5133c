//! `remio run --exec` with a script far beyond the kernel command line's 2 KiB, and
//! `--copy-in`: both travel in the archive `remio run` appends to the guest's initramfs.
#![allow(clippy::unwrap_used)]

use std::fmt::Write as _;

mod e2e_common;
use e2e_common::*;

/// A shell script of at least `min_len` bytes that adds 1..=n into `s`, printing a checkpoint
/// every 1000 lines and, as its last line, the sum: a script cut anywhere prints a wrong sum
/// or no last line. Returns the script and the sum it must print.
fn long_script(min_len: usize) -> (String, u64) {
    let mut script = String::from("s=0\n");
    let mut sum = 0u64;
    let mut i = 0u64;
    while script.len() < min_len {
        i += 1;
        sum += i;
        writeln!(script, "s=$((s + {i}))").unwrap();
        if i.is_multiple_of(1000) {
            writeln!(script, "echo CHECKPOINT {i} $s").unwrap();
        }
    }
    script.push_str("echo LAST-LINE SUM $s\n");
    (script, sum)
}

#[test]
fn a_64_kib_script_runs_whole_and_its_output_comes_back() {
    if !prerequisites("e2e_exec") {
        return;
    }
    let (script, sum) = long_script(64 << 10);
    assert!(script.len() >= 64 << 10);
    let out = remio_exec(&script, &["--no-console", "--no-rng"]);
    assert_eq!(out.status, Some(0), "the script's status");
    assert!(
        out.stdout.contains(&format!("LAST-LINE SUM {sum}")),
        "the last line ran with the whole sum"
    );
    let checkpoints = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("CHECKPOINT "))
        .count();
    assert!(checkpoints >= 3, "{checkpoints} checkpoints printed");
    assert!(out.stdout.contains("CHECKPOINT 1000 500500"));
}

#[test]
fn a_copied_in_file_reaches_the_guest_intact_with_its_mode() {
    if !prerequisites("e2e_exec") {
        return;
    }
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-e2e").unwrap();
    let host = dir.as_path().join("payload.bin");
    // 300 KiB of varied bytes (a simple LCG), not a repeating pattern.
    let mut x = 0x2545_f491_u32;
    let bytes: Vec<u8> = (0..300 << 10)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            x.to_be_bytes()[0]
        })
        .collect();
    std::fs::write(&host, &bytes).unwrap();
    let tool = dir.as_path().join("tool.sh");
    std::fs::write(&tool, "#!/bin/sh\necho TOOL-RAN \"$1\"\n").unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let expected = std::process::Command::new("sha256sum")
        .arg(&host)
        .output()
        .unwrap();
    let expected = String::from_utf8(expected.stdout).unwrap();
    let expected = expected.split_whitespace().next().unwrap().to_owned();

    let payload = format!("{}:/srv/in/payload.bin", path_str(&host));
    let tool_spec = format!("{}:/usr/local/bin/", path_str(&tool));
    let out = remio_exec(
        "echo SUM $(sha256sum /srv/in/payload.bin); echo SIZE $(wc -c < /srv/in/payload.bin); \
         /usr/local/bin/tool.sh hello",
        &[
            "--no-console",
            "--no-rng",
            "--copy-in",
            &payload,
            "--copy-in",
            &tool_spec,
        ],
    );
    assert_eq!(out.status, Some(0));
    assert!(
        out.stdout.contains(&format!("SUM {expected}")),
        "the guest's sha256 is the host's ({expected})"
    );
    assert!(out.stdout.contains(&format!("SIZE {}", bytes.len())));
    assert!(
        out.stdout.contains("TOOL-RAN hello"),
        "the copied script kept its execute bit"
    );
}
