//! The control protocol, version [`VERSION`]: one JSON object per line each way.
//!
//! A request is `{"command": NAME}`, optionally with `"version": 1` (a client that names
//! another version is refused). Every response carries `"version"` and `"ok"`; a failure
//! has `"error"` with a message, a success what its command returns. README's "Control
//! socket" section lists the commands.

use serde_json::{json, Map, Value};

/// The protocol version this VMM speaks.
pub const VERSION: u64 = 1;

/// Commands, as a client names them.
pub const COMMANDS: [&str; 5] = ["stop", "suspend", "resume", "status", "stats"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// End the VM (exit status 0).
    Stop,
    /// vCPUs out of KVM_RUN, every device's rings stopped.
    Suspend,
    /// The opposite of `Suspend`.
    Resume,
    /// Whether the VM runs or is suspended.
    Status,
    /// Counters of every vCPU and device.
    Stats,
}

/// Parses one request line (without its newline).
pub fn parse(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "the request is not UTF-8".to_string())?;
    if text.trim().is_empty() {
        return Err("empty request".into());
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("the request is not JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err("the request is not a JSON object".into());
    };
    match fields.get("version") {
        None => {}
        Some(v) if v.as_u64() == Some(VERSION) => {}
        Some(v) => {
            return Err(format!(
                "protocol version {} is not spoken here (this VMM speaks {VERSION})",
                shorten(&v.to_string())
            ))
        }
    }
    let command = match fields.get("command") {
        Some(Value::String(c)) => c.as_str(),
        Some(_) => return Err("\"command\" is not a string".into()),
        None => return Err("the request has no \"command\"".into()),
    };
    Ok(match command {
        "stop" => Request::Stop,
        "suspend" => Request::Suspend,
        "resume" => Request::Resume,
        "status" => Request::Status,
        "stats" => Request::Stats,
        other => {
            return Err(format!(
                "unknown command \"{}\" (known: {})",
                shorten(other),
                COMMANDS.join(", ")
            ))
        }
    })
}

/// A request line for `command`.
pub fn request_line(command: &str) -> String {
    json!({ "version": VERSION, "command": command }).to_string()
}

/// A success, with `fields` added.
pub fn ok(fields: Map<String, Value>) -> String {
    let mut v = Map::new();
    v.insert("version".into(), json!(VERSION));
    v.insert("ok".into(), json!(true));
    v.extend(fields);
    Value::Object(v).to_string()
}

/// A failure with its message.
pub fn error(message: &str) -> String {
    json!({ "version": VERSION, "ok": false, "error": message }).to_string()
}

/// At most 64 characters of untrusted text, for a message.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect();
    if out.len() < s.len() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_requests_and_rejects_junk() {
        assert_eq!(parse(br#"{"command":"stop"}"#), Ok(Request::Stop));
        assert_eq!(
            parse(br#" {"version":1, "command":"stats", "extra":[1]} "#),
            Ok(Request::Stats)
        );
        assert_eq!(
            parse(request_line("suspend").as_bytes()),
            Ok(Request::Suspend)
        );
        let err = |raw: &[u8]| parse(raw).unwrap_err();
        assert!(err(b"\xff\xfe").contains("UTF-8"));
        assert!(err(b"stop").contains("not JSON"));
        assert!(err(b"{\"command\":").contains("not JSON"));
        assert!(err(b"[1,2]").contains("not a JSON object"));
        assert!(err(b"{}").contains("no \"command\""));
        assert!(err(br#"{"command":7}"#).contains("not a string"));
        assert!(err(br#"{"command":"reboot"}"#).contains("unknown command \"reboot\""));
        assert!(err(br#"{"version":2,"command":"stop"}"#).contains("version 2"));
        assert!(err(b"  ").contains("empty"));
        let long = format!(r#"{{"command":"{}"}}"#, "x".repeat(1000));
        assert!(err(long.as_bytes()).len() < 200, "the echo is cut");
    }

    proptest::proptest! {
        /// Whatever a client sends, the answer is one line of JSON with the version: a
        /// request, or an error whose message is short.
        #[test]
        fn any_line_parses_or_gets_a_short_error(line in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            if let Err(e) = parse(&line) {
                let reply = error(&e);
                proptest::prop_assert!(!reply.contains('\n'));
                let v: Value = serde_json::from_str(&reply).unwrap();
                proptest::prop_assert_eq!(&v["version"], &json!(VERSION));
                proptest::prop_assert!(e.len() < 400, "{}", e);
            }
        }

        /// JSON objects with any command and version: known commands parse, others do not.
        #[test]
        fn any_command_is_known_or_refused(command in "\\PC{0,80}", version in 0u64..4) {
            let line = json!({ "version": version, "command": command }).to_string();
            let known = COMMANDS.contains(&command.as_str()) && version == VERSION;
            proptest::prop_assert_eq!(parse(line.as_bytes()).is_ok(), known);
        }
    }

    #[test]
    fn responses_are_one_line_of_json_with_the_version() {
        let e: Value = serde_json::from_str(&error("bad\nthing")).unwrap();
        assert_eq!(e["version"], 1);
        assert_eq!(e["ok"], false);
        assert_eq!(e["error"], "bad\nthing");
        assert!(!error("bad\nthing").contains('\n'));
        let mut m = Map::new();
        m.insert("state".into(), json!("running"));
        let o: Value = serde_json::from_str(&ok(m)).unwrap();
        assert_eq!(
            (o["ok"].clone(), o["state"].clone()),
            (json!(true), json!("running"))
        );
    }
}
