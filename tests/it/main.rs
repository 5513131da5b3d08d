//! Integration tests: one binary.
mod bench;
