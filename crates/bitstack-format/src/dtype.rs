//! Element types of stored tensors.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The element type of a stored tensor, named as in safetensors.
///
/// All multi-byte types are little-endian in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Dtype {
    /// Unsigned byte (`"U8"`): packed sign bits, auxiliary files.
    U8,
    /// IEEE 754 binary16 (`"F16"`).
    F16,
    /// bfloat16 (`"BF16"`).
    BF16,
    /// IEEE 754 binary32 (`"F32"`).
    F32,
}

impl Dtype {
    /// Every dtype this version of the format knows, in declaration order.
    pub const ALL: [Dtype; 4] = [Dtype::U8, Dtype::F16, Dtype::BF16, Dtype::F32];

    /// Size of one element in bytes.
    pub const fn size_of(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// The safetensors name: `"U8"`, `"F16"`, `"BF16"` or `"F32"`.
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "U8",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
        }
    }

    /// Parses a safetensors dtype name; `None` for names this format does not use.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Number of bytes of a tensor of this dtype and `shape` (the product of an empty shape
    /// is 1), or `None` on overflow.
    pub fn byte_len(self, shape: &[usize]) -> Option<usize> {
        shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?
            .checked_mul(self.size_of())
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            assert_eq!(
                serde_json::to_string(&d).unwrap(),
                format!("\"{}\"", d.name())
            );
        }
        assert_eq!(Dtype::from_name("I32"), None);
    }

    #[test]
    fn byte_len_is_checked() {
        assert_eq!(Dtype::F16.byte_len(&[3, 4]), Some(24));
        assert_eq!(Dtype::F32.byte_len(&[]), Some(4));
        assert_eq!(Dtype::U8.byte_len(&[0, 7]), Some(0));
        assert_eq!(Dtype::F32.byte_len(&[usize::MAX, 2]), None);
        assert_eq!(Dtype::F32.byte_len(&[usize::MAX / 2]), None);
    }
}
