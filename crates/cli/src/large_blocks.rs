//! How the C allocator of a long-running coordinator treats large blocks.

/// The size from which every block is mapped on its own, in bytes (glibc's starting value).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const LARGE_BLOCK: libc::c_int = 128 * 1024;

/// Have every block of [`LARGE_BLOCK`] or more mapped on its own and given back to the system
/// when freed. By default glibc raises that threshold to the largest such block freed so far
/// (up to 32 MiB on 64-bit systems): after a burst of 100,000 demands the planner's queues
/// and buffers of the next burst come from the heap instead, and the pages they leave behind,
/// shared with small blocks still live, stay resident. With the threshold fixed, `up`'s
/// resident memory follows what it keeps (see docs/BENCHMARKS.md, memory per queued step).
pub fn give_back_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets one of the allocator's parameters; it takes any value.
        let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, LARGE_BLOCK) };
        if set != 1 {
            tracing::warn!("the allocator kept its own threshold for mapping large blocks");
        }
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// Whether glibc mapped the block holding `bytes` on its own: the flag it keeps in the
    /// size word just before the block.
    fn is_mapped(bytes: &[u8]) -> bool {
        // SAFETY: every block glibc's malloc hands out is preceded by its size word.
        let size_word = unsafe { *(bytes.as_ptr() as *const usize).sub(1) };
        size_word & 2 != 0
    }

    #[test]
    fn a_large_block_is_mapped_on_its_own_after_a_larger_one_was_freed() {
        give_back_large_blocks();
        // By default, freeing this raises the threshold to its size.
        drop(std::hint::black_box(vec![1u8; 8 << 20]));
        let large = std::hint::black_box(vec![1u8; 2 * LARGE_BLOCK as usize]);
        assert!(is_mapped(&large));
        // Positive control: a small block comes from the heap.
        let small = std::hint::black_box(vec![1u8; 1024]);
        assert!(!is_mapped(&small));
    }
}
