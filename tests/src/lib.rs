//! End-to-end tests of the real `ringvm` binary live in `tests/`; this library holds their
//! shared helpers.
