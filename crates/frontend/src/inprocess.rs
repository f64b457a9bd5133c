//! The in-process frontend (work in progress).
