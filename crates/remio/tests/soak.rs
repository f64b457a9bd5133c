//! `remio soak`, short: 30 s of load on 16 DMs served by device-model processes over the
//! socket API, with churn (SIGKILL + restart, pause/resume, session re-creation). The counts
//! are asserted, never the timing: every request accounted exactly once, every read right,
//! fds flat, resident memory within its bound (the platform's, and that of device-model process
//! 0, which churn never kills so that it lives through the run), and every route and kind of
//! churn exercised. Set `REMIO_SOAK_SECS` for a longer run.
//!
//! Two short runs show the checks can fail: a device-model process made to leak per session
//! (`--dm-leak-kib`) fails the soak on its RSS, and kill churn with one device-model process (no
//! process could live through the run) is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn u(v: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path} missing from the report"))
}

/// Runs `remio soak --json --secs <secs> <args>`; its report and exit status.
fn soak(secs: u64, args: &[&str]) -> (Value, ExitStatus) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["soak", "--json", "--secs", &secs.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // A hang fails the test instead of blocking CI (the soak has its own stall watchdog too).
    let limit = Duration::from_secs(secs + 240);
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            panic!("remio soak did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let r: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); status {}: {text}", out.status));
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    (r, out.status)
}

#[test]
fn soak_accounts_every_request_once_and_leaks_nothing_under_churn() {
    let secs: u64 = std::env::var("REMIO_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);

    let (r, status) = soak(secs, &[]);

    assert_eq!(
        r["failures"],
        Value::Array(vec![]),
        "the soak's own verdict"
    );
    assert!(status.success());

    // Exactly once.
    let requests = u(&r, "hypervisor.requests");
    assert_eq!(
        u(&r, "requests"),
        requests + u(&r, "hypervisor.timeouts_no_slot")
    );
    assert_eq!(
        requests,
        u(&r, "hypervisor.completions")
            + u(&r, "hypervisor.timeouts_pending")
            + u(&r, "hypervisor.timeouts_abandoned"),
        "requests = completions + timeouts"
    );
    assert_eq!(u(&r, "hypervisor.refused_completions"), 0);
    assert_eq!(u(&r, "reads.wrong"), 0);
    assert_eq!(u(&r, "access_errors"), 0);
    assert!(u(&r, "reads.right") > 0);
    // A read goes unchecked only once its register was given up on, in this run or the warm-up.
    let given_up = ["reads", "warmup"]
        .iter()
        .flat_map(|p| ["timeout", "overlap"].map(|w| u(&r, &format!("{p}.registers_given_up.{w}"))))
        .sum::<u64>();
    assert!(u(&r, "warmup.requests") > 0);
    assert!(
        u(&r, "reads.unverified") == 0 || given_up > 0,
        "reads went unchecked with no register given up on"
    );

    // Every route and every kind of churn was exercised.
    for route in ["device_model", "ioeventfd", "status_word"] {
        assert!(
            u(&r, &format!("routes.{route}")) > 0,
            "{route} route unused"
        );
    }
    assert!(u(&r, "interrupts.irqfd_notifies") > 0);
    assert!(u(&r, "interrupts.frontend_interrupts") > 0);
    assert!(u(&r, "mix.acks") > 0);
    for churn in ["kills", "pauses", "recreates"] {
        assert!(u(&r, &format!("churn.{churn}")) > 0, "no {churn}");
    }

    // Nothing leaked.
    assert_eq!(u(&r, "platform.before.fds"), u(&r, "platform.after.fds"));
    assert!(u(&r, "platform.after.rss_bytes") < u(&r, "platform.before.rss_bytes") + (1 << 20));
    let dms = r["device_models"].as_array().unwrap();
    for dm in dms {
        assert_eq!(u(dm, "before.fds"), u(dm, "after.fds"));
        // RSS is compared only within one process: a restarted one is another process.
        if dm["survived"] == Value::Bool(true) {
            assert_eq!(u(dm, "before.pid"), u(dm, "after.pid"));
            assert!(u(dm, "after.rss_bytes") < u(dm, "before.rss_bytes") + (1 << 20));
        }
    }
    // Device-model process 0 is kept out of the kills, so its growth is always measured; the
    // others were killed and restarted.
    assert_eq!(dms[0]["kept_out_of_kills"], Value::Bool(true));
    assert_eq!(
        dms[0]["survived"],
        Value::Bool(true),
        "process 0 was killed"
    );
    assert_eq!(u(&dms[0], "before.pid"), u(&dms[0], "after.pid"));
    assert!(
        dms.iter().any(|d| d["survived"] == Value::Bool(false)),
        "no device-model process was killed"
    );
}

#[test]
fn soak_fails_when_a_device_model_that_lives_through_the_run_leaks() {
    // One device-model process serving all 16 DMs, session re-creation its only churn, and
    // 1.5 MiB leaked per session it opens: one re-creation in the measured run is over the
    // 1 MiB bound.
    let (r, status) = soak(
        3,
        &[
            "--warmup-secs",
            "1",
            "--dm-processes",
            "1",
            "--churn",
            "recreate",
            "--churn-ms",
            "100",
            "--dm-leak-kib",
            "1536",
        ],
    );

    assert!(u(&r, "churn.recreates") > 0, "no session was re-created");
    assert!(
        !status.success(),
        "the soak passed with a leaking device model"
    );
    let failures: Vec<&str> = r["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].starts_with("device-model process 0 (pid ")
            && failures[0].contains("lived through the run): RSS grew by"),
        "{failures:?}"
    );
    assert_eq!(r["device_models"][0]["survived"], Value::Bool(true));
    assert!(
        u(&r["device_models"][0], "after.rss_bytes")
            >= u(&r["device_models"][0], "before.rss_bytes") + (1 << 20)
    );
}

#[test]
fn soak_refuses_kill_churn_when_no_device_model_process_could_live_through_the_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["soak", "--dm-processes", "1", "--churn", "kill,pause"])
        .stdin(Stdio::null())
        .output()
        .unwrap();

    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--churn kill needs --dm-processes of at least 2"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "it started a run");
}
