//! remio-virtio (work in progress).
