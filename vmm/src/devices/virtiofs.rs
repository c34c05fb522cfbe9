//! Shared directories (`--shared-dir PATH:TAG[:...]`): virtio-fs devices (virtio 1.2 §5.11)
//! served by virtiofsd, the field's standard backend, over vhost-user.
//!
//! For each shared directory ringvm starts `virtiofsd --fd 3 --shared-dir PATH --sandbox
//! namespace --seccomp kill ...` (its own sandbox on) with a listening socket it made in a
//! private directory (mode 0700, removed once connected), connects to it as the frontend of
//! device type 26, and watches and reaps the process like its own device processes. The
//! configuration space (`tag`, `num_request_queues`) is ringvm's: virtiofsd need not
//! offer it (it does only with its `--tag`), as QEMU and crosvm also keep the tag on their
//! side. Queue 0 is the high-priority queue, then one request queue per queue the backend
//! reports beyond it. `--vhost-user type=fs,socket=PATH,tag=TAG` connects to a virtiofsd the
//! user runs, with the same configuration.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use virtio::process::SpecKeys;

use crate::device_process::{self, DeviceProcess};

/// Bytes of the `tag` field (UTF-8, NUL-padded, not NUL-terminated when full).
pub const TAG_LEN: usize = 36;

/// virtiofsd's cache policy (`--cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cache {
    #[default]
    Auto,
    Always,
    Never,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Auto => "auto",
            Cache::Always => "always",
            Cache::Never => "never",
        }
    }
}

/// One `--shared-dir PATH:TAG[:type=fs][:cache=auto|always|never][:writeback=BOOL]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedDir {
    pub path: PathBuf,
    pub tag: String,
    pub cache: Cache,
    pub writeback: bool,
}

/// A tag as virtio-fs carries it: 1 to 36 bytes of UTF-8 without NUL.
pub fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("the tag is empty".into());
    }
    if tag.len() > TAG_LEN {
        return Err(format!(
            "tag '{tag}' is {} bytes, longer than virtio-fs's {TAG_LEN}",
            tag.len()
        ));
    }
    if tag.contains('\0') {
        return Err("the tag contains a NUL byte".into());
    }
    Ok(())
}

impl std::str::FromStr for SharedDir {
    type Err = String;

    /// crosvm's syntax: `PATH:TAG` then `:key=value` options.
    fn from_str(s: &str) -> Result<SharedDir, String> {
        let mut parts = s.split(':');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("PATH is empty")?;
        let tag = parts.next().ok_or("give PATH:TAG")?;
        check_tag(tag)?;
        let mut dir = SharedDir {
            path: PathBuf::from(path),
            tag: tag.to_owned(),
            cache: Cache::default(),
            writeback: false,
        };
        let mut keys = SpecKeys::default();
        for kv in parts {
            let key = kv.split_once('=').map_or(kv, |(k, _)| k);
            match kv.split_once('=') {
                Some(("type", "fs")) => {}
                Some(("type", t)) => return Err(format!("type={t}: only type=fs is supported")),
                Some(("cache", v)) => {
                    dir.cache = match v {
                        "auto" => Cache::Auto,
                        "always" => Cache::Always,
                        "never" => Cache::Never,
                        _ => return Err(format!("cache={v}: expected auto, always or never")),
                    }
                }
                Some(("writeback", v)) => {
                    dir.writeback = match v {
                        "true" | "1" | "on" | "yes" => true,
                        "false" | "0" | "off" | "no" => false,
                        _ => return Err(format!("writeback={v}: expected true or false")),
                    }
                }
                _ => {
                    return Err(format!(
                        "unknown option '{kv}' (expected type=fs, cache=auto|always|never, \
                         writeback=BOOL)"
                    ))
                }
            }
            keys.once(key)?;
        }
        Ok(dir)
    }
}

/// Checks every shared directory and the program before anything starts: each PATH is a
/// directory, tags are distinct (with `--vhost-user type=fs` tags too), and virtiofsd is
/// there. Returns the program to run.
pub fn check(
    dirs: &[SharedDir],
    other_tags: &[&str],
    program: Option<&Path>,
) -> Result<Option<PathBuf>> {
    for (i, d) in dirs.iter().enumerate() {
        let meta = std::fs::metadata(&d.path).with_context(|| {
            format!(
                "--shared-dir {}: cannot use the directory",
                d.path.display()
            )
        })?;
        if !meta.is_dir() {
            return Err(anyhow!(
                "--shared-dir {}: not a directory",
                d.path.display()
            ));
        }
        let earlier = dirs[..i].iter().map(|e| e.tag.as_str());
        if earlier
            .chain(other_tags.iter().copied())
            .any(|t| t == d.tag)
        {
            return Err(anyhow!("--shared-dir: tag '{}' is given twice", d.tag));
        }
    }
    for (i, t) in other_tags.iter().enumerate() {
        if other_tags[..i].contains(t) {
            return Err(anyhow!("--vhost-user type=fs: tag '{t}' is given twice"));
        }
    }
    if dirs.is_empty() {
        return Ok(None);
    }
    let program = match program {
        Some(p) => p.to_path_buf(),
        None => find_in_path("virtiofsd").ok_or_else(|| {
            anyhow!(
                "--shared-dir needs virtiofsd, which is not in PATH (install it with \
                 `cargo install virtiofsd`, or give --virtiofsd PATH)"
            )
        })?,
    };
    let executable = std::fs::metadata(&program)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false);
    if !executable {
        return Err(anyhow!(
            "--virtiofsd {}: not an executable file",
            program.display()
        ));
    }
    Ok(Some(program))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The configuration space of a virtio-fs device: `tag` and `num_request_queues` (§5.11.4).
pub fn config(tag: &str, num_queues: usize) -> Vec<u8> {
    let mut config = vec![0u8; TAG_LEN + 4];
    let n = tag.len().min(TAG_LEN);
    config[..n].copy_from_slice(&tag.as_bytes()[..n]);
    let requests = u32::try_from(num_queues.saturating_sub(1)).unwrap_or(u32::MAX);
    config[TAG_LEN..].copy_from_slice(&requests.to_le_bytes());
    config
}

/// A private directory for one socket, removed (with what is in it) when dropped.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts virtiofsd for `dir` (device `name`) and connects to it; returns its process
/// (to watch and reap) and the connected socket.
pub fn start(program: &Path, name: &str, dir: &SharedDir) -> Result<(DeviceProcess, OwnedFd)> {
    let private =
        PrivateDir(std::env::temp_dir().join(format!("ringvm-{}-{name}", std::process::id())));
    let _ = std::fs::remove_dir_all(&private.0);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private.0)
        .with_context(|| format!("device {name}: cannot create {}", private.0.display()))?;
    let path = private.0.join("virtiofsd.sock");
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("device {name}: cannot listen on {}", path.display()))?;
    let shared = std::fs::canonicalize(&dir.path)
        .with_context(|| format!("--shared-dir {}", dir.path.display()))?;
    let mut args: Vec<OsString> = vec![
        "--fd".into(),
        "3".into(),
        "--shared-dir".into(),
        shared.into(),
        "--sandbox".into(),
        "namespace".into(),
        "--seccomp".into(),
        "kill".into(),
        "--cache".into(),
        dir.cache.name().into(),
        "--log-level".into(),
        "error".into(),
    ];
    if dir.writeback {
        args.push("--writeback".into());
    }
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    let process = device_process::spawn_program(name, program, &args, &[listener.as_fd()])?;
    // The listener queues this connection until virtiofsd accepts it.
    let sock = UnixStream::connect(&path)
        .with_context(|| format!("device {name}: cannot connect to virtiofsd"))?;
    drop(listener);
    Ok((process, sock.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_dir_specs_parse_like_crosvm() {
        let d: SharedDir = "/srv/share:host0".parse().expect("valid");
        assert_eq!(
            d,
            SharedDir {
                path: "/srv/share".into(),
                tag: "host0".into(),
                cache: Cache::Auto,
                writeback: false
            }
        );
        let d: SharedDir = "/s:t:type=fs:cache=never:writeback=true"
            .parse()
            .expect("valid");
        assert_eq!((d.cache, d.writeback), (Cache::Never, true));
        let long = format!("/s:{}", "x".repeat(37));
        for (bad, says) in [
            ("/s", "PATH:TAG"),
            (":t", "PATH is empty"),
            ("/s:", "the tag is empty"),
            (long.as_str(), "longer than virtio-fs's 36"),
            ("/s:t:type=p9", "only type=fs"),
            ("/s:t:cache=metadata", "cache=metadata"),
            ("/s:t:writeback=maybe", "writeback=maybe"),
            ("/s:t:dax=true", "unknown option 'dax=true'"),
        ] {
            let err = bad.parse::<SharedDir>().expect_err(bad);
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert!(format!("/s:{}", "y".repeat(36))
            .parse::<SharedDir>()
            .is_ok());
    }

    #[test]
    fn config_holds_the_padded_tag_and_the_request_queues() {
        let c = config("share", 2);
        assert_eq!(c.len(), 40);
        assert_eq!(&c[..5], b"share");
        assert!(c[5..36].iter().all(|&b| b == 0));
        assert_eq!(u32::from_le_bytes([c[36], c[37], c[38], c[39]]), 1);
        let full = "z".repeat(36);
        assert_eq!(&config(&full, 3)[..36], full.as_bytes());
    }
}
