//! Measured memory: a counting global allocator (current and peak heap bytes) that binaries and
//! tests install with `#[global_allocator]`, and device memory where a GPU is in use.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicUsize = AtomicUsize::new(0);

/// Wraps the system allocator and counts requested bytes. Every candle CPU buffer is a Rust `Vec`,
/// so this sees all tensor memory; it does not see mmap'd files or thread stacks.
///
/// ```ignore
/// #[global_allocator]
/// static ALLOC: petl_trainer::memory::CountingAllocator = petl_trainer::memory::CountingAllocator;
/// ```
pub struct CountingAllocator;

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded unchanged to the system allocator.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as `GlobalAlloc::realloc`, forwarded.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

fn grow(bytes: usize) {
    INSTALLED.store(1, Ordering::Relaxed);
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

/// True once the counting allocator has served an allocation, i.e. it is the global allocator.
pub fn is_counting() -> bool {
    INSTALLED.load(Ordering::Relaxed) == 1
}

/// Heap bytes allocated now.
pub fn current_bytes() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

/// Highest `current_bytes` since the last `reset_peak`.
pub fn peak_bytes() -> usize {
    PEAK.load(Ordering::Relaxed)
}

/// Starts a new peak window at the current level.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Free and total bytes of the GPU behind `device`, or `None` on the CPU.
#[cfg(feature = "cuda")]
pub fn device_memory(device: &candle_core::Device) -> Option<(usize, usize)> {
    match device {
        candle_core::Device::Cuda(d) => d.cuda_stream().context().mem_get_info().ok(),
        _ => None,
    }
}

/// Free and total bytes of the GPU behind `device`, or `None` on the CPU.
#[cfg(not(feature = "cuda"))]
pub fn device_memory(_device: &candle_core::Device) -> Option<(usize, usize)> {
    None
}
