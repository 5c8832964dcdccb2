//! The zero test's read of a memory file's mapping, guarded against SIGBUS (`guarded_read.c`):
//! a page past the end of a memory file truncated under the pager makes the read return an
//! error instead of killing the pager and every VM it serves.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use tracing::warn;

extern "C" {
    fn uffdpager_guard_install() -> libc::c_int;
    fn uffdpager_classify_pages(
        base: *const u8,
        len: usize,
        pages: *const u64,
        n: usize,
        zero: *mut u8,
    ) -> usize;
}

static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Which of `pages` (4 KiB pages of `map`, each starting inside it; the last may be short)
/// hold only zeros. `map` may be any memory, a memory file's mapping or a buffer. `Err(i)`
/// if reading `pages[i]` raised SIGBUS: the file is shorter than the mapping now. Without the
/// handler (its installation failed) nothing is read and every page answers `Err(0)`.
pub fn classify_pages(map: &[u8], pages: &[u64]) -> Result<Vec<bool>, usize> {
    INSTALL.call_once(|| {
        // SAFETY: sigaction with a handler written for it (async-signal-safe: it only jumps back
        // into the guarded read or calls the previous handler); called once per process.
        if unsafe { uffdpager_guard_install() } == 0 {
            INSTALLED.store(true, Ordering::Release);
        } else {
            warn!(error = %std::io::Error::last_os_error(), "installing the SIGBUS guard failed; zero tests are off");
        }
    });
    if !INSTALLED.load(Ordering::Acquire) {
        return Err(0);
    }
    assert!(
        pages.iter().all(|&p| p.checked_mul(4096).is_some_and(|at| at < map.len() as u64)),
        "every page starts inside the mapping"
    );
    let mut zero = vec![0u8; pages.len()];
    // SAFETY: `map` is a live mapping of `map.len()` bytes, every page starts inside it (checked
    // above) and is read at most to the mapping's end; `zero` has one byte per page. A read past
    // a truncated file's end raises SIGBUS, which the C side turns into an early return.
    let done = unsafe {
        uffdpager_classify_pages(
            map.as_ptr(),
            map.len(),
            pages.as_ptr(),
            pages.len(),
            zero.as_mut_ptr(),
        )
    };
    if done < pages.len() {
        return Err(done);
    }
    Ok(zero.into_iter().map(|z| z != 0).collect())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn mapped(bytes: &[u8]) -> (tempfile::NamedTempFile, memmap2::Mmap) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        // SAFETY: the test's own temporary file; the tests below truncate it on purpose, and read
        // it only through `classify_pages`.
        let map = unsafe { memmap2::Mmap::map(f.as_file()) }.unwrap();
        (f, map)
    }

    #[test]
    fn pages_are_told_apart_by_any_nonzero_byte_and_a_short_last_page_counts() {
        let mut bytes = vec![0u8; 5 * 4096 + 100];
        bytes[4096] = 1; // page 1: first byte
        bytes[2 * 4096 + 4095] = 1; // page 2: last byte
        bytes[5 * 4096 + 99] = 1; // page 5 (100 bytes long): its last byte
        let (_f, map) = mapped(&bytes);
        let zero = classify_pages(&map, &[0, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(zero, vec![true, false, false, true, true, false]);
        assert_eq!(classify_pages(&map, &[4, 0]).unwrap(), vec![true, true]);
    }

    #[test]
    fn a_single_nonzero_byte_anywhere_makes_data_even_in_an_unaligned_buffer() {
        let mut buf = vec![0u8; 4096 + 3];
        assert_eq!(classify_pages(&buf[1..], &[0]), Ok(vec![true]));
        for i in [1, 17, 2048, 4095, 4096] {
            buf[i] = 1;
            assert_eq!(classify_pages(&buf[1..], &[0]), Ok(vec![false]), "byte {i}");
            buf[i] = 0;
        }
    }

    #[test]
    fn a_page_past_a_truncated_end_is_an_error_not_a_signal() {
        let (f, map) = mapped(&vec![7u8; 16 * 4096]);
        f.as_file().set_len(4 * 4096).unwrap();
        assert_eq!(classify_pages(&map, &[0, 1, 2, 3, 9, 10]), Err(4));
        // The thread reads again as before: the guard was left as it was found.
        assert_eq!(classify_pages(&map, &[3, 2]), Ok(vec![false, false]));
        assert_eq!(classify_pages(&map, &[15]), Err(0));
    }
}
