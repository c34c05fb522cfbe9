//! Inflight I/O tracking for a split queue (vhost-user `INFLIGHT_SHMFD`, "Inflight I/O
//! tracking" in QEMU's `docs/interop/vhost-user.rst`).
//!
//! A region of shared memory that the frontend keeps across a backend's death records which
//! chains the backend took from the available ring and has not yet put in the used ring. A
//! restarted backend reads it to continue where the dead one stopped: chains in flight are
//! submitted again (in the order they were taken), and popping resumes after them. Nothing
//! is lost and nothing is completed twice.
//!
//! Layout of one queue's part (`QueueRegionSplit`), little-endian:
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `features` (u64, 0) |
//! | 8 | `version` (u16, 1) |
//! | 10 | `desc_num` (u16, the queue size) |
//! | 12 | `last_batch_head` (u16: the head last put in the used ring) |
//! | 14 | `used_idx` (u16: the used index once that head's entry is complete) |
//! | 16 | `desc[desc_num]`, 16 bytes each: `inflight` (u8), 5 bytes padding, `next` (u16), `counter` (u64) |
//!
//! Taking a chain sets `desc[head].inflight = 1` and its `counter` (a per-queue sequence).
//! Using it sets `last_batch_head = head`, writes the used ring entry and index, then clears
//! `inflight` and sets `used_idx`. A backend that died between the used index and the clear
//! leaves `used_idx` behind the used ring's: that head is done.
//!
//! The dead process may have written anything there: [`InflightRing::recover`] copies the
//! region out, then checks it (version, size, heads, flags, counters, and that no more chains
//! are in flight than the available ring holds beyond the used index) before using the copy.

use std::sync::atomic::Ordering;

use memory::{GuestAddress, GuestMemory};

/// Bytes of one queue's header.
const HEADER: u64 = 16;
/// Bytes of one descriptor's state.
const DESC_STATE: u64 = 16;
/// Each queue's part starts on this boundary.
const ALIGN: u64 = 64;
/// The region version this backend writes.
const VERSION: u16 = 1;

/// Bytes of one queue's part for a queue of `size` entries.
pub fn queue_region_size(size: u16) -> u64 {
    (HEADER + DESC_STATE * u64::from(size)).div_ceil(ALIGN) * ALIGN
}

/// Why an inflight region cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflightError {
    #[error("the inflight region is outside its mapping")]
    Access,
    #[error("inflight region version {0} (expected 1)")]
    Version(u16),
    #[error("inflight region for {found} entries on a queue of {size}")]
    Size { found: u16, size: u16 },
    #[error("inflight region: last batch head {head} on a queue of {size}")]
    LastBatchHead { head: u16, size: u16 },
    #[error("inflight region: descriptor {head} has inflight flag {flag}")]
    Flag { head: u16, flag: u8 },
    #[error(
        "inflight region: {inflight} chains in flight, but only {pending} are past the used index"
    )]
    TooMany { inflight: u16, pending: u16 },
    #[error("inflight region: counter {0} is implausible")]
    Counter(u64),
}

/// One queue's part of an inflight region, mapped in this process.
#[derive(Clone, Debug)]
pub struct InflightRing {
    mem: GuestMemory,
    base: GuestAddress,
    size: u16,
    /// The counter of the next chain taken.
    counter: u64,
    /// Heads to submit again, the next at the end.
    resubmit: Vec<u16>,
    /// The head the last `next_resubmit` gave, if any (for `undo_resubmit`).
    popped_again: Option<u16>,
    /// See [`InflightRing::was_in_use`].
    in_use: bool,
}

impl InflightRing {
    /// The part of `mem` at `base` for a queue of `size` entries.
    pub fn new(mem: GuestMemory, base: GuestAddress, size: u16) -> InflightRing {
        InflightRing {
            mem,
            base,
            size,
            counter: 1,
            resubmit: Vec::new(),
            popped_again: None,
            in_use: false,
        }
    }

    fn desc(&self, head: u16) -> GuestAddress {
        self.base
            .wrapping_add(HEADER + DESC_STATE * u64::from(head))
    }

    /// Whether the last [`recover`](InflightRing::recover) found the region in use (written
    /// by an earlier backend, or an earlier start of this one), not fresh.
    pub fn was_in_use(&self) -> bool {
        self.in_use
    }

    /// Reads the region after a (re)start, with `used_idx` from the used ring and
    /// `avail_idx` from the available ring: checks it, finds the chains in flight and returns
    /// the available index to pop from after them. A region never used (all zero) is set up.
    pub fn recover(&mut self, used_idx: u16, avail_idx: u16) -> Result<u16, InflightError> {
        let len = queue_region_size(self.size) as usize;
        let mut copy = vec![0u8; len];
        self.mem
            .read_slice(&mut copy, self.base)
            .map_err(|_| InflightError::Access)?;
        let u16_at = |at: usize| u16::from_le_bytes([copy[at], copy[at + 1]]);
        let version = u16_at(8);
        self.resubmit.clear();
        self.popped_again = None;
        self.counter = 1;
        self.in_use = false;
        if version == 0 && copy.iter().all(|&b| b == 0) {
            // Fresh: nothing was ever taken through this region.
            self.write_u16(8, VERSION)?;
            self.write_u16(10, self.size)?;
            self.write_u16(14, used_idx)?;
            return Ok(used_idx);
        }
        if version != VERSION {
            return Err(InflightError::Version(version));
        }
        self.in_use = true;
        let found = u16_at(10);
        if found != self.size {
            return Err(InflightError::Size {
                found,
                size: self.size,
            });
        }
        let last_batch_head = u16_at(12);
        if last_batch_head >= self.size {
            return Err(InflightError::LastBatchHead {
                head: last_batch_head,
                size: self.size,
            });
        }
        let region_used = u16_at(14);
        let mut inflight: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.size {
            let at = (HEADER + DESC_STATE * u64::from(head)) as usize;
            let flag = copy[at];
            let mut counter = [0u8; 8];
            counter.copy_from_slice(&copy[at + 8..at + 16]);
            let counter = u64::from_le_bytes(counter);
            match flag {
                0 => {}
                1 => {
                    // The used index moved past the last batch but the flag was not
                    // cleared: that head is done.
                    if region_used != used_idx && head == last_batch_head {
                        continue;
                    }
                    if counter == 0 || counter > u64::MAX / 2 {
                        return Err(InflightError::Counter(counter));
                    }
                    inflight.push((counter, head));
                }
                flag => return Err(InflightError::Flag { head, flag }),
            }
        }
        let pending = avail_idx.wrapping_sub(used_idx);
        let count = u16::try_from(inflight.len()).unwrap_or(u16::MAX);
        if count > pending || pending > self.size {
            return Err(InflightError::TooMany {
                inflight: count,
                pending,
            });
        }
        // Submitted again oldest first: the list is popped from its end.
        inflight.sort_unstable_by(|a, b| b.cmp(a));
        self.counter = inflight.first().map_or(1, |&(c, _)| c + 1);
        self.resubmit = inflight.iter().map(|&(_, head)| head).collect();
        if region_used != used_idx {
            if region_used != used_idx.wrapping_sub(1) {
                // Only the last batch (one entry) can be between the two.
                return Err(InflightError::TooMany {
                    inflight: used_idx.wrapping_sub(region_used),
                    pending: 1,
                });
            }
            self.write_u8(self.desc(last_batch_head), 0)?;
            self.write_u16(14, used_idx)?;
        }
        Ok(used_idx.wrapping_add(count))
    }

    /// The next chain to submit again, if any. Remembered for [`InflightRing::undo_resubmit`]
    /// until the next call.
    pub fn next_resubmit(&mut self) -> Option<u16> {
        self.popped_again = self.resubmit.pop();
        self.popped_again
    }

    /// Puts the chain the last [`InflightRing::next_resubmit`] gave back at the front of the
    /// chains to submit again (a pop undone). False if that call gave none.
    pub fn undo_resubmit(&mut self) -> bool {
        match self.popped_again.take() {
            Some(head) => {
                self.resubmit.push(head);
                true
            }
            None => false,
        }
    }

    /// `head` was taken from the available ring.
    pub fn taken(&mut self, head: u16) -> Result<(), InflightError> {
        let at = self.desc(head);
        self.mem
            .write_obj(self.counter.to_le(), at.wrapping_add(8))
            .map_err(|_| InflightError::Access)?;
        self.counter += 1;
        self.write_u8(at, 1)
    }

    /// `head` is about to go into the used ring.
    pub fn before_use(&self, head: u16) -> Result<(), InflightError> {
        self.write_u16(12, head)
    }

    /// `head` is in the used ring, whose index is now `used_idx` (also: a pop undone, with
    /// the used index unchanged).
    pub fn after_use(&self, head: u16, used_idx: u16) -> Result<(), InflightError> {
        self.write_u8(self.desc(head), 0)?;
        self.write_u16(14, used_idx)
    }

    fn write_u8(&self, at: GuestAddress, val: u8) -> Result<(), InflightError> {
        self.mem
            .write_obj(val, at)
            .map_err(|_| InflightError::Access)
    }

    fn write_u16(&self, offset: u64, val: u16) -> Result<(), InflightError> {
        self.mem
            .store_u16(
                self.base.wrapping_add(offset),
                val.to_le(),
                Ordering::Release,
            )
            .map_err(|_| InflightError::Access)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn region(size: u16) -> InflightRing {
        let mem = GuestMemory::new(&[(GuestAddress(0), 0x10000)]).unwrap();
        InflightRing::new(mem, GuestAddress(0x40), size)
    }

    #[test]
    fn a_fresh_region_has_nothing_in_flight() {
        let mut r = region(16);
        assert_eq!(r.recover(5, 9), Ok(5));
        assert_eq!(r.next_resubmit(), None);
        assert_eq!(
            r.mem
                .load_u16(GuestAddress(0x48), Ordering::Relaxed)
                .unwrap(),
            1
        );
    }

    #[test]
    fn chains_in_flight_come_back_oldest_first_and_popping_skips_them() {
        let mut r = region(16);
        r.recover(0, 0).unwrap();
        for head in [3, 7, 1, 12] {
            r.taken(head).unwrap();
        }
        // 7 is used (used index 1).
        r.before_use(7).unwrap();
        r.after_use(7, 1).unwrap();
        let mut again = r.clone();
        assert_eq!(again.recover(1, 4), Ok(4));
        let order: Vec<u16> = std::iter::from_fn(|| again.next_resubmit()).collect();
        assert_eq!(order, [3, 1, 12]);
    }

    #[test]
    fn a_head_used_but_not_cleared_is_done() {
        let mut r = region(16);
        r.recover(0, 0).unwrap();
        r.taken(4).unwrap();
        r.taken(5).unwrap();
        // Died after the used index moved to 1, before the flag of 4 was cleared.
        r.before_use(4).unwrap();
        let mut again = r.clone();
        assert_eq!(again.recover(1, 2), Ok(2));
        assert_eq!(again.next_resubmit(), Some(5));
        assert_eq!(again.next_resubmit(), None);
    }

    #[test]
    fn garbage_is_refused() {
        let mut r = region(16);
        r.recover(0, 0).unwrap();
        // A flag of 7.
        r.write_u8(r.desc(2), 7).unwrap();
        assert_eq!(
            r.clone().recover(0, 4),
            Err(InflightError::Flag { head: 2, flag: 7 })
        );
        r.write_u8(r.desc(2), 0).unwrap();
        // More in flight than the available ring holds.
        r.taken(1).unwrap();
        r.taken(2).unwrap();
        assert!(matches!(
            r.clone().recover(0, 1),
            Err(InflightError::TooMany { .. })
        ));
        // Another queue size.
        r.write_u16(10, 32).unwrap();
        assert!(matches!(
            r.clone().recover(0, 4),
            Err(InflightError::Size { .. })
        ));
        r.write_u16(10, 16).unwrap();
        r.write_u16(12, 99).unwrap();
        assert!(matches!(
            r.clone().recover(0, 4),
            Err(InflightError::LastBatchHead { .. })
        ));
        r.write_u16(8, 9).unwrap();
        assert_eq!(r.clone().recover(0, 4), Err(InflightError::Version(9)));
    }
}
