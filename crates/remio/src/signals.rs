//! Graceful stop on SIGINT/SIGTERM for the long-running commands (`remio platform`, `remio
//! dm`): block them before any thread starts, so every thread inherits the mask, then take them
//! in one thread with `sigwait`.

/// SIGINT and SIGTERM: the signals that stop a remio process gracefully.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
    }
    set
}

/// Blocks SIGINT and SIGTERM in this thread and in every thread started after it.
pub fn block_stop_signals() {
    let set = stop_signals();
    // SAFETY: `set` is initialised; this only changes the calling thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Waits for SIGINT or SIGTERM (blocked by [`block_stop_signals`]) and returns it.
pub fn wait_stop_signal() -> i32 {
    let set = stop_signals();
    let mut sig = 0;
    // SAFETY: `set` is initialised and `sig` is a valid out-pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}
