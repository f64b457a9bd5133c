//! The device-model API over a UNIX socket: [`SocketApi`] (the client a device-model process
//! uses) and [`SocketServer`] (the platform side, serving any [`crate::DmApi`]).
//!
//! The protocol is documented in [`crate::wire`]. Its shape, for speed: one packet each way
//! per operation; a request reaches a waiting ATTACH straight from the thread that queued it
//! (the server installs a [`crate::Notifier`] on its session, no server thread is woken); and
//! COMPLETE_ATTACH completes one request and waits for the next in a single round trip. On
//! the client, the thread that waits for a reply reads the socket itself and hands other
//! threads' replies over, so a single device-model thread never switches threads.

mod client;
mod server;

pub use client::{SocketApi, SocketSession};
pub use server::{SocketServer, SocketServerConfig, SocketServerStats, OUTBOUND_MAX};

#[cfg(test)]
mod tests;
