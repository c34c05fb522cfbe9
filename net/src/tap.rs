//! Tap interfaces: creating them (one fd per queue), adopting an fd opened elsewhere, the
//! host-side address, and offloads.

use std::fs::OpenOptions;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::features::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
};
use crate::sys::{
    self, IfReq, IFF_DETACH_QUEUE, IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, IFNAMSIZ,
};
use crate::{Error, Result, VNET_HDR_SIZE};

/// One open queue of a tap interface (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), whose vnet
/// header is [`VNET_HDR_SIZE`] bytes.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    /// Whether the queue was attached when this handle was made (see [`Tap::attached`]).
    attached: bool,
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        return Err(Error::InvalidName(name.to_owned()));
    }
    Ok(())
}

/// The `TUN_F_*` offloads that match the guest-side offload features the driver acked. TSO
/// and UFO need checksum offload (the kernel refuses them without `TUN_F_CSUM`).
pub(crate) fn offload_flags(guest_features: u64) -> u32 {
    let has = |bit: u32| guest_features & (1 << bit) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = sys::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= sys::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= sys::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (sys::TUN_F_TSO4 | sys::TUN_F_TSO6) != 0 {
        flags |= sys::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= sys::TUN_F_UFO;
    }
    flags
}

impl Tap {
    /// Creates the tap `name` (or a kernel-named `tapN` for `None`), or attaches to it if it
    /// exists and is not in use, with `queues` queues: one fd each, `IFF_MULTI_QUEUE` when
    /// there are several.
    pub fn create(name: Option<&str>, queues: usize) -> Result<Vec<Tap>> {
        if queues == 0 || queues > crate::MAX_QUEUE_PAIRS {
            return Err(Error::QueuePairs(queues));
        }
        if let Some(name) = name {
            check_name(name)?;
        }
        let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if queues > 1 {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut name = name.unwrap_or("").to_owned();
        let mut taps = Vec::with_capacity(queues);
        for _ in 0..queues {
            let fd: OwnedFd = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(Error::OpenTun)?
                .into();
            let mut req = IfReq::with_name(&name);
            req.set_flags(flags);
            sys::tun_set_iff(fd.as_fd(), &mut req).map_err(|source| {
                // EINVAL for the first of several queues: most likely a tap made without
                // IFF_MULTI_QUEUE (or a tun), which the kernel cannot say.
                if queues > 1 && taps.is_empty() && source.raw_os_error() == Some(libc::EINVAL) {
                    Error::MultiQueue {
                        name: name.clone(),
                        queues,
                        source,
                    }
                } else {
                    Error::CreateTap {
                        name: name.clone(),
                        source,
                    }
                }
            })?;
            // The next queues attach to the interface this one created.
            name = req.name();
            let tap = Tap {
                fd,
                name: name.clone(),
                attached: true,
            };
            tap.set_vnet_hdr_size()?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Adopts a tap fd opened elsewhere (`--tap-fd`): checks it is a tap with `IFF_NO_PI` and
    /// `IFF_VNET_HDR`, and sets its vnet header size. A queue of a multi-queue tap may be
    /// detached (a device process that died had detached it): that is kept, and
    /// [`Tap::attached`] says so.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap> {
        let req = sys::tun_get_iff(fd.as_fd()).map_err(Error::GetIff)?;
        let flags = req.flags();
        let need = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        let name = req.name();
        if flags & need != need {
            return Err(Error::TapFlags { name, flags });
        }
        // TUNGETIFF adds IFF_DETACH_QUEUE for a detached queue.
        let attached = flags & IFF_DETACH_QUEUE == 0;
        let tap = Tap { fd, name, attached };
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    fn set_vnet_hdr_size(&self) -> Result<()> {
        sys::tun_set_vnet_hdr_size(self.fd.as_fd(), VNET_HDR_SIZE as i32)
            .map_err(|e| Error::VnetHdrSize(self.name.clone(), e))
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the queue was attached to its interface when this handle was made: always
    /// for [`Tap::create`]; for [`Tap::from_fd`], as the kernel had it. The attachment
    /// belongs to the open file, so it outlives the process that set it.
    pub fn attached(&self) -> bool {
        self.attached
    }

    /// Gives the host side of the tap `ip`/`netmask` and brings the link up.
    pub fn configure(&self, ip: Ipv4Addr, netmask: Ipv4Addr) -> Result<()> {
        sys::if_configure(&self.name, ip, netmask).map_err(|source| Error::Configure {
            name: self.name.clone(),
            ip,
            netmask,
            source,
        })
    }

    /// Sets the tap's offloads from the negotiated `VIRTIO_NET_F_GUEST_*` bits: which
    /// partially checksummed or segmentation-offloaded frames the kernel may hand the guest.
    pub fn set_offloads(&self, guest_features: u64) -> Result<()> {
        set_offloads(self.fd.as_fd(), &self.name, guest_features)
    }

    /// The interface MTU.
    pub fn mtu(&self) -> Result<u32> {
        sys::if_mtu(&self.name)
            .map(|m| m.max(0) as u32)
            .map_err(|e| Error::Mtu(self.name.clone(), e))
    }

    /// The fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

pub(crate) fn set_offloads(fd: BorrowedFd<'_>, name: &str, guest_features: u64) -> Result<()> {
    let flags = offload_flags(guest_features);
    sys::tun_set_offload(fd, flags).map_err(|source| Error::SetOffload {
        name: name.to_owned(),
        flags,
        source,
    })
}

/// Attaches or detaches a queue of a multi-queue tap.
pub(crate) fn set_queue_attached(
    fd: BorrowedFd<'_>,
    name: &str,
    queue: usize,
    attach: bool,
) -> Result<()> {
    let flags = if attach {
        sys::IFF_ATTACH_QUEUE
    } else {
        sys::IFF_DETACH_QUEUE
    };
    sys::tun_set_queue(fd, flags).map_err(|source| Error::SetQueue {
        name: name.to_owned(),
        queue,
        attach,
        source,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::testing::in_netns;

    fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(out.status.success(), "ip {args:?}: {:?}", out);
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn create_configure_and_read_back_in_a_private_namespace() {
        in_netns(|| {
            let taps = Tap::create(Some("rvtap0"), 1).unwrap();
            let tap = &taps[0];
            assert_eq!(tap.name(), "rvtap0");
            tap.configure(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(255, 255, 255, 0))
                .unwrap();
            let (addr, mask, flags) = sys::if_info("rvtap0").unwrap();
            assert_eq!(addr, Ipv4Addr::new(10, 0, 0, 1));
            assert_eq!(mask, Ipv4Addr::new(255, 255, 255, 0));
            assert_ne!(flags & sys::IFF_UP, 0);
            let shown = ip(&["-o", "addr", "show", "dev", "rvtap0"]);
            assert!(shown.contains("inet 10.0.0.1/24"), "{shown}");
            let link = ip(&["-o", "link", "show", "dev", "rvtap0"]);
            assert!(link.contains("UP"), "{link}");
            assert_eq!(
                sys::tun_get_vnet_hdr_size(tap.as_fd()).unwrap(),
                VNET_HDR_SIZE as i32
            );
            assert_eq!(tap.mtu().unwrap(), 1500);
        });
    }

    #[test]
    fn kernel_names_the_tap_when_no_name_is_given() {
        in_netns(|| {
            let taps = Tap::create(None, 1).unwrap();
            assert!(taps[0].name().starts_with("tap"), "{}", taps[0].name());
        });
    }

    #[test]
    fn from_fd_checks_flags_and_sets_the_header_size() {
        in_netns(|| {
            let tap = Tap::create(Some("rvtap1"), 1).unwrap().pop().unwrap();
            sys::tun_set_vnet_hdr_size(tap.as_fd(), 10).unwrap();
            let tap = Tap::from_fd(tap.into_fd()).unwrap();
            assert_eq!(tap.name(), "rvtap1");
            assert_eq!(sys::tun_get_vnet_hdr_size(tap.as_fd()).unwrap(), 12);
            // Not a tun fd at all.
            let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
            assert!(matches!(Tap::from_fd(file), Err(Error::GetIff(_))));
            // A tap without a vnet header.
            let fd: OwnedFd = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .unwrap()
                .into();
            let mut req = IfReq::with_name("rvtap2");
            req.set_flags(IFF_TAP | IFF_NO_PI);
            sys::tun_set_iff(fd.as_fd(), &mut req).unwrap();
            assert!(matches!(
                Tap::from_fd(fd),
                Err(Error::TapFlags { ref name, .. }) if name == "rvtap2"
            ));
        });
    }

    #[test]
    fn multi_queue_create_gives_one_fd_per_queue_on_one_interface() {
        in_netns(|| {
            let taps = Tap::create(Some("rvmq0"), 2).unwrap();
            assert_eq!(taps.len(), 2);
            for t in &taps {
                assert_eq!(t.name(), "rvmq0");
                let flags = sys::tun_get_iff(t.as_fd()).unwrap().flags();
                assert_ne!(flags & IFF_MULTI_QUEUE, 0);
            }
            let dup = |t: &Tap| Tap::from_fd(t.as_fd().try_clone_to_owned().unwrap()).unwrap();
            assert!(dup(&taps[1]).attached());
            set_queue_attached(taps[1].as_fd(), "rvmq0", 1, false).unwrap();
            // The state belongs to the file: another handle on it (as a restarted device
            // process gets) sees it.
            assert!(!dup(&taps[1]).attached());
            assert!(dup(&taps[0]).attached());
            set_queue_attached(taps[1].as_fd(), "rvmq0", 1, true).unwrap();
            assert!(dup(&taps[1]).attached());
        });
    }

    #[test]
    fn a_single_queue_tap_asked_for_several_queues_says_it_must_be_multi_queue() {
        in_netns(|| {
            ip(&["tuntap", "add", "rvsq0", "mode", "tap"]);
            let err = Tap::create(Some("rvsq0"), 2).unwrap_err();
            assert!(
                matches!(err, Error::MultiQueue { queues: 2, .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains("multi_queue"), "{err}");
            assert_eq!(Tap::create(Some("rvsq0"), 1).unwrap().len(), 1);
        });
    }

    #[test]
    fn bad_names_and_queue_counts_are_refused() {
        assert!(matches!(
            Tap::create(Some("a-name-that-is-too-long"), 1),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            Tap::create(Some(""), 1),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(Tap::create(None, 0), Err(Error::QueuePairs(0))));
    }

    #[test]
    fn offload_flags_follow_the_guest_features() {
        assert_eq!(
            offload_flags(1 << VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs CSUM"
        );
        assert_eq!(offload_flags(1 << VIRTIO_NET_F_GUEST_CSUM), sys::TUN_F_CSUM);
        let all = (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_ECN);
        assert_eq!(
            offload_flags(all),
            sys::TUN_F_CSUM | sys::TUN_F_TSO4 | sys::TUN_F_TSO6 | sys::TUN_F_TSO_ECN
        );
        in_netns(move || {
            let tap = Tap::create(Some("rvoff0"), 1).unwrap().pop().unwrap();
            tap.set_offloads(all).unwrap();
            tap.set_offloads(0).unwrap();
        });
    }
}
