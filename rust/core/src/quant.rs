//! Symmetric int8 rounding of cache rows: one scale per row (a token of one head).

use crate::error::{Error, Result};

/// Rounds each row of `d` floats in `x` to int8 against its own scale `max |x| / 127`, half to
/// even (as NumPy's `rint`), into `q`, and writes the row's scale into `scales`. A row of zeros
/// gets scale 0 and zeros; a row holding NaN or ±∞ gets a non-finite scale, so whatever reads it
/// back sees the problem instead of a plausible number.
pub fn quantize_int8(x: &[f32], d: usize, q: &mut [i8], scales: &mut [f32]) -> Result<()> {
    if d == 0 || x.len() != q.len() || x.len() != scales.len() * d {
        return Err(Error::Shape(format!(
            "quantize_int8: {} values, {} outputs and {} scales do not make rows of {d}",
            x.len(),
            q.len(),
            scales.len()
        )));
    }
    for ((row, out), s) in x.chunks_exact(d).zip(q.chunks_exact_mut(d)).zip(scales.iter_mut()) {
        // NaN must win the maximum (f32::max would drop it).
        let amax = row.iter().fold(0f32, |m, &v| if v.abs() > m || v.is_nan() { v.abs() } else { m });
        *s = amax / 127.0;
        let step = if *s > 0.0 { *s } else { 1.0 };
        for (o, &v) in out.iter_mut().zip(row) {
            *o = round_to_i8(v / step);
        }
    }
    Ok(())
}

/// `y` rounded half to even and clamped to ±127 (NaN gives 0). Adding and subtracting
/// 1.5 · 2²³ rounds in the FPU's default mode (half to even) for |y| < 2²²: a `rint` without
/// the library call that baseline x86-64 would make for `round_ties_even`.
#[inline]
fn round_to_i8(y: f32) -> i8 {
    const SHIFT: f32 = 12_582_912.0;
    let c = y.clamp(-127.0, 127.0);
    ((c + SHIFT) - SHIFT) as i8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_to_even_against_the_row_maximum() {
        // Scale 1: the values are the rounded results' own inputs.
        let x = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.6, 0.0];
        let (mut q, mut s) = ([0i8; 10], [0f32; 1]);
        quantize_int8(&x, 10, &mut q, &mut s).unwrap();
        assert_eq!(s[0], 1.0);
        assert_eq!(q, [127, 0, 2, 2, 0, -2, -2, 3, -127, 0]);
    }

    #[test]
    fn zero_rows_and_bad_rows() {
        let x = [0.0, 0.0, 1.0, f32::NAN, 2.0, f32::INFINITY];
        let (mut q, mut s) = ([9i8; 6], [9f32; 3]);
        quantize_int8(&x, 2, &mut q, &mut s).unwrap();
        assert_eq!((s[0], q[0], q[1]), (0.0, 0, 0));
        assert!(s[1].is_nan() && s[2].is_infinite());
        assert!(quantize_int8(&x, 4, &mut q, &mut s).is_err());
    }
}
