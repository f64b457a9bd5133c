//! remio-frontend (work in progress).
