//! `Extent`, the one bound of every view, at its edges: empty shapes, negative and zero
//! strides, and strides whose span no buffer can hold (an error, never a wrap or a panic).

use ferroattn_core::{Dense, Elems, ElemsMut, Error, Extent, Strided, StridedMut};

fn extent(shape: [usize; 4], strides: [isize; 4]) -> Option<Extent> {
    Extent::of("x", shape, strides, 4).expect("a span a buffer can hold")
}

#[test]
fn empty_shapes_reach_nothing() {
    for shape in [[0, 3, 4, 5], [2, 0, 4, 5], [2, 3, 0, 5], [2, 3, 4, 0]] {
        assert_eq!(extent(shape, [60, 20, 5, 1]), None, "{shape:?}");
        // Whatever the strides: an empty view reads no element.
        assert_eq!(Extent::of("x", shape, [isize::MAX, isize::MIN, 1, 1], 4), Ok(None));
    }
    let views = Strided::new("q", Elems::F32(&[]), 7, [2, 0, 4, 5], [isize::MAX, 1, 1, 1]);
    assert!(views.is_ok(), "an empty view needs no buffer");
}

#[test]
fn contiguous_and_single_elements() {
    let e = extent([2, 3, 4, 5], [60, 20, 5, 1]).unwrap();
    assert_eq!((e.lo, e.hi, e.elements()), (0, 119, 120));
    assert!(e.fits(120, 0) && !e.fits(119, 0) && !e.fits(120, 1));
    let one = extent([1, 1, 1, 1], [isize::MAX, isize::MIN, 9, -9]).unwrap();
    assert_eq!((one.lo, one.hi, one.elements()), (0, 0, 1), "length-1 axes never step");
}

#[test]
fn negative_strides_reach_below_element_zero() {
    let e = extent([1, 1, 4, 3], [12, 12, -3, 1]).unwrap();
    assert_eq!((e.lo, e.hi, e.elements()), (-9, 2, 12));
    assert!(e.fits(12, 9), "element 0 at index 9: indices 0..12");
    assert!(!e.fits(12, 8) && !e.fits(11, 9));
    let x = [0.0f32; 12];
    assert!(Strided::new("q", Elems::F32(&x), 9, [1, 1, 4, 3], [12, 12, -3, 1]).is_ok());
    assert!(Strided::new("q", Elems::F32(&x), 8, [1, 1, 4, 3], [12, 12, -3, 1]).is_err());
}

#[test]
fn zero_strides_broadcast() {
    let e = extent([8, 16, 1024, 1024], [0, 0, 0, 1]).unwrap();
    assert_eq!((e.lo, e.hi), (0, 1023));
    let row = [1.0f32; 1024];
    assert!(Dense::new("bias", &row, 0, [8, 16, 1024, 1024], [0, 0, 0, 1]).is_ok());
    assert!(Dense::new("bias", &row[..1023], 0, [8, 16, 1024, 1024], [0, 0, 0, 1]).is_err());
}

#[test]
fn spans_beyond_any_buffer_are_errors() {
    let huge = [
        ([3, 1, 1, 1], [isize::MAX, 1, 1, 1]),
        ([3, 1, 1, 1], [isize::MIN, 1, 1, 1]),
        ([2, 2, 1, 1], [isize::MAX / 2 + 1, isize::MAX / 2 + 1, 1, 1]),
        ([usize::MAX, 1, 1, 1], [1, 1, 1, 1]),
        ([usize::MAX, usize::MAX, usize::MAX, usize::MAX], [-1, 1, -1, 1]),
    ];
    for (shape, strides) in huge {
        match Extent::of("k", shape, strides, 1) {
            Err(Error::Shape(m)) => assert!(m.starts_with("k: ") && m.contains("more memory"), "{m}"),
            other => panic!("{shape:?} {strides:?}: {other:?}"),
        }
    }
    // The item size counts: isize::MAX / 2 elements of 4 bytes exceed isize::MAX bytes.
    let half = [1, 1, 1, (isize::MAX / 2) as usize];
    assert!(Extent::of("k", half, [1, 1, 1, 1], 1).is_ok());
    assert!(Extent::of("k", half, [1, 1, 1, 1], 4).is_err());
    // Views refuse them the same way, whatever their buffer.
    let x = [0.0f32; 4];
    assert!(Strided::new("q", Elems::F32(&x), 0, [3, 1, 1, 1], [isize::MAX, 1, 1, 1]).is_err());
    let mut y = [0.0f32; 4];
    assert!(StridedMut::new("out", ElemsMut::F32(&mut y), 0, [3, 1, 1, 1], [isize::MIN, 1, 1, 1]).is_err());
    assert!(Dense::new("mask", &[1u8; 4], 0, [2, 2, 1, 1], [isize::MAX / 2 + 1, isize::MAX / 2 + 1, 1, 1]).is_err());
}

#[test]
fn the_largest_span_a_buffer_can_hold_is_exact() {
    // From isize::MIN / 2 to isize::MAX / 2 of bytes: hi - lo + 1 = isize::MAX, one byte each.
    let e = Extent::of("x", [2, 2, 1, 1], [isize::MIN / 2 + 1, isize::MAX / 2, 1, 1], 1).unwrap().unwrap();
    assert_eq!(e.elements(), isize::MAX as usize);
    assert!(!e.fits(usize::MAX, 0), "element 0 at offset 0 with elements below it");
    assert!(e.fits(isize::MAX as usize, (-e.lo) as usize));
}
