//! `petl-trainer train --config <job.yaml>`: one rank of a PetlJob, as worker pods run it.
//! The counting allocator makes the peak-memory numbers in logs, metrics and manifest real.

#[global_allocator]
static ALLOCATOR: petl_trainer::memory::CountingAllocator = petl_trainer::memory::CountingAllocator;

fn main() -> std::process::ExitCode {
    // SAFETY: the first statement of main; no other thread exists yet.
    unsafe { petl_trainer::device::set_cpu_pool_defaults() };
    petl_trainer::memory::keep_freed_memory();
    petl_trainer::cli::trainer_main()
}
