//! Nix's base-32 encoding ("nixbase32").
//!
//! Nix prints hashes and store path digests in a base-32 variant with its own
//! alphabet (`0123456789abcdfghijklmnpqrsvwxyz`: the letters `e`, `o`, `u` and
//! `t` are left out) and its own bit order: the *last* character of the text
//! holds the lowest five bits of the *first* byte. This is not RFC 4648
//! base-32, and the two must never be mixed.
//!
//! This module only converts between bytes and text. It does not know hash
//! lengths: callers that expect a particular digest size (store paths,
//! [`crate::hash::Hash`]) check the length themselves, using
//! [`encoded_len`] and [`decoded_len`].

use thiserror::Error;

/// The 32 characters of Nix's base-32 alphabet, in digit order.
pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nixbase32 text could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// A character outside [`ALPHABET`] was found.
    #[error("invalid nixbase32 character {character:?} at position {position}")]
    InvalidCharacter {
        /// The offending character (as a byte; non-ASCII bytes show as `\u{..}`).
        character: char,
        /// Its byte offset in the input.
        position: usize,
    },
    /// The text length is not the encoding of any whole number of bytes.
    #[error("invalid nixbase32 length {0}: no byte length encodes to it")]
    InvalidLength(usize),
    /// The first character carries bits beyond the last byte, so the text is
    /// not the canonical encoding of any byte string.
    #[error("nixbase32 text has non-zero padding bits in its first character")]
    NonZeroPadding,
}

/// Number of characters that encode `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        (len * 8 - 1) / 5 + 1
    }
}

/// Number of bytes encoded by `len` characters, if `len` is a valid
/// encoded length.
pub const fn decoded_len(len: usize) -> Option<usize> {
    // Every byte count n has a distinct encoded length; the inverse is
    // floor(len * 5 / 8), which we check by re-encoding.
    let n = len * 5 / 8;
    if encoded_len(n) == len {
        Some(n)
    } else {
        None
    }
}

/// Encodes `bytes` as nixbase32 text.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        let low = u16::from(bytes[i]) >> j;
        let high = match bytes.get(i + 1) {
            Some(next) => u16::from(*next) << (8 - j),
            None => 0,
        };
        let digit = usize::from((low | high) & 0x1f);
        out.push(char::from(ALPHABET[digit]));
    }
    out
}

/// Returns the digit value of one alphabet character.
fn digit_of(c: u8) -> Option<u8> {
    // The alphabet is sorted, so a binary search finds the digit.
    ALPHABET
        .binary_search(&c)
        .ok()
        .and_then(|d| u8::try_from(d).ok())
}

/// Decodes nixbase32 text into bytes.
///
/// Rejects characters outside the alphabet, lengths that encode no whole
/// number of bytes, and texts whose unused high bits are not zero.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let size = decoded_len(text.len()).ok_or(DecodeError::InvalidLength(text.len()))?;
    let mut out = vec![0u8; size];
    decode_into(text, &mut out)?;
    Ok(out)
}

/// Decodes nixbase32 text into a caller-provided buffer whose length must
/// match the text (see [`decoded_len`]).
pub fn decode_into(text: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
    if decoded_len(text.len()) != Some(out.len()) {
        return Err(DecodeError::InvalidLength(text.len()));
    }
    out.fill(0);
    for (n, position) in (0..text.len()).rev().enumerate() {
        let c = text[position];
        let digit = digit_of(c).ok_or(DecodeError::InvalidCharacter {
            character: char::from(c),
            position,
        })?;
        let bit = n * 5;
        let i = bit / 8;
        let j = bit % 8;
        let spread = u16::from(digit) << j;
        out[i] |= (spread & 0xff) as u8;
        let carry = (spread >> 8) as u8;
        if let Some(next) = out.get_mut(i + 1) {
            *next |= carry;
        } else if carry != 0 {
            return Err(DecodeError::NonZeroPadding);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_sha256_of_empty_string() {
        // `nix-hash --type sha256 --to-base32 e3b0c442...b855`
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let bytes = data_encoding::HEXLOWER.decode(hex.as_bytes()).unwrap();
        let text = encode(&bytes);
        assert_eq!(text, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(decode(text.as_bytes()).unwrap(), bytes);
    }

    #[test]
    fn lengths() {
        assert_eq!(encoded_len(0), 0);
        assert_eq!(encoded_len(16), 26);
        assert_eq!(encoded_len(20), 32);
        assert_eq!(encoded_len(32), 52);
        assert_eq!(encoded_len(64), 103);
        assert_eq!(decoded_len(52), Some(32));
        assert_eq!(decoded_len(32), Some(20));
        assert_eq!(decoded_len(3), None);
        assert_eq!(decode(b"").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn rejects_bad_character_with_position() {
        let err = decode(b"0000000000000000000000000000000e").unwrap_err();
        assert_eq!(
            err,
            DecodeError::InvalidCharacter {
                character: 'e',
                position: 31
            }
        );
        assert!(err.to_string().contains("'e'"));
        assert!(err.to_string().contains("31"));
        assert!(matches!(
            decode(b"u0000000000000000000000000000000"),
            Err(DecodeError::InvalidCharacter { position: 0, .. })
        ));
    }

    #[test]
    fn rejects_bad_length() {
        assert_eq!(decode(b"000"), Err(DecodeError::InvalidLength(3)));
        let mut buf = [0u8; 20];
        assert_eq!(
            decode_into(b"00", &mut buf),
            Err(DecodeError::InvalidLength(2))
        );
    }

    #[test]
    fn rejects_non_zero_padding() {
        // 20 bytes use 160 bits = exactly 32 characters: no padding there.
        // 32 bytes use 256 of 260 bits: the first character may be 0 or 1 only.
        let mut text = vec![b'0'; 52];
        text[0] = b'1';
        assert!(decode(&text).is_ok());
        text[0] = b'2';
        assert_eq!(decode(&text), Err(DecodeError::NonZeroPadding));
    }
}
