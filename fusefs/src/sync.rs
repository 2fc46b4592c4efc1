//! The one way this crate takes a lock.

use std::sync::{Mutex, MutexGuard};

/// A panic in one request must not take the whole filesystem down with a poisoned lock.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
