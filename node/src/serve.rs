//! The node's HTTP accept loop: one task per connection, served by hyper's HTTP/1.1 connection
//! with the node's axum router, graceful shutdown, bounds on what slow or idle clients may hold
//! (a deadline for each request's head, a cap on connections), and a connection future that
//! does not reschedule itself when it wakes itself ([`PollAgain`]).
//!
//! Why not `axum::serve`: it spawns hyper's connection future as it is, and on every request
//! with a body that future wakes its own task while it runs. Hyper's body channel wakes the
//! sender (the connection) whenever the handler takes a chunk, and the handler runs inside the
//! connection's poll. Tokio answers a task that woke itself by queueing it again as a *yield* and
//! waking a parked worker to share the work: on two cores, a futex wake-up, a context switch and
//! a worker that searches, finds nothing (or steals the connection to another core) and parks
//! again, per request. [`PollAgain`] polls the connection again at once instead, which is what
//! the wake asked for.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

/// At most this many polls in one when the future keeps waking itself; then it yields to the
/// scheduler as any task would (Tokio's budget makes a busy connection do so).
const MAX_POLLS: usize = 8;

/// Not being polled: a wake goes to the task's waker.
const IDLE: u8 = 0;
/// Being polled: a wake is remembered and answered by polling again.
const POLLING: u8 = 1;
/// Being polled, and woken meanwhile.
const WOKEN: u8 = 2;

/// A future that, when it wakes itself while it is being polled, is polled again in the same
/// poll instead of asking the scheduler to queue its task again. Wakes at any other time (the
/// socket became readable, a timer fired) reach the task as usual.
pub struct PollAgain<F> {
    inner: Pin<Box<F>>,
    hook: Arc<Hook>,
    waker: Waker,
}

struct Hook {
    state: AtomicU8,
    task: parking_lot::Mutex<Waker>,
}

impl Wake for Hook {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        match self
            .state
            .compare_exchange(POLLING, WOKEN, Ordering::AcqRel, Ordering::Acquire)
        {
            // The poll under way will see WOKEN and poll again.
            Ok(_) | Err(WOKEN) => {}
            _ => self.task.lock().wake_by_ref(),
        }
    }
}

impl<F: Future> PollAgain<F> {
    /// Wrap `inner`.
    pub fn new(inner: F) -> PollAgain<F> {
        let hook = Arc::new(Hook {
            state: AtomicU8::new(IDLE),
            task: parking_lot::Mutex::new(Waker::noop().clone()),
        });
        let waker = Waker::from(hook.clone());
        PollAgain {
            inner: Box::pin(inner),
            hook,
            waker,
        }
    }
}

impl<F: Future> Future for PollAgain<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        {
            let mut task = this.hook.task.lock();
            if !task.will_wake(cx.waker()) {
                task.clone_from(cx.waker());
            }
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..MAX_POLLS {
            this.hook.state.store(POLLING, Ordering::Release);
            let polled = this.inner.as_mut().poll(&mut inner_cx);
            let woken = this
                .hook
                .state
                .compare_exchange(POLLING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_err();
            if polled.is_ready() {
                this.hook.state.store(IDLE, Ordering::Release);
                return polled;
            }
            if !woken {
                return Poll::Pending;
            }
        }
        // Still waking itself: let the scheduler run others first.
        this.hook.state.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// How many connections a node serves at once by default: half of the process's limit on open
/// files (the rest is for models, caches and the mesh), at most 10,000; 512 where the limit
/// cannot be read.
pub fn default_max_connections() -> usize {
    open_files_limit().map_or(512, |n| (n / 2).clamp(16, 10_000))
}

/// The soft limit on open files, from `/proc/self/limits`.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// What bounds the connections of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a connection may take to send a request's head (and stay idle between
    /// requests); past it the connection is closed.
    pub header_timeout: std::time::Duration,
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
}

impl From<&crate::http::HttpConfig> for Limits {
    fn from(config: &crate::http::HttpConfig) -> Limits {
        Limits {
            header_timeout: config.header_timeout,
            max_connections: config.max_connections,
        }
    }
}

/// Accept connections on `listener` and serve `app` on each until `shutdown` resolves; then stop
/// accepting, ask each connection to finish its request in flight and close, and return once all
/// have (the caller bounds that wait).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(
        limits
            .max_connections
            .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
    ));
    // Connections wait for `stop` to close (its receiver is dropped on shutdown), and hold a
    // receiver of `live` until they end.
    let (stop, stopping) = tokio::sync::watch::channel(());
    let (live, alive) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tracing::warn!(
                    "serving the limit of {} connections: new ones wait until one closes",
                    limits.max_connections
                );
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Responses go out as soon as they are written: no Nagle delay on small answers.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("could not set TCP_NODELAY: {e}");
        }
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        let alive = alive.clone();
        tokio::spawn(PollAgain::new(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let mut stopped = std::pin::pin!(stop.closed());
            loop {
                tokio::select! {
                    served = conn.as_mut() => {
                        if let Err(e) = served {
                            tracing::trace!("connection ended: {e}");
                        }
                        break;
                    }
                    () = &mut stopped => conn.as_mut().graceful_shutdown(),
                }
            }
            drop(alive);
        }));
    }
    drop(stopping);
    drop(alive);
    live.closed().await;
}

/// After a failed `accept`: errors of one connection are skipped; others (such as running out of
/// file descriptors) wait a moment before the next try, so that the loop does not spin.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!("accepting a connection failed: {e}; retrying in 1 s");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wakes that reach the task.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_future_that_wakes_itself_is_polled_again_without_waking_its_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let mut polls = 0;
        let mut fut = std::pin::pin!(PollAgain::new(std::future::poll_fn(|cx| {
            polls += 1;
            if polls < 3 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(polls)
            }
        })));
        assert_eq!(fut.as_mut().poll(&mut cx), Poll::Ready(3));
        assert_eq!(count.0.load(Ordering::SeqCst), 0, "the task was not woken");
    }

    #[test]
    fn wakes_after_the_poll_reach_the_task_and_endless_self_wakes_yield() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let stored = Arc::new(parking_lot::Mutex::new(None::<Waker>));
        let keep = stored.clone();
        let mut fut = std::pin::pin!(PollAgain::new(std::future::poll_fn(move |cx| {
            *keep.lock() = Some(cx.waker().clone());
            Poll::<()>::Pending
        })));
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        assert_eq!(count.0.load(Ordering::SeqCst), 0);
        stored.lock().take().expect("waker kept").wake();
        assert_eq!(
            count.0.load(Ordering::SeqCst),
            1,
            "a later wake reaches the task"
        );

        let spins = std::cell::Cell::new(0);
        let mut spinning = std::pin::pin!(PollAgain::new(std::future::poll_fn(|cx| {
            spins.set(spins.get() + 1);
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        })));
        assert!(spinning.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            spins.get(),
            MAX_POLLS,
            "polled again a bounded number of times"
        );
        assert_eq!(count.0.load(Ordering::SeqCst), 2, "then the task is woken");
    }
}
