//! Loom model of the request lifecycle (written next).
