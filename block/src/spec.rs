//! A disk on the command line: `PATH[,ro|rw][,format=raw|qcow2][,direct=BOOL][,id=STR]
//! [,backing-dir=DIR]...`, parsed where it is given (`ringvm run --rwdisk`, `--disk`, ...)
//! and printed back for `ringvm device block --file` across the exec of the device process:
//! the one place both directions live (the round trip is tested below).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use virtio::process::SpecKeys;

use crate::{Format, OpenOptions};

/// Longest GET_ID string (virtio 1.2 §5.2.6: 20 bytes).
pub const MAX_DISK_ID: usize = 20;

/// A disk image and how to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub read_only: bool,
    pub direct: bool,
    /// What GET_ID returns.
    pub id: Option<String>,
    /// `None`: probed.
    pub format: Option<Format>,
    /// Directories besides the image's own that backing files may be in.
    pub backing_dirs: Vec<PathBuf>,
}

impl DiskSpec {
    /// Parses a spec; `read_only` is the default of the flag that gave it (`--disk` and
    /// `--root` are read-only unless the spec says `rw`).
    pub fn parse(spec: &str, read_only: bool) -> Result<DiskSpec, String> {
        let mut parts = spec.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or("empty path")?;
        let mut d = DiskSpec {
            path: PathBuf::from(path),
            read_only,
            direct: false,
            id: None,
            format: None,
            backing_dirs: Vec::new(),
        };
        let bool_of = |key: &str, v: &str| match v {
            "true" | "1" | "on" | "yes" => Ok(true),
            "false" | "0" | "off" | "no" => Ok(false),
            _ => Err(format!("{key}={v}: expected true or false")),
        };
        let mut keys = SpecKeys::default();
        for kv in parts.filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                None if kv == "ro" => d.read_only = true,
                None if kv == "rw" => d.read_only = false,
                Some(("ro", v)) => d.read_only = bool_of("ro", v)?,
                Some(("direct", v)) => d.direct = bool_of("direct", v)?,
                Some(("format", v)) => d.format = Some(v.parse().map_err(|e| format!("{e}"))?),
                Some(("backing-dir", v)) if !v.is_empty() => d.backing_dirs.push(PathBuf::from(v)),
                Some(("id", v)) if v.len() <= MAX_DISK_ID && v.is_ascii() => {
                    d.id = Some(v.to_string())
                }
                Some(("id", v)) => {
                    return Err(format!("id={v}: at most {MAX_DISK_ID} ASCII characters"))
                }
                _ => return Err(format!("unknown option '{kv}'")),
            }
            // `ro`, `rw` and `ro=` set one thing; `backing-dir=` may be given many times.
            match kv.split_once('=').map_or(kv, |(k, _)| k) {
                "rw" => keys.once("ro")?,
                "backing-dir" => {}
                k => keys.once(k)?,
            }
        }
        Ok(d)
    }

    /// How the block device opens the image.
    pub fn open_options(&self) -> OpenOptions {
        OpenOptions {
            read_only: self.read_only,
            direct: self.direct,
            format: self.format,
            backing_dirs: self.backing_dirs.clone(),
        }
    }
}

/// Read-write unless the spec says `ro` (`--rwdisk`, `ringvm device block --file`).
impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<DiskSpec, String> {
        DiskSpec::parse(s, false)
    }
}

/// The spec as [`DiskSpec::parse`] takes it back, whatever the flag's default: `ro` or `rw`
/// is always written.
impl fmt::Display for DiskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        f.write_str(if self.read_only { ",ro" } else { ",rw" })?;
        if let Some(format) = self.format {
            write!(f, ",format={format}")?;
        }
        if self.direct {
            f.write_str(",direct=true")?;
        }
        if let Some(id) = &self.id {
            write!(f, ",id={id}")?;
        }
        for d in &self.backing_dirs {
            write!(f, ",backing-dir={}", d.display())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_the_flag_default() {
        assert_eq!(
            DiskSpec::parse("/img/a.qcow2,direct=true,id=disk-a", false).expect("valid"),
            DiskSpec {
                path: "/img/a.qcow2".into(),
                read_only: false,
                direct: true,
                id: Some("disk-a".into()),
                format: None,
                backing_dirs: Vec::new(),
            }
        );
        assert!(DiskSpec::parse("a.img", true).expect("valid").read_only);
        assert!(DiskSpec::parse("a.img,ro", false).expect("valid").read_only);
        assert!(!DiskSpec::parse("a.img,rw", true).expect("valid").read_only);
        assert!(!"a.img".parse::<DiskSpec>().expect("valid").read_only);
        for bad in [
            "",
            ",ro",
            "a,direct=maybe",
            "a,id=123456789012345678901",
            "a,cache=x",
            "a,format=vmdk",
            "a,format=",
            "a,backing-dir=",
        ] {
            assert!(DiskSpec::parse(bad, false).is_err(), "{bad}");
        }
        assert_eq!(
            DiskSpec::parse("a,direct=maybe", false),
            Err("direct=maybe: expected true or false".into())
        );
    }

    #[test]
    fn a_setting_given_twice_is_refused() {
        for (bad, key) in [
            ("a,ro,rw", "ro"),
            ("a,rw,ro=false", "ro"),
            ("a,direct=on,direct=off", "direct"),
            ("a,format=raw,format=qcow2", "format"),
            ("a,id=x,id=x", "id"),
        ] {
            assert_eq!(
                DiskSpec::parse(bad, false),
                Err(format!("{key}= is given twice")),
                "{bad}"
            );
        }
        let d = DiskSpec::parse("a,backing-dir=/b,backing-dir=/c", false).expect("valid");
        assert_eq!(d.backing_dirs, [PathBuf::from("/b"), PathBuf::from("/c")]);
    }

    #[test]
    fn specs_round_trip_across_exec() {
        for (spec, default) in [
            (
                "a b.img,ro,direct=true,id=x,format=qcow2,backing-dir=/b,backing-dir=c",
                false,
            ),
            ("a.img,format=raw", false),
            ("a.img", true),
            ("/dev/sdb,rw,direct=on", true),
        ] {
            let d = DiskSpec::parse(spec, default).expect("valid");
            // What the device process parses (`--file`, read-write default) is what was given.
            assert_eq!(d.to_string().parse::<DiskSpec>(), Ok(d.clone()), "{spec}");
            assert_eq!(DiskSpec::parse(&d.to_string(), !default), Ok(d), "{spec}");
        }
    }
}
