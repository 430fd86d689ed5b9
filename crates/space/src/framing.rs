//! Bounds on what one connection makes the host buffer: the packet being received and the
//! packets waiting to be sent.
//!
//! syndicate's relay parses packets out of a buffer the connection's reader fills: it waits,
//! without allocating, until a whole packet is there, so a peer announcing a byte string of
//! 2^34 bytes makes the *reader's buffer* grow for as long as it sends. [`PacketBudget`] is
//! checked on what is left in that buffer after the relay took every whole packet, i.e. the
//! start of a packet still arriving: past the cap, or when a length the packet's leading
//! bytes declare already goes past it (Preserves' packed encoding puts an atom's length before
//! its bytes), the connection is closed without reading on. A connection therefore never
//! holds more than the cap plus one read.

/// How many leading bytes of an incomplete packet are read for declared lengths.
const PEEK: usize = 64;

/// Why a connection's input was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Oversize {
    /// The incomplete packet is already larger than the cap.
    #[error("a packet of more than {received} bytes so far, over the cap of {max}")]
    Received {
        /// Bytes of the packet received so far.
        received: usize,
        /// The cap.
        max: usize,
    },
    /// A length in the packet's leading bytes puts its end past the cap.
    #[error("a packet declaring at least {declared} bytes, over the cap of {max}")]
    Declared {
        /// Where the declared length puts the packet's end, at least.
        declared: u64,
        /// The cap.
        max: usize,
    },
}

/// The largest packet one connection may send, checked on the incomplete packet a reader holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketBudget {
    /// The cap, in bytes.
    pub max: usize,
}

impl PacketBudget {
    /// Check `pending`, the start of a packet not yet complete (what the relay left).
    pub fn check(&self, pending: &[u8]) -> Result<(), Oversize> {
        if pending.len() > self.max {
            return Err(Oversize::Received {
                received: pending.len(),
                max: self.max,
            });
        }
        match declared_end(pending) {
            Some(declared) if declared > self.max as u64 => Err(Oversize::Declared {
                declared,
                max: self.max,
            }),
            _ => Ok(()),
        }
    }
}

/// The furthest end that a length in the first [`PEEK`] bytes of a packed (binary) Preserves
/// packet declares, if any; `None` for text packets and packets without lengths there.
fn declared_end(bytes: &[u8]) -> Option<u64> {
    if bytes.first().is_none_or(|b| *b < 0x80) {
        return None;
    }
    let mut furthest = None;
    let mut pos = 0usize;
    while pos < bytes.len().min(PEEK) {
        match bytes[pos] {
            // false, true, end of a compound, annotation, embedded: one byte.
            0x80 | 0x81 | 0x84 | 0x85 | 0x86 => pos += 1,
            // Opening a record, sequence, set or dictionary.
            0xb4..=0xb7 => pos += 1,
            // A float: its length in one byte.
            0x87 => {
                let length = u64::from(*bytes.get(pos + 1)?);
                let end = pos as u64 + 2 + length;
                furthest = furthest.max(Some(end));
                pos = usize::try_from(end).ok()?;
            }
            // Integer, string, byte string, symbol: a varint length, then the bytes.
            0xb0..=0xb3 => {
                let (length, width) = varint(&bytes[pos + 1..])?;
                let end = (pos as u64 + 1 + width as u64).saturating_add(length);
                furthest = furthest.max(Some(end));
                pos = usize::try_from(end).ok()?;
            }
            // Not Preserves: the relay refuses it.
            _ => break,
        }
    }
    furthest
}

/// A little-endian base-128 length and how many bytes it took; `None` if it is not all there
/// (or longer than a u64).
fn varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: PacketBudget = PacketBudget { max: 1024 };

    #[test]
    fn a_huge_declared_byte_string_is_refused_from_its_header() {
        // [[0 <A #[…2^34 bytes…] …
        let mut packet = vec![0xb5, 0xb5, 0xb0, 0x00, 0xb4, 0xb3, 0x01, b'A', 0xb2];
        packet.extend([0x80, 0x80, 0x80, 0x80, 0x40]);
        packet.extend([0u8; 16]);
        assert!(matches!(
            BUDGET.check(&packet),
            Err(Oversize::Declared { declared, .. }) if declared > 1 << 34
        ));
    }

    #[test]
    fn small_packets_and_text_pass_until_they_outgrow_the_cap() {
        // [[0 <A "abc"…: a length inside the cap.
        let packet = [
            0xb5, 0xb5, 0xb0, 0x00, 0xb4, 0xb3, 0x01, b'A', 0xb1, 0x03, b'a',
        ];
        assert_eq!(BUDGET.check(&packet), Ok(()));
        assert_eq!(BUDGET.check(b"[[0 <A <resolve"), Ok(()));
        assert_eq!(BUDGET.check(&[]), Ok(()));
        let long_text = vec![b'['; 1025];
        assert!(matches!(
            BUDGET.check(&long_text),
            Err(Oversize::Received { received: 1025, .. })
        ));
    }

    #[test]
    fn a_length_cut_off_mid_varint_is_not_yet_a_refusal() {
        assert_eq!(BUDGET.check(&[0xb5, 0xb2, 0xff, 0xff]), Ok(()));
        assert_eq!(varint(&[0x81, 0x01]), Some((129, 2)));
        assert_eq!(varint(&[0xff; 11]), None);
    }
}
