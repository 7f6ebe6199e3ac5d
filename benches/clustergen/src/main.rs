//! Cluster generator for benchmarks (being written).
fn main() {}
