//! Bit-layout tests against hand-computed bytes, sign conventions and validation errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bitstack_bits::{checked_packed_len, packed_len, BitsError, SignMatrix, SignMatrixRef};

#[test]
fn one_byte_msb_first() {
    let v = [1.0, -1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0];
    let s = SignMatrix::from_signs_of(&v, 1, 8).unwrap();
    assert_eq!(s.as_bytes(), &[0b1011_0001]);
    // Same bits, different shape: the layout is the flat row-major order.
    let t = SignMatrix::from_signs_of(&v, 2, 4).unwrap();
    assert_eq!(t.as_bytes(), &[0b1011_0001]);
    assert!(!t.as_view().get(1, 0) && t.as_view().get(1, 3));
}

#[test]
fn rows_are_not_padded() {
    // 3×3, row 0 = [+,+,+], row 1 = [-,-,+], row 2 = [+,-,-]:
    // bits 111 001 10|0 + 7 zero pad bits.
    let v = [1.0, 2.0, 3.0, -1.0, -2.0, 3.0, 1.0, -2.0, -3.0];
    let s = SignMatrix::from_signs_of(&v, 3, 3).unwrap();
    assert_eq!(s.as_bytes(), &[0b1110_0110, 0b0000_0000]);
    let v2 = [1.0, 2.0, 3.0, -1.0, -2.0, 3.0, 1.0, -2.0, 3.0];
    let s2 = SignMatrix::from_signs_of(&v2, 3, 3).unwrap();
    assert_eq!(s2.as_bytes(), &[0b1110_0110, 0b1000_0000]);
    assert_eq!(s2.as_view().sign(2, 2), 1.0);
    assert_eq!(s2.as_view().sign(2, 1), -1.0);
}

#[test]
fn all_positive_has_zero_padding() {
    let s = SignMatrix::from_signs_of(&[1.0; 13], 1, 13).unwrap();
    assert_eq!(s.as_bytes(), &[0xff, 0b1111_1000]);
}

#[test]
fn zero_is_positive() {
    let s = SignMatrix::from_signs_of(&[0.0, -0.0, -1e-30, 1e-30], 1, 4).unwrap();
    assert_eq!(s.as_bytes(), &[0b1101_0000]);
    assert_eq!(s.as_view().unpack(), vec![1.0, 1.0, -1.0, 1.0]);
}

#[test]
fn nan_error_names_position() {
    let mut v = vec![1.0f32; 35];
    v[17] = f32::NAN;
    v[30] = f32::NAN;
    let err = SignMatrix::from_signs_of(&v, 5, 7).unwrap_err();
    assert_eq!(
        err,
        BitsError::NanValue {
            rows: 5,
            cols: 7,
            row: 2,
            col: 3
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("5x7") && msg.contains("row 2, column 3"),
        "{msg}"
    );
}

#[test]
fn value_count_error() {
    let err = SignMatrix::from_signs_of(&[1.0; 7], 2, 4).unwrap_err();
    assert!(matches!(
        err,
        BitsError::ValueCountMismatch {
            expected: 8,
            actual: 7,
            ..
        }
    ));
}

#[test]
fn view_length_errors() {
    let bytes = [0u8; 4];
    // 5×5 = 25 bits = 4 bytes.
    assert!(SignMatrixRef::new(&bytes, 5, 5).is_ok());
    for len in [0, 3] {
        let err = SignMatrixRef::new(&bytes[..len], 5, 5).unwrap_err();
        assert_eq!(
            err,
            BitsError::PackedLenMismatch {
                rows: 5,
                cols: 5,
                expected: 4,
                actual: len
            }
        );
        assert!(err.to_string().contains("5x5"));
    }
    let extra = [0u8; 5];
    assert!(matches!(
        SignMatrixRef::new(&extra, 5, 5),
        Err(BitsError::PackedLenMismatch { actual: 5, .. })
    ));
    assert!(matches!(
        SignMatrixRef::new(&bytes, usize::MAX, 3),
        Err(BitsError::ShapeOverflow { .. })
    ));
    // Empty matrices take an empty buffer.
    assert!(SignMatrixRef::new(&[], 0, 9).is_ok());
    assert!(SignMatrixRef::new(&[0], 0, 9).is_err());
}

#[test]
fn view_padding_error() {
    // 5×5: the last byte uses 1 bit, 7 pad bits.
    assert!(SignMatrixRef::new(&[0, 0, 0, 0x80], 5, 5).is_ok());
    let err = SignMatrixRef::new(&[0, 0, 0, 0x81], 5, 5).unwrap_err();
    assert!(matches!(
        err,
        BitsError::NonZeroPadding {
            pad_bits: 7,
            last_byte: 0x81,
            ..
        }
    ));
    assert!(SignMatrix::from_packed(vec![0, 0, 0, 0x01], 5, 5).is_err());
}

#[test]
fn packed_lengths() {
    assert_eq!(packed_len(0, 0), 0);
    assert_eq!(packed_len(1, 1), 1);
    assert_eq!(packed_len(3, 3), 2);
    assert_eq!(packed_len(8, 1), 1);
    assert_eq!(packed_len(4096, 11008), 4096 * 11008 / 8);
    assert_eq!(checked_packed_len(usize::MAX, 2), None);
}

#[test]
#[should_panic(expected = "out of bounds")]
fn get_out_of_bounds_panics() {
    let s = SignMatrix::from_signs_of(&[1.0; 6], 2, 3).unwrap();
    let _ = s.as_view().get(0, 3);
}

#[test]
#[should_panic(expected = "Y has")]
fn matmul_output_length_panics() {
    let s = SignMatrix::from_signs_of(&[1.0; 6], 2, 3).unwrap();
    s.as_view().sign_matmul_lut(&[0.0; 6], 2, &mut [0.0; 3]);
}

#[test]
fn hand_computed_products() {
    // S = [[+,-,+],[-,-,+]]
    let s = SignMatrix::from_signs_of(&[1.0, -1.0, 1.0, -1.0, -1.0, 1.0], 2, 3).unwrap();
    let v = s.as_view();
    let z = [1.0, 2.0, 4.0];
    let mut y = [0.0; 2];
    v.sign_matvec_naive(&z, &mut y);
    assert_eq!(y, [3.0, 1.0]);
    let mut y = [0.0; 2];
    v.sign_matvec_lut(&z, &mut y);
    assert_eq!(y, [3.0, 1.0]);
    // Z = [[1,10],[2,20],[4,40]] (3×2) → Y = [[3,30],[1,10]].
    let zz = [1.0, 10.0, 2.0, 20.0, 4.0, 40.0];
    let mut y = [0.0; 4];
    v.sign_matmul_naive(&zz, 2, &mut y);
    assert_eq!(y, [3.0, 30.0, 1.0, 10.0]);
    let mut y = [0.0; 4];
    v.sign_matmul_lut(&zz, 2, &mut y);
    assert_eq!(y, [3.0, 30.0, 1.0, 10.0]);
}
