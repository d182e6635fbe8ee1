//! Integration tests, one binary: each module covers one layer or concern.

mod common;
mod hooks;
mod log;
mod publisher;
mod store;
