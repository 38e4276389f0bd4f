//! The one policy for a poisoned lock: go on with the data.
//!
//! A lock is poisoned when a thread panicked while holding it. ntm's
//! critical sections keep their data usable at every point a panic could
//! come from (counts are added whole, tables are bounded maps), so the
//! data behind a poisoned lock is still right to use; refusing it would
//! stop counting, naming or answering for good over one bug, which the
//! log already shows. Every lock in the agent is taken through these.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
