//! remio-dispatcher (work in progress).
