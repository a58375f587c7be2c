//! What the examples share: buffers laid out as `ferroattn.KVCache` lays out its arrays.

/// A buffer of `n` elements set to `fill`, 2 MiB aligned, with huge pages requested where
/// possible.
pub fn buffer<T: Copy>(n: usize, fill: T) -> &'static mut [T] {
    let layout = std::alloc::Layout::from_size_align(n.max(1) * size_of::<T>(), 2 << 20).expect("layout");
    // SAFETY: the layout is non-zero in size; the memory is initialised before the slice is made.
    unsafe {
        let p = std::alloc::alloc(layout) as *mut T;
        assert!(!p.is_null(), "out of memory");
        #[cfg(target_os = "linux")]
        {
            extern "C" {
                fn madvise(addr: *mut u8, len: usize, advice: i32) -> i32;
            }
            const MADV_HUGEPAGE: i32 = 14;
            madvise(p as *mut u8, layout.size(), MADV_HUGEPAGE);
        }
        for i in 0..n {
            p.add(i).write(fill);
        }
        std::slice::from_raw_parts_mut(p, n)
    }
}
