//! The one lock-poisoning policy: poisoning only happens after a panic while holding the lock,
//! and every critical section in this crate is a single insert, remove, get or swap, or a few
//! of them that cannot panic between them (short of running out of memory, which aborts), so
//! the data stays consistent; recover the guard instead of spreading the panic.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A read guard, recovered if poisoned.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// A write guard, recovered if poisoned.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// A mutex guard, recovered if poisoned.
pub fn lock<T>(l: &Mutex<T>) -> MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|e| e.into_inner())
}
