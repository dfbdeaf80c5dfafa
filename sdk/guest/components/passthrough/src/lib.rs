//! The generic ONNX passthrough: hands every named input to the bundle's graph `model` and returns
//! every output. Its inputs and outputs are whatever the bundle manifest declares (the packer reads
//! them from the ONNX graph), so one component serves any plain ONNX file.
//!
//! It targets the `direct-model` world: the node calls `direct.predict` with the request's tensors
//! as wasi-nn handles it holds, and this component passes them to the graph untouched, so no tensor
//! is copied through its linear memory. `predictor.predict` (tensors by value) serves the requests
//! wasi-nn cannot carry, and nodes that predate `direct`.
//!
//! The same recipe serves any model that only forwards its tensors: generate the `direct-model`
//! world with the SDK's types (`with` below) and export both interfaces.

#![no_std]

extern crate alloc;

use alloc::string::ToString;
use alloc::vec::Vec;
use sophon_guest::nn::Graph;
use sophon_guest::{ModelMetadata, PredictError, Tensor};

mod bindings {
    wit_bindgen::generate!({
        world: "direct-model",
        path: "../../../../wit/wit",
        with: {
            "sophon:model/types@0.1.0": sophon_guest::bindings::sophon::model::types,
            "wasi:nn/tensor@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::tensor,
            "wasi:nn/graph@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::graph,
            "wasi:nn/inference@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::inference,
            "wasi:nn/errors@0.2.0-rc-2024-10-28": sophon_guest::bindings::wasi::nn::errors,
        },
    });
}

use bindings::exports::sophon::model::{direct, predictor};

struct Passthrough;

impl predictor::Guest for Passthrough {
    fn metadata() -> ModelMetadata {
        ModelMetadata {
            name: "onnx-passthrough".to_string(),
            inputs: Vec::new(),
            outputs: Vec::new(),
        }
    }

    fn predict(inputs: Vec<Tensor>) -> Result<Vec<Tensor>, PredictError> {
        Graph::by_name("model")?.context()?.compute(inputs)
    }
}

impl direct::Guest for Passthrough {
    fn predict(inputs: Vec<direct::NamedTensor>) -> Result<Vec<direct::NamedTensor>, PredictError> {
        Graph::by_name("model")?.context()?.compute_handles(inputs)
    }
}

bindings::export!(Passthrough with_types_in bindings);

/// Every instance serves one request and is then thrown away whole, so memory is never given
/// back: a bump allocator from the end of the static data (`__heap_base`) through the initial
/// memory, growing memory only when that runs out (the node's limiter caps the growth).
mod bump {
    use core::alloc::{GlobalAlloc, Layout};
    use core::arch::wasm32::{memory_grow, memory_size};
    use core::cell::Cell;

    const PAGE: usize = 64 << 10;

    unsafe extern "C" {
        /// Where the linker put the end of the stack and static data.
        static __heap_base: u8;
    }

    struct Bump {
        /// The next free byte; 0 before the first allocation.
        next: Cell<usize>,
    }

    // A component instance runs one thread.
    unsafe impl Sync for Bump {}

    unsafe impl GlobalAlloc for Bump {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let mut next = self.next.get();
            if next == 0 {
                next = &raw const __heap_base as usize;
            }
            let start = (next + layout.align() - 1) & !(layout.align() - 1);
            let Some(end) = start.checked_add(layout.size()) else {
                return core::ptr::null_mut();
            };
            let limit = memory_size(0) * PAGE;
            if end > limit {
                let pages = (end - limit).div_ceil(PAGE);
                if memory_grow(0, pages) == usize::MAX {
                    return core::ptr::null_mut();
                }
            }
            self.next.set(end);
            start as *mut u8
        }

        unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
    }

    #[global_allocator]
    static ALLOCATOR: Bump = Bump { next: Cell::new(0) };
}

/// The canonical ABI's allocator, which std provides to a component built with it: where the
/// node writes what it hands the guest (names, and tensors by value).
///
/// # Safety
///
/// Called by the component's glue with the canonical ABI's contract: `old_ptr` is null or a
/// block of `old_len` bytes this allocator returned, `align` a power of two.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    if new_len == 0 {
        return align as *mut u8;
    }
    // SAFETY: `align` is a power of two (the ABI's contract) and `new_len` is not zero.
    let new = unsafe {
        alloc::alloc::alloc(core::alloc::Layout::from_size_align_unchecked(
            new_len, align,
        ))
    };
    if new.is_null() {
        core::arch::wasm32::unreachable();
    }
    if !old_ptr.is_null() && old_len > 0 {
        // SAFETY: both blocks are ours, distinct, and at least this long.
        unsafe { core::ptr::copy_nonoverlapping(old_ptr, new, old_len.min(new_len)) };
    }
    new
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}
