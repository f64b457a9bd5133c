//! The dispatch gate: counts dispatch passes running on a DM and lets `pause` wait until none
//! runs (the driver's `drain_workqueue`), while refusing new passes.

use crate::sync::{lock, wait, Condvar, Mutex};

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    running: u32,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Leaf lock, held only to count.
    state: Mutex<GateState>,
    idle: Condvar,
}

/// Proof that a pass is running; leaving drops it.
#[derive(Debug)]
pub(crate) struct Pass<'a>(&'a Gate);

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut s = lock(&self.0.state);
        s.running -= 1;
        if s.running == 0 && s.paused {
            drop(s);
            self.0.idle.notify_all();
        }
    }
}

impl Gate {
    /// Starts a pass, unless paused.
    pub(crate) fn enter(&self) -> Option<Pass<'_>> {
        let mut s = lock(&self.state);
        if s.paused {
            return None;
        }
        s.running += 1;
        Some(Pass(self))
    }

    /// Refuses new passes and returns when no pass runs.
    pub(crate) fn pause(&self) {
        let mut s = lock(&self.state);
        s.paused = true;
        while s.running > 0 {
            s = wait(&self.idle, s);
        }
    }

    /// Accepts passes again.
    pub(crate) fn resume(&self) {
        lock(&self.state).paused = false;
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn paused_gate_refuses_passes_until_resumed() {
        let g = Gate::default();
        g.pause();
        assert!(g.enter().is_none());
        g.resume();
        assert!(g.enter().is_some());
    }

    #[test]
    fn pause_waits_for_the_running_pass() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let g = Arc::new(Gate::default());
        let released = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (g2, r2) = (g.clone(), released.clone());
        let t = std::thread::spawn(move || {
            let pass = g2.enter().unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            r2.store(true, Ordering::SeqCst);
            drop(pass);
        });
        rx.recv().unwrap();
        g.pause();
        assert!(released.load(Ordering::SeqCst));
        t.join().unwrap();
    }
}
