//! A NIC's MAC address as the command line gives it (`--mac`), parsed where it is given and
//! printed back for `ringvm device net --mac` across the exec of the device process.

use std::fmt;
use std::str::FromStr;

/// A unicast MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// The default MAC of the first NIC (QEMU's); later NICs count up in the last byte
    /// ([`MacAddress::nth`]).
    pub const DEFAULT: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

    /// The address of NIC `i` of a VM whose first NIC has this one: the same for 0, the
    /// default's last byte plus `i` after it.
    pub fn nth(self, i: usize) -> MacAddress {
        let mut mac = self.0;
        if i > 0 {
            mac[5] = MacAddress::DEFAULT.0[5].wrapping_add(i as u8);
        }
        MacAddress(mac)
    }
}

/// `aa:bb:cc:dd:ee:ff`; a multicast address is refused (a NIC's own address is unicast).
impl FromStr for MacAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<MacAddress, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "{s}: expected six hex bytes like 52:54:00:12:34:56"
            ));
        }
        let mut mac = [0u8; 6];
        for (b, p) in mac.iter_mut().zip(&parts) {
            *b = u8::from_str_radix(p, 16)
                .ok()
                .filter(|_| p.len() == 2)
                .ok_or_else(|| format!("{s}: '{p}' is not a hex byte"))?;
        }
        if mac[0] & 1 != 0 {
            return Err(format!("{s}: a multicast address"));
        }
        Ok(MacAddress(mac))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_print_back_and_multicast_is_refused() {
        let mac: MacAddress = "52:54:00:ab:cd:ef".parse().expect("valid");
        assert_eq!(mac.0, [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
        assert_eq!(mac.to_string().parse::<MacAddress>(), Ok(mac));
        for bad in [
            "01:00:5e:00:00:01",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:eg",
            "5:54:0:ab:cd:ef",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
        assert_eq!(MacAddress::DEFAULT.nth(2).0[5], 0x58);
        assert_eq!(mac.nth(0), mac);
    }
}
