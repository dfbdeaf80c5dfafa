//! Measuring the memory a model load keeps: a global allocator that counts, per thread, the
//! bytes allocated less the bytes freed.
//!
//! The `sophon` binary installs [`Counting`] as its global allocator. A load runs on one thread
//! and one at a time (`mesh::replicas`), so the thread's net count across the load is the heap
//! the loaded model holds: its bundle, the backend's graph and plans, the component's
//! metadata. Where the allocator is not installed (a library user, a unit test),
//! [`measure`] answers `None` and the node falls back to an estimate from the bundle's size.
//!
//! The count costs one thread-local add per allocation. Memory a native backend (onnxruntime,
//! OpenVINO) takes through its own allocator is not seen here; the node adds those graphs'
//! weights to the figure (`mesh::replicas`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::OnceLock;

thread_local! {
    static NET: Cell<i64> = const { Cell::new(0) };
}

/// Whether [`Counting`] is the global allocator: probed once, by allocating.
fn installed() -> bool {
    static INSTALLED: OnceLock<bool> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        let before = NET.with(Cell::get);
        let probe = std::hint::black_box(Box::new([0u8; 64]));
        let after = NET.with(Cell::get);
        drop(probe);
        after != before
    })
}

/// The system allocator, counting each thread's net allocated bytes.
#[derive(Debug, Default)]
pub struct Counting;

fn add(bytes: i64) {
    // `try_with`: a thread being torn down has no count, and that is fine.
    let _ = NET.try_with(|n| n.set(n.get().wrapping_add(bytes)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the count
// is a thread-local integer with a const initialiser, which never allocates.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as i64);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` through this allocator with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as i64));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`, and `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Runs `f` and answers what it allocated and did not free on this thread, in bytes (`None`
/// where [`Counting`] is not the global allocator). Frees of memory allocated elsewhere count
/// against it, so the figure is at least 0.
pub fn measure<R>(f: impl FnOnce() -> R) -> (R, Option<u64>) {
    let before = NET.with(Cell::get);
    let r = f();
    let after = NET.with(Cell::get);
    let kept = installed().then(|| after.saturating_sub(before).max(0) as u64);
    (r, kept)
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_the_allocator_there_is_no_figure() {
        // The test binary does not install `Counting`.
        let (v, kept) = super::measure(|| vec![0u8; 1 << 20]);
        assert_eq!(v.len(), 1 << 20);
        assert_eq!(kept, None);
    }
}
