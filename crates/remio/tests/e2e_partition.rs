//! `remio run --partition FRONTEND/BACKEND`: QEMU and the platform's thread that answers its
//! trapped accesses run on the frontend's CPUs; the device model, and the platform's threads
//! that serve it (its API connection, the irqfd thread that turns its signals into NOTIFYs),
//! on the backend's; the device model polls there (it would not on one CPU otherwise); and the
//! guest's disk works across the two.
#![allow(clippy::unwrap_used)]

use std::io::Write;

mod e2e_common;
use e2e_common::*;

/// A field of /proc/PID[/task/TID]/status.
fn status_field(dir: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("{dir}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in {dir}/status"))
        .trim()
        .to_owned()
}

/// (thread name, its Cpus_allowed_list) for every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| {
            let dir = t.unwrap().path().display().to_string();
            let comm = std::fs::read_to_string(format!("{dir}/comm")).unwrap();
            (
                comm.trim().to_owned(),
                status_field(&dir, "Cpus_allowed_list"),
            )
        })
        .collect()
}

/// The direct children of `pid` (the device model and QEMU), by command name.
fn children(pid: u32) -> Vec<(u32, String)> {
    let list = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    list.split_whitespace()
        .map(|c| {
            let c: u32 = c.parse().unwrap();
            let comm = std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap();
            (c, comm.trim().to_owned())
        })
        .collect()
}

/// The CPUs this test may use, from a Cpus_allowed_list such as `0-1,3`.
fn allowed_cpus() -> Vec<u32> {
    let list = status_field("/proc/self", "Cpus_allowed_list");
    list.split(',')
        .flat_map(|part| {
            let (lo, hi) = part.split_once('-').unwrap_or((part, part));
            lo.parse::<u32>().unwrap()..=hi.parse::<u32>().unwrap()
        })
        .collect()
}

#[test]
fn a_partitioned_run_places_the_frontend_and_the_backend_on_their_cpus() {
    if !prerequisites("e2e_partition") {
        return;
    }
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!(
            "\n*** SKIPPED e2e_partition: one CPU allowed ({cpus:?}), nothing to partition ***\n"
        );
        return;
    }
    // The reverse of what `auto` would choose, so that the flag is seen to be obeyed.
    let (frontend, backend) = (cpus[1].to_string(), cpus[0].to_string());
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/remio-e2e-part").unwrap();
    let console_sock = dir.as_path().join("console.sock");
    let _lock = boot_lock();
    // The guest waits for the host's go-ahead on its console (served on a socket) before it
    // reads, so that every process and thread is there when the host looks.
    let script = "exec 3<>/dev/hvc0; stty -echo <&3; echo PLACED?; read -r go <&3; \
                  dd if=/dev/vda of=/dev/null bs=1M count=16 iflag=direct 2>/dev/null \
                  && echo READ-OK";
    let run = LiveRun::spawn(
        remio_run_console_command(&console_sock, script)
            .arg("-v")
            .arg("--partition")
            .arg(format!("{frontend}/{backend}"))
            .arg("--no-net")
            .env_remove("REMIO_BLK_POLL_US"),
    );
    let pid = run.pid();
    run.wait_for("PLACED?");

    let platform = threads(pid);
    let kids = children(pid);
    let dm = kids
        .iter()
        .find(|(_, c)| c == "remio")
        .expect("device model");
    let qemu = kids
        .iter()
        .find(|(_, c)| c.starts_with("qemu"))
        .expect("QEMU");
    let dm_threads = threads(dm.0);
    let qemu_threads = threads(qemu.0);
    let dm_env = std::fs::read(format!("/proc/{}/environ", dm.0)).unwrap();

    let mut console = connect_until(&console_sock, run.deadline());
    console.write_all(b"go\n").unwrap();
    run.wait_for("READ-OK");
    let (status, err) = run.finish();
    eprintln!("platform {platform:?}\ndevice model {dm_threads:?}\nQEMU {qemu_threads:?}");
    assert!(status.success(), "remio run: {status}");
    assert!(
        err.contains(&format!(
            "CPUs          frontend on CPUs {frontend}, backend on CPUs {backend}"
        )),
        "the summary names the partition"
    );

    let on = |threads: &[(String, String)], name: &str| -> Vec<String> {
        threads
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, cpus)| cpus.clone())
            .collect()
    };
    assert_eq!(
        on(&platform, "remio-mpqemu"),
        std::slice::from_ref(&frontend)
    );
    assert_eq!(
        on(&platform, "remio-irqfd0"),
        std::slice::from_ref(&backend)
    );
    assert!(!on(&platform, "remio-api-conn").is_empty());
    assert!(on(&platform, "remio-api-conn")
        .iter()
        .all(|c| *c == backend));
    assert!(qemu_threads.iter().all(|(_, c)| *c == frontend));
    assert!(dm_threads.iter().all(|(_, c)| *c == backend));
    let env = String::from_utf8_lossy(&dm_env);
    assert!(
        env.split('\0').any(|v| v == "REMIO_BLK_POLL_US=1000"),
        "the device model polls on its own CPU"
    );
}
