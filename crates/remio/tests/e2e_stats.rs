//! `remio stats` during a guest's I/O: found without arguments in the per-user run directory
//! (here a private $XDG_RUNTIME_DIR), its counters match what the guest did (the platform's
//! per DM, with trapped-access latency percentiles; the device model's per device, bytes read
//! by request kind), and `remio run --stats-json` writes the final ones.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::Command;

mod e2e_common;
use e2e_common::*;

/// How many direct 4 KiB reads the guest makes: one request and one interrupt each.
const READS: u64 = 1000;

#[test]
fn remio_stats_finds_the_run_and_counts_the_guests_block_requests() {
    if !prerequisites("e2e_stats") {
        return;
    }
    let runtime = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-e2e-xdg").unwrap();
    let stats = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_remio"))
            .arg("stats")
            .args(extra)
            .env("XDG_RUNTIME_DIR", runtime.as_path())
            .output()
            .unwrap()
    };
    let none = stats(&["--once"]);
    assert!(!none.status.success());
    let msg = String::from_utf8_lossy(&none.stderr);
    assert!(
        msg.contains(&runtime.as_path().join("remio").display().to_string()),
        "the error names where it looked: {msg}"
    );

    let _lock = boot_lock();
    // The host reads the counters before (IO-READY) and after (IO-DONE) the guest's reads;
    // the guest waits for a line on its console (the host's go-ahead) before each step, so the
    // host's reads cannot race the guest's. The console is served on a socket and is not the
    // disk, whose counters are checked.
    let script = format!(
        "exec 3<>/dev/hvc0; stty -echo <&3; echo IO-READY; read -r go <&3; \
         dd if=/dev/vda of=/dev/null bs=4096 count={READS} iflag=direct 2>/dev/null; \
         echo IO-DONE; read -r done <&3; echo EXITING"
    );
    let final_json = runtime.as_path().join("final.json");
    let console_sock = runtime.as_path().join("console.sock");
    let run = LiveRun::spawn(
        remio_run_console_command(&console_sock, &script)
            .arg("--stats-json")
            .arg(&final_json)
            .env("XDG_RUNTIME_DIR", runtime.as_path())
            // Each read then kicks: the disk does not poll for the guest's next request, which
            // would take some without a QueueNotify (the counters below are the guest's accesses).
            .env("REMIO_BLK_POLL_US", "0"),
    );
    run.wait_for("IO-READY");
    let before = stats(&["--json"]);
    let mut console = connect_until(&console_sock, run.deadline());
    console.write_all(b"go\n").unwrap();
    run.wait_for("IO-DONE");

    let json = stats(&["--json"]);
    let table = stats(&["--once"]);
    console.write_all(b"done\n").unwrap();
    run.wait_for("EXITING");
    let pid = run.pid();
    let _ = run.finish();
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    eprintln!("{v:#}");
    assert_eq!(v["pid"].as_u64(), Some(u64::from(pid)));
    let block = &v["dms"][0];
    assert_eq!(block["id"].as_u64(), Some(0));
    assert_eq!(block["session"].as_bool(), Some(true));
    // Each read is a QueueNotify (an ioeventfd) and a completion interrupt, at least.
    let notifies = block["to_ioeventfd"].as_u64().unwrap();
    let irqs = block["interrupts"].as_u64().unwrap();
    assert!(
        notifies >= READS,
        "{notifies} queue notifies for {READS} reads"
    );
    assert!(irqs >= READS, "{irqs} interrupts for {READS} reads");
    let requests = block["requests"].as_u64().unwrap();
    let routed = [
        "to_control",
        "to_status_word",
        "to_ioeventfd",
        "to_io_client",
    ]
    .iter()
    .map(|k| block[k].as_u64().unwrap())
    .sum::<u64>();
    assert!(routed <= requests, "{routed} routed of {requests} requests");
    assert!(v["requests"].as_u64().unwrap() >= requests);
    assert_eq!(v["timeouts"].as_u64(), Some(0));

    // The platform's view of the DM: trapped accesses, their latency, the session.
    let trapped = block["trapped"].as_u64().unwrap();
    assert!(
        trapped >= requests,
        "{trapped} trapped, {requests} dispatched"
    );
    assert_eq!(block["completions"].as_u64(), Some(trapped));
    assert_eq!(block["timeouts"].as_u64(), Some(0));
    assert_eq!(block["latency_count"].as_u64(), Some(trapped));
    let (p50, p99, max) = (
        block["latency_p50_ns"].as_u64().unwrap(),
        block["latency_p99_ns"].as_u64().unwrap(),
        block["latency_max_ns"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{p50} {p99} {max}");
    assert_eq!(block["session_state"].as_str(), Some("serving"));
    assert_eq!(
        (block["sessions"].as_u64(), block["restarts"].as_u64()),
        (Some(1), Some(0))
    );
    // The device model's view: exactly the guest's reads between the two snapshots.
    assert!(before.status.success());
    let v0: serde_json::Value = serde_json::from_slice(&before.stdout).unwrap();
    let dev = |v: &serde_json::Value, table: &str| {
        v["dms"][0]["device"][table]["read"].as_u64().unwrap_or(0)
    };
    assert!(
        v["dms"][0]["device"]["description"]
            .as_str()
            .unwrap()
            .contains("blk"),
        "{v:#}"
    );
    assert_eq!(dev(&v, "requests") - dev(&v0, "requests"), READS);
    assert_eq!(dev(&v, "bytes") - dev(&v0, "bytes"), READS * 4096);
    assert_eq!(v["dms"][0]["device"]["errors"].as_u64(), Some(0));
    assert_eq!(v["dms"][0]["device"]["needs_reset"].as_u64(), Some(0));
    let last: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&final_json).unwrap()).unwrap();
    assert!(
        last["dms"][0]["to_ioeventfd"].as_u64().unwrap() >= notifies,
        "--stats-json has the final counters"
    );
    assert!(
        dev(&last, "bytes") >= dev(&v, "bytes"),
        "--stats-json has the device's final counters: {last:#}"
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("requests"), "{table}");
    assert!(table.contains("p99 us"), "{table}");
    assert!(table.contains("read MiB"), "{table}");
    assert!(
        !runtime
            .as_path()
            .join("remio")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "the socket is gone after the run"
    );
}
