//! Per-device counters: requests and bytes by kind, data dropped by cause, errors,
//! DEVICE_NEEDS_RESET.
//!
//! What the kinds mean per device: block counts its request types; rng `read` (entropy
//! buffers filled); console `read` (receive buffers filled with input given to the guest, their
//! bytes) and `write` (transmit buffers taken from the guest, the bytes of its output); net
//! `read` (frames delivered to the guest, bytes of the frames without the virtio-net header)
//! and `write` (frames the guest sent that went to the backend, likewise). What a device took
//! and could not deliver is counted by [`DropCause`], not as a request.
//!
//! One [`DeviceStats`] per device, created with its transport ([`crate::SharedStatus::stats`])
//! and reached by its workers through their [`crate::Interrupt`]. Every counter is a relaxed
//! atomic bumped by the thread that handled the request: no lock, no allocation, nothing
//! another thread waits for. Readers ([`DeviceStats::snapshot`], the device model's stats
//! socket that `remio stats` reads) see each counter exactly, not all at one instant.

use std::sync::atomic::{AtomicU64, Ordering};

/// Defines a counter-index enum: its variants (with the names `remio stats` shows), `ALL` in
/// index order, `name()`, and the count as a constant, so the three cannot drift apart.
macro_rules! counter_index {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident, count $count:ident {
            $( $(#[$vmeta:meta])* $variant:ident = $index:literal => $label:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant = $index, )+
        }

        #[doc = concat!("Number of [`", stringify!($name), "`]s.")]
        pub const $count: usize = [$($index),+].len();

        impl $name {
            /// Every value, in index order.
            pub const ALL: [$name; $count] = [$(Self::$variant),+];

            /// The name `remio stats` uses.
            pub fn name(self) -> &'static str {
                match self {
                    $( Self::$variant => $label, )+
                }
            }
        }
    };
}

counter_index! {
    /// What a request did, across the devices: the kinds `remio stats` shows.
    pub enum RequestKind, count KINDS {
        /// Data from the device to the driver (block IN, rng entropy, console/net receive).
        Read = 0 => "read",
        /// Data from the driver to the device (block OUT, console/net transmit).
        Write = 1 => "write",
        /// Block FLUSH.
        Flush = 2 => "flush",
        /// Block GET_ID.
        GetId = 3 => "get_id",
        /// Block DISCARD.
        Discard = 4 => "discard",
        /// Block WRITE_ZEROES.
        WriteZeroes = 5 => "write_zeroes",
        /// A request the device refused before executing it (malformed, unsupported, out of
        /// range), whatever its type.
        Other = 6 => "other",
    }
}

counter_index! {
    /// Why a device dropped data it took instead of delivering it: the kinds `remio stats` shows.
    pub enum DropCause, count DROP_CAUSES {
        /// net: a datagram over the frame maximum received from the backend (not delivered).
        RxOversize = 0 => "rx_oversize",
        /// net: a datagram from another sender than the peer (not delivered).
        RxForeign = 1 => "rx_foreign",
        /// net: a frame larger than the driver's receive buffer (the buffer is returned empty).
        RxTruncated = 2 => "rx_truncated",
        /// net: a transmit chain over the header plus the frame maximum (not sent).
        TxOversize = 3 => "tx_oversize",
        /// net: a transmit chain that is not a frame (a device-writable or unreadable
        /// descriptor, or no more than the header).
        TxMalformed = 4 => "tx_malformed",
        /// net: a frame the backend refused; console: output the port did not take (nobody
        /// reading, or the reader gone).
        TxBackend = 5 => "tx_backend",
    }
}

/// The counters of one device.
#[derive(Debug, Default)]
pub struct DeviceStats {
    requests: [AtomicU64; KINDS],
    bytes: [AtomicU64; KINDS],
    drops: [AtomicU64; DROP_CAUSES],
    errors: AtomicU64,
    needs_reset: AtomicU64,
}

impl DeviceStats {
    /// One request of `kind` that moved `bytes` bytes of data (0 for none); `ok` is false when
    /// the device answered it with an error status.
    pub fn record(&self, kind: RequestKind, bytes: u64, ok: bool) {
        let i = kind as usize;
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        if bytes != 0 {
            self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        }
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The device dropped one frame or chunk of data, for `cause`.
    pub fn record_drop(&self, cause: DropCause) {
        self.drops[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The device entered DEVICE_NEEDS_RESET.
    pub fn record_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> DeviceStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DeviceStatsSnapshot {
            requests: std::array::from_fn(|i| g(&self.requests[i])),
            bytes: std::array::from_fn(|i| g(&self.bytes[i])),
            drops: std::array::from_fn(|i| g(&self.drops[i])),
            errors: g(&self.errors),
            needs_reset: g(&self.needs_reset),
        }
    }
}

/// What a [`DeviceStats`] held when read; arrays are indexed by [`RequestKind`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStatsSnapshot {
    /// Requests by kind.
    pub requests: [u64; KINDS],
    /// Data bytes by kind.
    pub bytes: [u64; KINDS],
    /// Drops by cause, indexed by [`DropCause`].
    pub drops: [u64; DROP_CAUSES],
    /// Requests answered with an error status.
    pub errors: u64,
    /// Times the device entered DEVICE_NEEDS_RESET.
    pub needs_reset: u64,
}

impl DeviceStatsSnapshot {
    /// Requests of `kind`.
    pub fn requests_of(&self, kind: RequestKind) -> u64 {
        self.requests[kind as usize]
    }

    /// Bytes of `kind`.
    pub fn bytes_of(&self, kind: RequestKind) -> u64 {
        self.bytes[kind as usize]
    }

    /// Drops for `cause`.
    pub fn drops_of(&self, cause: DropCause) -> u64 {
        self.drops[cause as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_bytes_and_errors_are_counted_by_kind() {
        let s = DeviceStats::default();
        s.record(RequestKind::Read, 4096, true);
        s.record(RequestKind::Read, 512, true);
        s.record(RequestKind::Write, 0, false);
        s.record_needs_reset();

        let snap = s.snapshot();

        assert_eq!(snap.requests_of(RequestKind::Read), 2);
        assert_eq!(snap.bytes_of(RequestKind::Read), 4608);
        assert_eq!(snap.requests_of(RequestKind::Write), 1);
        assert_eq!(snap.bytes_of(RequestKind::Write), 0);
        assert_eq!((snap.errors, snap.needs_reset), (1, 1));
    }

    #[test]
    fn kinds_are_listed_in_index_order() {
        for (i, k) in RequestKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{}", k.name());
        }
        for (i, c) in DropCause::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }

    #[test]
    fn drops_are_counted_by_cause_apart_from_requests() {
        let s = DeviceStats::default();
        s.record_drop(DropCause::RxForeign);
        s.record_drop(DropCause::RxForeign);
        s.record_drop(DropCause::TxBackend);

        let snap = s.snapshot();

        assert_eq!(snap.drops_of(DropCause::RxForeign), 2);
        assert_eq!(snap.drops_of(DropCause::TxBackend), 1);
        assert_eq!(snap.drops_of(DropCause::RxOversize), 0);
        assert_eq!(snap.requests, [0; KINDS]);
        assert_eq!(snap.errors, 0);
    }
}
