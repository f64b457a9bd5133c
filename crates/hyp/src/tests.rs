//! Behaviour tests of the whole model (filled in below).
