//! CPU time of the calling thread, for benchmarks.
//!
//! Benchmarks divide work by CPU seconds, not wall seconds, so a figure measured on a machine
//! shared with other work still says what one core does. The clock is
//! `CLOCK_THREAD_CPUTIME_ID` (through rustix, no `unsafe` here), which the kernel keeps exact
//! for the running thread; `/proc/thread-self/schedstat` is not, since it is only folded in at
//! scheduler events and is absent on kernels built without schedstats.

/// CPU seconds consumed so far by the calling thread.
pub fn thread_cpu_seconds() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_cpu_time_advances_with_work() {
        let a = super::thread_cpu_seconds();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = super::thread_cpu_seconds();
        assert!(b > a, "thread CPU clock did not advance: {a} -> {b}");
    }
}
