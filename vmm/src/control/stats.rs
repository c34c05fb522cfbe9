//! `stats`: what the VMM reads for it (vCPU exit counters, each device's shared statistics
//! page, each device process's CPU time and memory from /proc) and the table `ringvm stats`
//! prints of the response.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use executor::AsyncFd;
use memory::SharedCounters;
use serde_json::{json, Map, Value};
use virtio::stats::{Snapshot, LATENCY_BUCKETS, NET_COUNTERS};

use crate::devices::vhost_user::DeviceControl;
use crate::vcpus::{VcpuControl, EXIT_REASONS};

/// A device as the control socket sees it.
pub struct ControlledDevice {
    pub name: String,
    pub kind: virtio::DeviceType,
    pub queues: usize,
    pub control: DeviceControl,
    /// Its restarts so far (self-healing; shared with its vhost-user backend).
    pub restarts: Arc<AtomicU32>,
    /// For ringvm's own device processes (an external backend has none).
    pub process: Option<ProcessStats>,
}

/// What the VMM reads of one of its device processes.
pub struct ProcessStats {
    counters: SharedCounters,
    /// The process's /proc files: replaced when the process is restarted.
    proc: Rc<RefCell<ProcFiles>>,
}

/// /proc/PID/stat and status of a device process, open (the VMM's seccomp policy has no open:
/// they are opened before it, or by the respawner, and read through the ring at offset 0,
/// which makes the kernel fill them afresh).
pub struct ProcFiles {
    pid: i32,
    stat: Rc<AsyncFd>,
    status: Rc<AsyncFd>,
}

impl ProcFiles {
    /// Opens /proc/`pid`/stat and status now.
    pub fn open(pid: i32) -> std::io::Result<ProcFiles> {
        let (stat, status) = open_proc_files(pid)?;
        Ok(Self::new(pid, stat, status))
    }

    /// The files of process `pid`, opened elsewhere.
    pub fn new(pid: i32, stat: OwnedFd, status: OwnedFd) -> ProcFiles {
        ProcFiles {
            pid,
            stat: Rc::new(AsyncFd::new(stat)),
            status: Rc::new(AsyncFd::new(status)),
        }
    }
}

/// /proc/`pid`/stat and status, opened (by the VMM before its filter, or by the respawner for
/// a restarted process).
pub fn open_proc_files(pid: i32) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let open = |file: &str| std::fs::File::open(format!("/proc/{pid}/{file}"));
    Ok((open("stat")?.into(), open("status")?.into()))
}

impl ProcessStats {
    /// A statistics page for a device process, its layout mark written.
    pub fn page() -> std::io::Result<SharedCounters> {
        let page =
            SharedCounters::create(virtio::stats::COUNTERS).map_err(std::io::Error::other)?;
        virtio::stats::init_page(page.as_slice());
        Ok(page)
    }

    /// Opens /proc/`pid`/stat and status now.
    pub fn new(pid: i32, counters: SharedCounters) -> std::io::Result<ProcessStats> {
        Ok(ProcessStats {
            counters,
            proc: Rc::new(RefCell::new(ProcFiles::open(pid)?)),
        })
    }

    /// Where a restart puts the new process's files.
    pub fn proc_files(&self) -> Rc<RefCell<ProcFiles>> {
        self.proc.clone()
    }

    async fn read(fd: &AsyncFd) -> Option<String> {
        let (res, buf) = fd.read_at(Vec::with_capacity(4096), 0).await;
        res.ok()?;
        String::from_utf8(buf).ok()
    }

    async fn proc_fields(&self, ticks: u64) -> Map<String, Value> {
        let mut m = Map::new();
        let (pid, stat, status) = {
            let p = self.proc.borrow();
            (p.pid, p.stat.clone(), p.status.clone())
        };
        m.insert("pid".into(), json!(pid));
        if let Some(stat) = Self::read(&stat).await {
            if let Some((user, system)) = parse_cpu_ticks(&stat) {
                let ms = |t: u64| t.saturating_mul(1000) / ticks.max(1);
                m.insert(
                    "cpu_ms".into(),
                    json!({ "user": ms(user), "system": ms(system) }),
                );
            }
        }
        if let Some(status) = Self::read(&status).await {
            let kib = |key| parse_status_kib(&status, key);
            m.insert(
                "memory_kib".into(),
                json!({ "rss": kib("VmRSS:"), "peak_rss": kib("VmHWM:"), "virtual": kib("VmSize:") }),
            );
        }
        m
    }
}

/// utime and stime (fields 14 and 15) of /proc/PID/stat, in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name (field 2) is in parentheses and may hold anything: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some((fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?))
}

/// The value of a `Key:   N kB` line of /proc/PID/status.
fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// The `stats` object.
pub async fn collect(vcpus: &VcpuControl, devices: &[ControlledDevice], state: &str) -> Value {
    let ticks = crate::sys::clock_ticks();
    let vcpus: Vec<Value> = (0..vcpus.cpus())
        .map(|id| {
            let exits: Map<String, Value> = EXIT_REASONS
                .iter()
                .zip(vcpus.exits(id))
                .map(|(name, n)| (name.to_string(), json!(n)))
                .collect();
            json!({ "id": id, "exits": exits })
        })
        .collect();
    let mut out = Vec::new();
    for d in devices {
        let mut m = Map::new();
        m.insert("name".into(), json!(d.name));
        m.insert("type".into(), json!(d.kind.name()));
        m.insert("restarts".into(), json!(d.restarts.load(Ordering::Relaxed)));
        match &d.process {
            Some(p) => {
                m.extend(p.proc_fields(ticks).await);
                if let Some(snap) = Snapshot::read(p.counters.as_slice(), d.queues) {
                    m.extend(device_counters(d.kind, &snap));
                }
            }
            None => {
                m.insert("pid".into(), Value::Null);
                m.insert("external".into(), json!(true));
            }
        }
        out.push(Value::Object(m));
    }
    json!({ "state": state, "vcpus": vcpus, "devices": out })
}

fn device_counters(kind: virtio::DeviceType, snap: &Snapshot) -> Map<String, Value> {
    let mut m = Map::new();
    let queues: Vec<Value> = snap
        .queues
        .iter()
        .enumerate()
        .map(|(i, q)| json!({ "index": i, "requests": q.requests, "bytes": q.bytes, "errors": q.errors }))
        .collect();
    m.insert("queues".into(), json!(queues));
    match kind {
        virtio::DeviceType::Block => {
            m.insert("latency_us_log2".into(), json!(snap.latency_us_log2));
        }
        virtio::DeviceType::Net => {
            let net: Map<String, Value> = NET_COUNTERS
                .iter()
                .zip(snap.net)
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            m.insert("net".into(), Value::Object(net));
        }
        virtio::DeviceType::Vsock => {
            m.insert(
                "vsock".into(),
                json!({
                    "connections_opened": snap.vsock_opened,
                    "connections_closed": snap.vsock_closed,
                    "connections": snap.vsock_opened.saturating_sub(snap.vsock_closed),
                }),
            );
        }
        _ => {}
    }
    m
}

/// The readable table of a `stats` response (`ringvm stats` without `--json`).
pub fn table(stats: &Value) -> String {
    let mut t = String::new();
    let n = |v: &Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    let _ = writeln!(t, "state: {}", stats["state"].as_str().unwrap_or("?"));
    let _ = writeln!(t, "\nvCPU exits");
    let _ = write!(t, "{:<6}", "vcpu");
    for r in EXIT_REASONS {
        let _ = write!(t, " {r:>14}");
    }
    t.push('\n');
    for v in stats["vcpus"].as_array().into_iter().flatten() {
        let _ = write!(t, "{:<6}", n(&v["id"]));
        for r in EXIT_REASONS {
            let _ = write!(t, " {:>14}", n(&v["exits"][r]));
        }
        t.push('\n');
    }
    let devices = stats["devices"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        t,
        "\n{:<24} {:<6} {:>8} {:>9} {:>12} {:>12} {:>12}",
        "device", "type", "pid", "restarts", "user_ms", "system_ms", "rss_kib"
    );
    for d in &devices {
        let _ = writeln!(
            t,
            "{:<24} {:<6} {:>8} {:>9} {:>12} {:>12} {:>12}",
            d["name"].as_str().unwrap_or("?"),
            d["type"].as_str().unwrap_or("?"),
            n(&d["pid"]),
            n(&d["restarts"]),
            n(&d["cpu_ms"]["user"]),
            n(&d["cpu_ms"]["system"]),
            n(&d["memory_kib"]["rss"]),
        );
    }
    let _ = writeln!(
        t,
        "\n{:<24} {:>5} {:>12} {:>16} {:>8}",
        "device", "queue", "requests", "bytes", "errors"
    );
    for d in &devices {
        for q in d["queues"].as_array().into_iter().flatten() {
            let _ = writeln!(
                t,
                "{:<24} {:>5} {:>12} {:>16} {:>8}",
                d["name"].as_str().unwrap_or("?"),
                n(&q["index"]),
                n(&q["requests"]),
                n(&q["bytes"]),
                n(&q["errors"]),
            );
        }
    }
    for d in &devices {
        let name = d["name"].as_str().unwrap_or("?");
        if let Some(h) = d["latency_us_log2"].as_array() {
            let buckets: Vec<String> = h
                .iter()
                .enumerate()
                .filter(|(_, c)| c.as_u64().unwrap_or(0) > 0)
                .map(|(i, c)| {
                    let lo = if i == 0 { 0 } else { 1u64 << i };
                    if i + 1 == LATENCY_BUCKETS {
                        format!(">={lo}us:{}", n(c))
                    } else {
                        format!("{lo}-{}us:{}", (1u64 << (i + 1)) - 1, n(c))
                    }
                })
                .collect();
            let _ = writeln!(t, "\n{name} latency: {}", buckets.join(" "));
        }
        if let Some(net) = d["net"].as_object() {
            let parts: Vec<String> = net.iter().map(|(k, v)| format!("{k}={}", n(v))).collect();
            let _ = writeln!(t, "\n{name}: {}", parts.join(" "));
        }
        if let Some(v) = d["vsock"].as_object() {
            let parts: Vec<String> = v.iter().map(|(k, v)| format!("{k}={}", n(v))).collect();
            let _ = writeln!(t, "\n{name}: {}", parts.join(" "));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_come_after_the_command_name_whatever_it_holds() {
        let stat = "42 (ringvm dev) x) S 1 42 42 0 -1 4194560 100 0 0 0 17 5 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some((17, 5)));
        assert_eq!(parse_cpu_ticks("42 (short) S 1"), None);
    }

    #[test]
    fn status_values_in_kib() {
        let status = "Name:\tringvm\nVmHWM:\t    2048 kB\nVmRSS:\t    1536 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(1536));
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(2048));
        assert_eq!(parse_status_kib(status, "VmSize:"), None);
    }

    #[test]
    fn the_table_shows_every_section() {
        let stats = json!({
            "state": "running",
            "vcpus": [{ "id": 0, "exits": { "io_out": 7 } }],
            "devices": [{
                "name": "block0", "type": "block", "pid": 9, "restarts": 0,
                "cpu_ms": { "user": 1, "system": 2 }, "memory_kib": { "rss": 3 },
                "queues": [{ "index": 0, "requests": 10, "bytes": 40960, "errors": 0 }],
                "latency_us_log2": [0, 0, 0, 0, 0, 0, 0, 4],
            }],
        });
        let t = table(&stats);
        assert!(t.contains("state: running"), "{t}");
        assert!(t.contains("block0"), "{t}");
        assert!(t.contains("40960"), "{t}");
        assert!(t.contains("128-255us:4"), "{t}");
    }
}
