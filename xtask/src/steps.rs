//! How long each step of a task took (installs, each build, the test run):
//! said as each step ends, and again in a summary when the task ends, so
//! that CI's log shows where its time goes. Steps that wait on the network
//! or dpkg rather than the CPU (installs, downloads) can run in the
//! background of a build: the machines CI runs on have two cores, which a
//! build keeps busy, and a fresh machine installs for minutes.

use std::{
    cell::Cell,
    sync::Mutex,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Result, anyhow};

struct Done {
    name: String,
    took: Duration,
    cpu: Duration,
    background: bool,
    ok: bool,
}

/// CPU time (user + system) of the processes this one started and waited
/// for, theirs included (cargo waits for rustc): a step's share is the
/// difference across it. It says whether a step computes (a build: near
/// twice its wall time on two cores) or waits (downloads, the tests' own
/// sleeps), and, unlike wall time, hardly changes when other work shares
/// the machine. A background step's children count in whichever steps
/// they end during.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes only the struct it is given, which is a plain
    // C struct (all zeroes is a valid value) that outlives the call.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.try_into().unwrap_or(0))
            + Duration::from_micros(t.tv_usec.try_into().unwrap_or(0))
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Every step this process ran, in the order they ended.
static DONE: Mutex<Vec<Done>> = Mutex::new(Vec::new());

thread_local! {
    /// Set on a background step's thread: the steps it runs overlap the
    /// task's too.
    static IN_BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

fn tag() -> &'static str {
    if IN_BACKGROUND.get() {
        " (background)"
    } else {
        ""
    }
}

fn record(name: &str, took: Duration, cpu: Duration, ok: bool) {
    let background = IN_BACKGROUND.get();
    let tag = tag();
    let outcome = if ok { "took" } else { "failed after" };
    eprintln!(
        "xtask: [step] {name}{tag}: {outcome} {} (CPU {})",
        format(took),
        format(cpu)
    );
    DONE.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(Done {
            name: name.to_string(),
            took,
            cpu,
            background,
            ok,
        });
}

/// Wall and children's CPU time since a step began.
struct Clock(Instant, Duration);

impl Clock {
    fn start() -> Self {
        Clock(Instant::now(), children_cpu())
    }

    fn record(&self, name: &str, ok: bool) {
        record(
            name,
            self.0.elapsed(),
            children_cpu().saturating_sub(self.1),
            ok,
        );
    }
}

/// Runs `f` as the step `name`.
pub fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("xtask: [step] {name}{}", tag());
    let clock = Clock::start();
    let result = f();
    clock.record(name, result.is_ok());
    result
}

/// A step running on a thread of its own while the task goes on.
pub struct Background<T> {
    name: String,
    handle: Option<JoinHandle<Result<T>>>,
}

/// Starts `f` as the step `name` on a thread of its own. Its output
/// interleaves with the task's; its end is said as for any step.
pub fn background<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Background<T> {
    eprintln!("xtask: [step] {name} (background)");
    let owned = name.to_string();
    let handle = std::thread::spawn(move || {
        IN_BACKGROUND.set(true);
        let clock = Clock::start();
        let result = f();
        clock.record(&owned, result.is_ok());
        result
    });
    Background {
        name: name.to_string(),
        handle: Some(handle),
    }
}

impl<T> Background<T> {
    /// Waits for the step and returns what it returned; how long the task
    /// waited is a step of its own (zero when the step ended in time).
    pub fn join(mut self) -> Result<T> {
        let handle = self.handle.take().expect("joined once: join takes self");
        let clock = Clock::start();
        let result = handle
            .join()
            .unwrap_or_else(|_| Err(anyhow!("{} panicked", self.name)));
        clock.record(&format!("waiting for {}", self.name), result.is_ok());
        result
    }
}

impl<T> Drop for Background<T> {
    /// A task that fails before joining still waits for the step: the
    /// process exiting would kill it, and an apt-get or dpkg killed
    /// half-way leaves the machine's packages half installed.
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            if !handle.is_finished() {
                eprintln!("xtask: waiting for {} to end before exiting", self.name);
            }
            let _ = handle.join();
        }
    }
}

/// Prints every step with its wall and CPU time, and the task's since
/// `start`. Background steps overlap the others, and steps may hold steps
/// (an install within a background step): the task's wall time is not the
/// sum of its steps'.
pub fn summary(start: Instant) {
    let done = DONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if done.is_empty() {
        return;
    }
    eprintln!("xtask: steps as they ended (wall time, CPU time of what they ran):");
    for step in done.iter() {
        eprintln!(
            "xtask: {:>10} {:>10}  {}{}{}",
            format(step.took),
            format(step.cpu),
            step.name,
            if step.background { " (background)" } else { "" },
            if step.ok { "" } else { " FAILED" },
        );
    }
    eprintln!(
        "xtask: {:>10} {:>10}  in all",
        format(start.elapsed()),
        format(children_cpu())
    );
}

/// `4m 05.2s`, or `3.4s` under a minute (rounded to tenths first).
pub fn format(d: Duration) -> String {
    let tenths = (d.as_millis() + 50) / 100;
    let (minutes, tenths) = (tenths / 600, tenths % 600);
    if minutes == 0 {
        format!("{}.{}s", tenths / 10, tenths % 10)
    } else {
        format!("{minutes}m {:02}.{}s", tenths / 10, tenths % 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_durations() {
        assert_eq!(format(Duration::from_millis(3_400)), "3.4s");
        assert_eq!(format(Duration::from_millis(245_200)), "4m 05.2s");
        assert_eq!(format(Duration::from_secs(60)), "1m 00.0s");
        assert_eq!(format(Duration::from_millis(59_960)), "1m 00.0s");
    }
}
