//! The few symbols `core` expects from a C runtime. Byte loops use volatile accesses so the
//! compiler cannot turn them back into calls to themselves.
use core::ptr::{read_volatile, write_volatile};

#[no_mangle]
pub unsafe extern "C" fn memset(d: *mut u8, c: i32, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: caller guarantees d..d+n is writable.
        unsafe { write_volatile(d.add(i), c as u8) };
    }
    d
}

#[no_mangle]
pub unsafe extern "C" fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    for i in 0..n {
        // SAFETY: caller guarantees valid, non-overlapping ranges.
        unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
    }
    d
}

#[no_mangle]
pub unsafe extern "C" fn memmove(d: *mut u8, s: *const u8, n: usize) -> *mut u8 {
    if (d as usize) < (s as usize) {
        // SAFETY: forward copy is safe when the destination is below the source.
        unsafe { memcpy(d, s, n) }
    } else {
        for i in (0..n).rev() {
            // SAFETY: caller guarantees valid ranges; backward copy handles overlap.
            unsafe { write_volatile(d.add(i), read_volatile(s.add(i))) };
        }
        d
    }
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: caller guarantees both ranges are readable.
        let (x, y) = unsafe { (read_volatile(a.add(i)), read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by `core`'s unwind tables; never called with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}
