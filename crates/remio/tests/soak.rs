//! `remio soak`, short: 30 s of load on 16 DMs served by device-model processes over the
//! socket API, with churn (SIGKILL + restart, pause/resume, session re-creation). The counts
//! are asserted, never the timing: every request accounted exactly once, every read right,
//! fds flat, resident memory within its bound, and every route and kind of churn exercised.
//! Set `REMIO_SOAK_SECS` for a longer run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn u(v: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("{path} missing from the report"))
}

#[test]
fn soak_accounts_every_request_once_and_leaks_nothing_under_churn() {
    let secs: u64 = std::env::var("REMIO_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut child = Command::new(env!("CARGO_BIN_EXE_remio"))
        .args(["soak", "--json", "--secs", &secs.to_string()])
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

    assert_eq!(
        r["failures"],
        Value::Array(vec![]),
        "the soak's own verdict"
    );
    assert!(out.status.success());

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
    for dm in r["device_models"].as_array().unwrap() {
        assert_eq!(u(dm, "before.fds"), u(dm, "after.fds"));
        assert!(u(dm, "after.rss_bytes") < u(dm, "before.rss_bytes") + (1 << 20));
    }
}
