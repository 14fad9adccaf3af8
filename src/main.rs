// mimalloc, never returning freed pages to the OS: training allocates large tensors every step,
// and fresh pages from the kernel (glibc's mmap per large allocation) cost ~30% of a step in
// page zeroing (perf). Measured 38 → 53 training tok/s on SmolLM2.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v2's option enum.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Safety: sets a global allocator option; -1 = never purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    elastica::cli::main()
}
