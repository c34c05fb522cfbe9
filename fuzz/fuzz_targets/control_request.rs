//! Fuzzes the control socket's request parser: any client may write any line.
//!
//! Invariants: `parse` never panics; what it accepts is one of the commands it lists, and a
//! request line made for that command parses back to the same request. An error message
//! stays short (a client's bytes are quoted only in part).
//!
//! Input layout: the line's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::control::protocol::{parse, request_line, Request, COMMANDS};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(request) => {
            let name = match request {
                Request::Stop => "stop",
                Request::Suspend => "suspend",
                Request::Resume => "resume",
                Request::Status => "status",
                Request::Stats => "stats",
            };
            assert!(COMMANDS.contains(&name));
            let line = request_line(name);
            assert_eq!(parse(line.trim_end().as_bytes()), Ok(request));
        }
        Err(e) => assert!(e.len() <= 1024, "an error of {} bytes", e.len()),
    }
});
