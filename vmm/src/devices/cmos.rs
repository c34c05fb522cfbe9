//! CMOS RAM and the MC146818 real-time clock, with the host's UTC time.

use std::time::{SystemTime, UNIX_EPOCH};

use super::BusDevice;

const REG_A: usize = 0x0a;
const REG_B: usize = 0x0b;
const REG_C: usize = 0x0c;
const REG_D: usize = 0x0d;
const B_24H: u8 = 0x02;
const B_BINARY: u8 = 0x04;

pub struct Cmos {
    index: usize,
    data: [u8; 128],
    now: fn() -> u64,
}

fn host_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// `below_4g` and `above_4g`: RAM sizes the firmware-style registers report.
    pub fn new(below_4g: u64, above_4g: u64) -> Cmos {
        Cmos::with_clock(below_4g, above_4g, host_now)
    }

    fn with_clock(below_4g: u64, above_4g: u64, now: fn() -> u64) -> Cmos {
        let mut data = [0u8; 128];
        data[REG_A] = 0x26;
        data[REG_B] = B_24H;
        data[REG_D] = 0x80; // RAM and time valid
                            // Extended memory 1-64 MiB in KiB (0x30/0x31, 0x17/0x18), above 16 MiB in 64 KiB
                            // units (0x34/0x35) and above 4 GiB in 64 KiB units (0x5b..0x5d), as PC firmware does.
        let ext_kib = (below_4g.saturating_sub(1 << 20) >> 10).min(0xffff) as u16;
        data[0x17..0x19].copy_from_slice(&ext_kib.to_le_bytes());
        data[0x30..0x32].copy_from_slice(&ext_kib.to_le_bytes());
        let hi = (below_4g.saturating_sub(16 << 20) >> 16).min(0xffff) as u16;
        data[0x34..0x36].copy_from_slice(&hi.to_le_bytes());
        let high = (above_4g >> 16).to_le_bytes();
        data[0x5b..0x5e].copy_from_slice(&high[..3]);
        Cmos {
            index: 0,
            data,
            now,
        }
    }

    fn encode(&self, v: u32) -> u8 {
        if self.data[REG_B] & B_BINARY != 0 {
            v as u8
        } else {
            (((v / 10) << 4) | (v % 10)) as u8
        }
    }

    fn read_reg(&self, index: usize) -> u8 {
        let secs = (self.now)();
        let days = (secs / 86_400) as i64;
        let tod = (secs % 86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        match index {
            0x00 => self.encode(tod % 60),
            0x02 => self.encode(tod / 60 % 60),
            0x04 => {
                let h = tod / 3600;
                if self.data[REG_B] & B_24H != 0 {
                    self.encode(h)
                } else {
                    let pm = if h >= 12 { 0x80 } else { 0 };
                    self.encode(match h % 12 {
                        0 => 12,
                        x => x,
                    }) | pm
                }
            }
            0x06 => self.encode(((days + 4).rem_euclid(7) + 1) as u32),
            0x07 => self.encode(day),
            0x08 => self.encode(month),
            0x09 => self.encode(year.rem_euclid(100) as u32),
            0x32 => self.encode(year.div_euclid(100) as u32),
            // Update-in-progress is never set: the time is read from the host atomically.
            REG_A => self.data[REG_A] & 0x7f,
            REG_C => 0,
            i => self.data[i],
        }
    }
}

impl BusDevice for Cmos {
    /// Mapped at port 0x70 with length 2: index (bit 7 is the NMI mask), then data.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            data[0] = self.read_reg(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = (v & 0x7f) as usize,
            // The clock follows the host; writes to time registers are ignored.
            1 if matches!(self.index, 0x00..=0x09 | REG_C | REG_D | 0x32) => {}
            1 => self.data[self.index] = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: &mut Cmos, reg: u8) -> u8 {
        c.write(0, &[reg]);
        let mut b = [0u8];
        c.read(1, &mut b);
        b[0]
    }

    #[test]
    fn reads_a_fixed_time_in_bcd_and_binary() {
        // 2026-11-24 16:05:09 UTC, a Tuesday.
        let mut c = Cmos::with_clock(128 << 20, 0, || 1_795_536_309);
        assert_eq!(at(&mut c, 0x09), 0x26);
        assert_eq!(at(&mut c, 0x32), 0x20);
        assert_eq!(at(&mut c, 0x08), 0x11);
        assert_eq!(at(&mut c, 0x07), 0x24);
        assert_eq!(at(&mut c, 0x04), 0x16);
        assert_eq!(at(&mut c, 0x02), 0x05);
        assert_eq!(at(&mut c, 0x00), 0x09);
        assert_eq!(at(&mut c, 0x06), 3);
        c.write(0, &[0x0b]);
        c.write(1, &[B_24H | B_BINARY]);
        assert_eq!(at(&mut c, 0x04), 16);
        assert_eq!(at(&mut c, 0x09), 26);
    }

    #[test]
    fn civil_dates_round_trip_known_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn memory_size_registers() {
        let mut c = Cmos::new(3 << 30, 1 << 30);
        let lo = at(&mut c, 0x34) as u16 | (at(&mut c, 0x35) as u16) << 8;
        assert_eq!(lo as u64, ((3 << 30) - (16 << 20)) >> 16);
        assert_eq!(at(&mut c, 0x5c), 0x40); // (1 GiB >> 16) = 0x4000
        assert_eq!(at(&mut c, 0x0d), 0x80);
        assert_eq!(at(&mut c, 0x0a) & 0x80, 0);
    }
}
