//! remio-hyp (work in progress).
