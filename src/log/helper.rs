//! A thread that tells the commit observer about a large group while the leader writes
//! and syncs it.
//!
//! Under [`Durability::Sync`](super::Durability::Sync) a group commit is: write, sync,
//! tell the observer (the index's memtable), acknowledge. The observer's work is CPU
//! (about a quarter of a microsecond per event in the index), the sync is waiting on the
//! disk (about half a millisecond per 1,000 events here); one after the other they add
//! up. For a group of at least [`OVERLAP_RECORDS_MIN`] records the leader hands the
//! observer's [`written`](super::CommitObserver::written) call to this thread before it
//! writes the group, and writes and syncs meanwhile (the write too, since the thread's
//! wake-up and work often outlast the sync alone: measured, the leader then waited
//! 0.14 ms per 1,000-event group for the thread instead of 0.19 ms). The observer keeps
//! the records hidden until [`published`](super::CommitObserver::published), which the
//! leader calls only after both are done, or forgets them at
//! [`abandoned`](super::CommitObserver::abandoned) if the write or the sync failed.
//! Smaller groups do it inline: a hand-over costs a thread wake-up (about 0.1 ms on this
//! virtual machine), more than a small group's observer work.
//!
//! The sync stays on the leader, so the wake-up delays only the observer's work, which
//! has the sync's time to spare. The leader never depends on the thread: if it has
//! stopped, the job runs inline.

use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Groups of at least this many records are told to the observer on the helper thread.
pub(crate) const OVERLAP_RECORDS_MIN: usize = 256;

/// How long the idle thread sleeps between checks for `stop` when nobody wakes it; also
/// the slice in which a leader waiting for a job checks that the thread still runs.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Work handed to the thread. It owns what it uses (the group's bytes are shared through
/// an `Arc`), so nothing borrowed from the leader crosses threads.
pub(crate) type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct State {
    /// Set by the leader, taken by the thread.
    job: Option<Job>,
    /// Set by the thread once the job has run (and been dropped).
    done: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    job_cv: Condvar,
    done_cv: Condvar,
}

/// The helper thread; stopped and joined on drop.
pub(crate) struct Helper {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Helper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Helper").finish_non_exhaustive()
    }
}

impl Helper {
    /// Starts the thread.
    pub(crate) fn start() -> std::io::Result<Helper> {
        let shared = Arc::new(Shared::default());
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("eventlog-commit".into())
            .spawn(move || run(&for_thread))?;
        Ok(Helper {
            shared,
            thread: Some(thread),
        })
    }

    fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Runs `job` on the thread while `here` runs on this one; returns `here`'s result
    /// once both are done (so the job's effects are visible to what follows). Only the
    /// log's leader calls this, so there is at most one job at a time.
    pub(crate) fn run_while<R>(&self, job: Job, here: impl FnOnce() -> R) -> R {
        if !self.running() {
            job();
            return here();
        }
        {
            let mut state = self.shared.state.lock();
            assert!(
                state.job.is_none() && !state.done,
                "one job at a time: only the leader hands jobs over"
            );
            state.job = Some(job);
        }
        self.shared.job_cv.notify_one();
        let result = here();
        let mut state = self.shared.state.lock();
        loop {
            if state.done {
                state.done = false;
                return result;
            }
            if !self.running() {
                // The thread ended without running the job (it does not panic in normal
                // operation): run it here.
                if let Some(job) = state.job.take() {
                    drop(state);
                    job();
                }
                return result;
            }
            self.shared.done_cv.wait_for(&mut state, WAIT_SLICE);
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.job_cv.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared) {
    loop {
        let job = {
            let mut state = shared.state.lock();
            loop {
                if let Some(job) = state.job.take() {
                    break job;
                }
                if state.stop {
                    return;
                }
                shared.job_cv.wait_for(&mut state, WAIT_SLICE);
            }
        };
        job();
        shared.state.lock().done = true;
        shared.done_cv.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn jobs_run_on_the_thread_and_are_done_when_the_call_returns() {
        let helper = Helper::start().expect("the thread starts");
        let counter = Arc::new(AtomicU64::new(0));
        for i in 0..200u64 {
            let c = Arc::clone(&counter);
            let here = helper.run_while(
                Box::new(move || {
                    c.fetch_add(1, Ordering::Relaxed);
                }),
                || i * 2,
            );
            assert_eq!(here, i * 2);
            assert_eq!(
                counter.load(Ordering::Relaxed),
                i + 1,
                "the job is done when run_while returns"
            );
        }
        drop(helper);
        assert_eq!(Arc::strong_count(&counter), 1, "every job was dropped");
    }
}
