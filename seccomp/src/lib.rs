//! Per-device syscall policies compiled to BPF.
