//! `ringvm device block`: the virtio-blk device as a process of its own.

use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;

use argh::FromArgs;
use executor::opcode;
use virtio::process::{DeviceProcess, Made, MakeError};
use virtio::DeviceType;

use crate::{BlockDevice, BlockOptions, Disk, DiskSpec, Error};

/// Descriptors per request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most request queues a device process takes (one per vCPU is the VMM's default).
pub const MAX_PROCESS_QUEUES: usize = 64;

/// virtio-blk backend for a raw or qcow2 image.
// Its field docs are argh's help text: brackets there mean optional parts, not links.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(FromArgs, Debug, Clone, PartialEq, Eq)]
pub struct BlockArgs {
    /// the image: PATH[,ro][,format=raw|qcow2][,direct=BOOL][,id=STR][,backing-dir=DIR]...
    /// (format probed when not given; a probed image may not open a backing file; direct=true
    /// opens it with O_DIRECT, bypassing the host page cache; id is what GET_ID returns, 20
    /// bytes max; backing-dir allows backing files from DIR besides the image's directory)
    #[argh(option)]
    pub file: DiskSpec,
    /// number of request queues (default 1)
    #[argh(option, default = "1")]
    pub queues: usize,
    /// qcow2: write L2 and L1 tables back before a write that changed them completes (after
    /// an fdatasync of the data), so completed writes survive this process's death, not only
    /// a flush (`ringvm run` sets it while devices may be restarted)
    #[argh(switch)]
    pub metadata_write_through: bool,
}

/// virtio-blk as a device process.
#[derive(Debug)]
pub struct BlockProcess;

impl DeviceProcess for BlockProcess {
    const TYPE: DeviceType = DeviceType::Block;
    /// Reads and writes between the image and guest memory, flush, discard and write-zeroes.
    const OPS: &'static [u8] = &[
        opcode::Readv::CODE,
        opcode::Writev::CODE,
        opcode::Write::CODE,
        opcode::Fsync::CODE,
        opcode::Fallocate::CODE,
    ];
    type Options = BlockArgs;
    type Device = BlockDevice;

    fn make(
        a: &BlockArgs,
        _inherit: &mut dyn FnMut(i32) -> io::Result<OwnedFd>,
    ) -> Result<Made<BlockDevice>, MakeError> {
        if a.queues == 0 || a.queues > MAX_PROCESS_QUEUES {
            return Err(Error::Queues(a.queues).into());
        }
        let spec = &a.file;
        let mut disk = Disk::open(&spec.path, spec.open_options())
            .map_err(|e| Error::Image(spec.path.clone(), Box::new(e)))?;
        disk.set_metadata_write_through(a.metadata_write_through);
        Ok(Made::alone(BlockDevice::new(
            disk,
            BlockOptions {
                id: spec.id.clone(),
                num_queues: a.queues,
                queue_size: QUEUE_SIZE,
            },
        )))
    }

    fn to_args(a: &BlockArgs) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--file".into(),
            a.file.to_string().into(),
            "--queues".into(),
            a.queues.to_string().into(),
        ];
        if a.metadata_write_through {
            args.push("--metadata-write-through".into());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio::process::args_round_trip;

    #[test]
    fn options_round_trip_across_exec() {
        let a = BlockArgs {
            file: DiskSpec::parse("/img/a b.qcow2,format=qcow2,id=x,backing-dir=/b", true)
                .expect("valid"),
            queues: 4,
            metadata_write_through: true,
        };
        assert_eq!(args_round_trip::<BlockProcess>(&a).expect("parses"), a);
    }

    #[test]
    fn bad_queue_counts_are_refused_before_the_image_is_opened() {
        let a = BlockArgs {
            file: "/nonexistent.img".parse().expect("valid"),
            queues: 0,
            metadata_write_through: false,
        };
        let err = BlockProcess::make(&a, &mut |_| Err(io::ErrorKind::NotFound.into()))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("--queues 0"), "{err}");
    }
}
