//! Fuzzes the backend -> frontend direction of vhost-user: what the VMM reads from a device
//! process (or from any other backend it is given). The real [`Frontend`] talks over a unix
//! socket pair to a "backend" that is nothing but the fuzz bytes, queued on the socket before
//! the frontend starts and followed by EOF: the frontend negotiates (`connect`), then, as the
//! input's first byte says, reads and writes the config space, starts two rings (memory table,
//! vring set-up), stops them and resets the device. Every request's reply (header, body,
//! `REPLY_ACK`) is decoded from the fuzz bytes; nothing may panic or hang.
//!
//! Invariants checked: the negotiated features never include `VHOST_USER_F_PROTOCOL_FEATURES`,
//! protocol features are a subset of what the frontend uses, a queue count is at most 256,
//! a config read returns exactly the bytes asked for, a stop returns one base per ring, and
//! once the connection is found broken no request that sends succeeds.
//!
//! Input layout: [operations bitmap, config offset, config size, features, backend bytes].

#![no_main]

use std::cell::Cell;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;

use executor::{AsyncFd, EventFd, Executor};
use libfuzzer_sys::fuzz_target;
use memory::{GuestAddress, GuestMemory};
use virtio::vhost_user::frontend::PROTOCOL_FEATURES;
use virtio::vhost_user::{
    Connection, Error, Frontend, VringConfig, PROTOCOL_F_RESET_DEVICE,
    VHOST_USER_F_PROTOCOL_FEATURES,
};

thread_local! {
    // Never dropped: `Executor`'s drop uses the executor's own thread-locals, which may be
    // gone when this one's destructor runs at exit.
    static EX: ManuallyDrop<Executor> =
        ManuallyDrop::new(Executor::new().expect("an io_uring executor"));
    static KICK: EventFd = EventFd::new().expect("an eventfd");
}

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemory::new(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10_0000), 0x10000),
        ])
        .expect("guest memory")
    })
}

/// Once a request found the connection broken, no later request may succeed.
fn note<T>(broken: &Cell<bool>, r: &Result<T, Error>) {
    match r {
        Ok(_) => assert!(!broken.get(), "a request succeeded on a broken connection"),
        Err(Error::Broken) => broken.set(true),
        Err(_) => {}
    }
}

async fn converse(ops: u8, offset: u32, size: u32, features: u8, conn: Connection) {
    let Ok(f) = Frontend::connect(conn, Duration::from_secs(10)).await else {
        return;
    };
    assert_eq!(f.features() & (1 << VHOST_USER_F_PROTOCOL_FEATURES), 0);
    assert_eq!(f.protocol_features() & !PROTOCOL_FEATURES, 0);
    if let Some(n) = f.queue_num() {
        assert!(n <= 256, "{n} queues accepted");
    }
    let broken = Cell::new(false);
    if ops & 1 != 0 {
        let r = f.get_config(offset, size).await;
        if let Ok(payload) = &r {
            assert_eq!(payload.len(), size as usize);
        }
        note(&broken, &r);
    }
    if ops & 2 != 0 {
        let r = f.set_config(offset, &vec![0xa5; size as usize]).await;
        note(&broken, &r);
    }
    if ops & 4 != 0 {
        let mem = memory();
        let kick = KICK.with(|k| k.as_fd().try_clone_to_owned().expect("dup"));
        let ring = |index: u32, base: u64| VringConfig {
            index,
            size: 16,
            desc: GuestAddress(base),
            avail: GuestAddress(base + 0x100),
            used: GuestAddress(base + 0x200),
            base: 0,
            kick: kick.as_fd(),
            call: (index == 0).then(|| kick.as_fd()),
        };
        // Feature bits 0, 32 and up, and one the backend may not offer.
        let acked = f.features() & (u64::from(features) | u64::from(features) << 32);
        let r = f
            .start(acked, mem, &[ring(0, 0x1000), ring(1, 0x10_1000)])
            .await;
        note(&broken, &r);
    }
    if ops & 8 != 0 {
        let r = f.stop(&[0, 1]).await;
        if let Ok(bases) = &r {
            assert_eq!(bases.len(), 2);
        }
        note(&broken, &r);
    }
    if ops & 16 != 0 {
        let r = f.reset().await;
        if f.protocol_features() & (1 << PROTOCOL_F_RESET_DEVICE) == 0 {
            // Without RESET_DEVICE a reset sends nothing, broken connection or not.
            assert!(r.is_ok());
        } else {
            note(&broken, &r);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&[ops, offset, size, features], backend)) = data.split_first_chunk::<4>() else {
        return;
    };
    let (ours, mut theirs) = UnixStream::pair().expect("socketpair");
    // Far below the socket buffer, so the write never blocks; the rest would not matter.
    theirs
        .write_all(&backend[..backend.len().min(16 * 1024)])
        .expect("queue the backend's bytes");
    theirs.shutdown(Shutdown::Write).expect("shutdown");
    let conn = Connection::new(AsyncFd::new(ours.into()));
    EX.with(|ex| {
        ex.run_until(converse(
            ops,
            u32::from(offset) * 2,
            u32::from(size) * 2,
            features,
            conn,
        ))
    });
    drop(theirs);
});
