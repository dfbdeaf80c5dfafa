//! The memory one guest call makes the node hold, counted against the model's memory limit.
//!
//! A call's limit covers three things: the instance's linear memory, the wasi-nn tensors the
//! guest creates on the host (and the ones the backend hands back to it), and what each wasi-nn
//! execution context holds (its execution state, staged inputs and retained outputs). The first
//! two are seen by the sandbox; the third only by the backend. All three go into one account,
//! opened per call on the thread that runs it: guest calls run synchronously on one thread, from
//! instantiation to the store's drop, so a thread-local account belongs to the call in progress.
//!
//! A backend context carries a [`Held`], which charges the account and gives the bytes back when
//! the context is dropped. A `Held` made outside a call (the native benchmark baseline) charges
//! nothing. A `Held` dropped after its call ended (or on another thread) changes no other call's
//! account: each account has its own id.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

struct Account {
    id: u64,
    max: usize,
    /// Bytes of linear memory now.
    linear: usize,
    /// Bytes of host memory held for the guest now.
    host: usize,
    exceeded: bool,
}

impl Account {
    fn used(&self) -> usize {
        self.linear.saturating_add(self.host)
    }
}

thread_local! {
    static ACCOUNT: RefCell<Option<Account>> = const { RefCell::new(None) };
}

/// Account ids, unique in the process (so a `Held` dropped on another thread matches nothing).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Why a charge was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("memory limit of {limit_mib} MiB exceeded ({what})")]
pub struct Exceeded {
    /// The call's limit, in MiB.
    pub limit_mib: usize,
    /// What asked for the memory.
    pub what: &'static str,
}

/// The account of one call; closing it (drop) ends the call's accounting on this thread.
///
/// It lives in the call's store, which wasmtime requires to be `Send`; used or dropped on
/// another thread it sees no account (its id is not that thread's) and changes nothing.
pub struct CallMemory {
    id: u64,
    max: usize,
    /// The linear memory counted when the account was last detached.
    linear: usize,
    /// The host memory counted when the account was last detached.
    host: usize,
}

impl CallMemory {
    /// Open the account of a call that may hold `max` bytes, on this thread.
    pub fn open(max: usize) -> CallMemory {
        let mut call = CallMemory {
            id: 0,
            max,
            linear: 0,
            host: 0,
        };
        call.attach();
        call
    }

    /// Open a new account on this thread for the store this account belongs to, counting the
    /// memory it held when it was detached: a store instantiated ahead of its request (on
    /// another thread, or before another call) is charged for its memory from the start. What
    /// was held then (tensors a component's start made) stays counted for the whole call, even
    /// if the call frees it: the new account cannot tell its release from another call's.
    pub fn attach(&mut self) {
        self.id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        ACCOUNT.with(|a| {
            *a.borrow_mut() = Some(Account {
                id: self.id,
                max: self.max,
                linear: self.linear,
                host: self.host,
                exceeded: false,
            })
        });
    }

    /// End the account on this thread, keeping the memory it counts, so that its store can be
    /// dropped later, anywhere, or attached again. Whatever was held for the call (its
    /// execution contexts) gives back nothing once detached.
    pub fn detach(&mut self) {
        if let Some((linear, host)) = self.with(|a| (a.linear, a.host)) {
            (self.linear, self.host) = (linear, host);
        }
        self.close();
    }

    fn close(&self) {
        ACCOUNT.with(|a| {
            let mut a = a.borrow_mut();
            if a.as_ref().is_some_and(|a| a.id == self.id) {
                *a = None;
            }
        });
    }

    fn with<T>(&self, f: impl FnOnce(&mut Account) -> T) -> Option<T> {
        ACCOUNT.with(|a| match a.borrow_mut().as_mut() {
            Some(account) if account.id == self.id => Some(f(account)),
            _ => None,
        })
    }

    /// Whether any charge of this call was refused.
    pub fn exceeded(&self) -> bool {
        self.with(|a| a.exceeded).unwrap_or(false)
    }

    /// Bytes the call may still take before it reaches its limit.
    pub fn room(&self) -> usize {
        self.with(|a| a.max.saturating_sub(a.used())).unwrap_or(0)
    }

    /// Bytes of host memory held for the guest now (tensors and contexts).
    pub fn host(&self) -> usize {
        self.with(|a| a.host).unwrap_or(0)
    }

    /// The instance asks to grow its linear memory to `desired` bytes.
    pub fn grow_linear(&self, desired: usize) -> Result<(), Exceeded> {
        self.with(|a| {
            if desired.saturating_add(a.host) > a.max {
                a.exceeded = true;
                return Err(Exceeded {
                    limit_mib: a.max >> 20,
                    what: "linear memory",
                });
            }
            a.linear = desired;
            Ok(())
        })
        .unwrap_or(Ok(()))
    }
}

impl Drop for CallMemory {
    fn drop(&mut self) {
        self.close();
    }
}

/// Charge `bytes` of host memory to the call in progress for the rest of the call (a tensor
/// handed to the guest). Outside a call this charges nothing.
pub fn charge_call(bytes: usize, what: &'static str) -> Result<(), Exceeded> {
    charge(current(), bytes, what)
}

fn current() -> u64 {
    ACCOUNT.with(|a| a.borrow().as_ref().map(|a| a.id).unwrap_or(0))
}

fn charge(id: u64, bytes: usize, what: &'static str) -> Result<(), Exceeded> {
    ACCOUNT.with(|a| match a.borrow_mut().as_mut() {
        Some(account) if account.id == id => {
            let host = account.host.saturating_add(bytes);
            if host.saturating_add(account.linear) > account.max {
                account.exceeded = true;
                return Err(Exceeded {
                    limit_mib: account.max >> 20,
                    what,
                });
            }
            account.host = host;
            Ok(())
        }
        _ => Ok(()),
    })
}

fn release(id: u64, bytes: usize) {
    ACCOUNT.with(|a| {
        if let Some(account) = a.borrow_mut().as_mut()
            && account.id == id
        {
            account.host = account.host.saturating_sub(bytes);
        }
    });
}

/// Host memory a backend object (an execution context) holds for the call that made it; given
/// back when the object is dropped.
#[derive(Debug)]
pub struct Held {
    account: u64,
    bytes: usize,
}

impl Held {
    /// Hold nothing yet, for the call in progress on this thread (if any).
    pub fn new() -> Held {
        Held {
            account: current(),
            bytes: 0,
        }
    }

    /// Hold `bytes` more.
    pub fn charge(&mut self, bytes: usize, what: &'static str) -> Result<(), Exceeded> {
        charge(self.account, bytes, what)?;
        self.bytes = self.bytes.saturating_add(bytes);
        Ok(())
    }

    /// Hold `bytes` fewer.
    pub fn release(&mut self, bytes: usize) {
        let bytes = bytes.min(self.bytes);
        release(self.account, bytes);
        self.bytes -= bytes;
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Default for Held {
    fn default() -> Self {
        Held::new()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        release(self.account, self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_memory_and_held_bytes_share_one_limit() {
        let call = CallMemory::open(1000);
        call.grow_linear(600).expect("charge");
        let mut held = Held::new();
        held.charge(300, "context").expect("charge");
        assert_eq!(call.room(), 100);
        let refused = held.charge(200, "context").expect_err("refused");
        assert_eq!(refused.what, "context");
        assert!(call.exceeded());
        assert_eq!(held.bytes(), 300, "a refused charge holds nothing");
        // Growing memory sees the held bytes.
        assert!(call.grow_linear(800).is_err());
        drop(held);
        assert_eq!(call.host(), 0, "a dropped context gives its bytes back");
        call.grow_linear(900).expect("charge");
        charge_call(100, "tensor").expect("charge");
        assert!(charge_call(1, "tensor").is_err());
    }

    #[test]
    fn a_held_that_outlives_its_call_leaves_the_next_call_alone() {
        let first = CallMemory::open(1000);
        let mut held = Held::new();
        held.charge(500, "context").expect("charge");
        drop(first);
        let second = CallMemory::open(1000);
        charge_call(100, "tensor").expect("charge");
        drop(held);
        assert_eq!(second.host(), 100);
        assert!(!second.exceeded());
    }

    #[test]
    fn a_detached_account_keeps_its_memory_for_the_next_thread() {
        let mut call = CallMemory::open(1000);
        call.grow_linear(500).expect("charge");
        charge_call(100, "tensor").expect("charge");
        call.detach();
        charge_call(usize::MAX, "tensor").expect("detached: nothing is charged here");
        std::thread::scope(|s| {
            s.spawn(|| {
                call.attach();
                assert_eq!(call.room(), 400, "the memory made before is counted");
                assert_eq!(call.host(), 100, "so are the tensors held before");
                assert!(charge_call(401, "tensor").is_err());
                assert!(call.exceeded());
            });
        });
        assert_eq!(
            call.room(),
            0,
            "the account lives on the thread it was attached to"
        );
    }

    #[test]
    fn outside_a_call_nothing_is_charged() {
        let mut held = Held::new();
        held.charge(usize::MAX, "context").expect("charge");
        charge_call(usize::MAX, "tensor").expect("charge");
    }
}
