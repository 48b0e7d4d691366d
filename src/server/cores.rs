//! `--runtime per-core`: more serving threads next to the main one, each a `current_thread`
//! runtime accepting on its own handle of the same listening socket (a duplicated descriptor,
//! not a second socket on the port: no other process can join the port, and a second broker
//! started on it still fails to bind). Whichever thread is free takes a new connection, and a
//! connection stays on the thread that accepted it, so its calls never cross threads. The
//! broker and its caches are shared; start-up's background work runs on the main runtime, work
//! a call starts on that call's thread.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// The main runtime: `current_thread` when `current`, else tokio's multi-thread scheduler with
/// its LIFO slot off.
///
/// The LIFO slot runs the task woken last before every other queued one. Under HTTP/2 that is
/// the connection's task, woken by each stream's answer, so it writes one answer per flush;
/// without the slot the ready streams answer first and one flush carries them all, as on
/// `current_thread` (measured: README, "Warm `GetAccessToken` under h2load"). The setting is in
/// tokio's unstable API, switched on by `--cfg tokio_unstable` in `.cargo/config.toml`; a build
/// without that flag keeps the slot and says so when it starts multi-thread. Either way the
/// start logs whether the flag was set.
pub fn main_runtime(current: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if current {
        tokio::runtime::Builder::new_current_thread()
    } else {
        multi_thread()
    };
    tracing::info!(
        message = "Runtime built.",
        runtime = if current {
            "current_thread"
        } else {
            "multi_thread"
        },
        tokio_unstable = cfg!(tokio_unstable)
    );
    builder.enable_all().build()
}

/// tokio's multi-thread runtime builder, with the LIFO slot off where the build allows it.
#[cfg(tokio_unstable)]
fn multi_thread() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.disable_lifo_slot();
    builder
}

/// tokio's multi-thread runtime builder, with the LIFO slot on: this build lacks the flag.
#[cfg(not(tokio_unstable))]
fn multi_thread() -> tokio::runtime::Builder {
    tracing::warn!(
        message = "Built without --cfg tokio_unstable: the multi-thread runtime keeps its LIFO slot and answers HTTP/2 streams one write each (see .cargo/config.toml)."
    );
    tokio::runtime::Builder::new_multi_thread()
}

/// Serves with `serve` on `listener` in this runtime and, when `threads` > 1, on `threads` - 1
/// extra threads sharing the socket. The returned task ends when every server has stopped: all
/// stop when `stop` resolves, or when one of them ends by itself.
pub(crate) async fn serve_on_cores<F, Fut>(
    threads: usize,
    listener: TcpListener,
    stop: oneshot::Receiver<()>,
    serve: F,
) -> Result<Serving, String>
where
    F: Fn(TcpListener, watch::Receiver<bool>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let stop_all = Arc::new(watch::channel(false).0);
    let mut extra = None;
    if threads > 1 {
        extra = Some(ExtraCores::start(threads - 1, &listener, &stop_all, serve.clone()).await?);
    }
    let others = extra
        .as_mut()
        .map(|e: &mut ExtraCores| std::mem::take(&mut e.done))
        .unwrap_or_default();
    let main = serve(listener, stop_all.subscribe());
    let task = tokio::spawn(async move {
        let mut main = std::pin::pin!(main);
        let mut ended = stop_all.subscribe();
        let mut outcome = tokio::select! {
            outcome = &mut main => outcome,
            // Told to stop, or an extra thread's server ended by itself.
            _ = stop => { let _ = stop_all.send(true); main.await }
            () = stopped_ref(&mut ended) => main.await,
        };
        // A server that ended by itself takes the others with it.
        let _ = stop_all.send(true);
        for other in others {
            match other.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => outcome = outcome.and(Err(e)),
                Err(_) => outcome = outcome.and(Err("a serving thread ended unexpectedly".into())),
            }
        }
        outcome
    });
    Ok((task, extra))
}

/// A server's task: the main listener's serving, then the extra threads' (see
/// [`serve_on_cores`]).
pub(crate) type ServerTask = JoinHandle<Result<(), String>>;

/// A server's task and its extra threads, if any.
pub(crate) type Serving = (ServerTask, Option<ExtraCores>);

/// Resolves once `stop` says so (or its sender is gone).
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    stopped_ref(&mut stop).await;
}

async fn stopped_ref(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The extra serving threads. Dropping this (or [`ExtraCores::cut`]) ends them.
pub(crate) struct ExtraCores {
    /// Each thread's serving outcome, once its server has stopped.
    pub(crate) done: Vec<oneshot::Receiver<Result<(), String>>>,
    /// Ends the threads: until then a thread whose server has stopped keeps driving what its
    /// calls left running (a refresh a vendor has answered must still reach the store), which
    /// the main runtime drains first. A server still running when this fires (the grace
    /// period ran out) is dropped, cutting its connections.
    release: watch::Sender<bool>,
    /// One per thread, dropped when its runtime has shut down.
    ended: Vec<oneshot::Receiver<()>>,
}

impl ExtraCores {
    /// Starts `count` threads, each serving with `serve` on a handle of `listener` until
    /// `stop_all` says so; returns once every thread is accepting (or the first error).
    async fn start<F, Fut>(
        count: usize,
        listener: &TcpListener,
        stop_all: &Arc<watch::Sender<bool>>,
        serve: F,
    ) -> Result<Self, String>
    where
        F: Fn(TcpListener, watch::Receiver<bool>) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + 'static,
    {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (release, released) = watch::channel(false);
        let mut cores = Self {
            done: Vec::with_capacity(count),
            release,
            ended: Vec::with_capacity(count),
        };
        for i in 1..=count {
            let (accepting_tx, accepting) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let (ended_tx, ended_rx) = oneshot::channel();
            let job = Job {
                listener: duplicate(listener).map_err(|e| format!("{addr}: {e}"))?,
                stop_all: stop_all.clone(),
                released: released.clone(),
                accepting: accepting_tx,
                done: done_tx,
                ended: ended_tx,
            };
            let serve = serve.clone();
            std::thread::Builder::new()
                .name(format!("credbroker-core-{i}"))
                .spawn(move || job.run(serve))
                .map_err(|e| format!("cannot start serving thread {i}: {e}"))?;
            cores.done.push(done_rx);
            cores.ended.push(ended_rx);
            match accepting.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(format!("serving thread {i} cannot accept on {addr}: {e}"))
                }
                Err(_) => return Err(format!("serving thread {i} ended before it accepted")),
            }
        }
        Ok(cores)
    }

    /// Ends the threads now, cutting what they still serve.
    pub(crate) fn cut(&self) {
        let _ = self.release.send(true);
    }

    /// Ends the threads and waits until their runtimes have shut down, for `within` at most.
    pub(crate) async fn finish(mut self, within: Duration) {
        self.cut();
        let ended = std::mem::take(&mut self.ended);
        let all = async {
            for e in ended {
                let _ = e.await;
            }
        };
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!(message = "A serving thread had not ended in time; stopping anyway.");
        }
    }
}

impl Drop for ExtraCores {
    fn drop(&mut self) {
        self.cut();
    }
}

/// Another handle of `listener`'s socket, for another runtime.
#[cfg(unix)]
fn duplicate(listener: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let handle = std::net::TcpListener::from(listener.as_fd().try_clone_to_owned()?);
    handle.set_nonblocking(true)?;
    Ok(handle)
}

#[cfg(not(unix))]
fn duplicate(_: &TcpListener) -> std::io::Result<std::net::TcpListener> {
    Err(std::io::Error::other(
        "--runtime per-core needs a Unix system",
    ))
}

/// One extra thread's work.
struct Job {
    listener: std::net::TcpListener,
    stop_all: Arc<watch::Sender<bool>>,
    released: watch::Receiver<bool>,
    accepting: oneshot::Sender<Result<(), String>>,
    done: oneshot::Sender<Result<(), String>>,
    /// Dropped when the thread's runtime has shut down.
    ended: oneshot::Sender<()>,
}

/// How long a released thread's runtime waits for its blocking tasks (store calls).
const BLOCKING_GRACE: Duration = Duration::from_secs(1);

impl Job {
    fn run<F, Fut>(self, serve: F)
    where
        F: Fn(TcpListener, watch::Receiver<bool>) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let Job {
            listener,
            stop_all,
            mut released,
            accepting,
            done,
            ended,
        } = self;
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = accepting.send(Err(e.to_string()));
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    let _ = accepting.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = accepting.send(Ok(()));
            let mut cut = released.clone();
            tokio::select! {
                outcome = serve(listener, stop_all.subscribe()) => {
                    // Ended by itself, or stopped: either way every server stops.
                    let _ = stop_all.send(true);
                    let _ = done.send(outcome);
                    stopped_ref(&mut released).await;
                }
                () = stopped_ref(&mut cut) => {}
            }
        });
        runtime.shutdown_timeout(BLOCKING_GRACE);
        drop(ended);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    /// The order in which a woken task and a task queued before the wake-up run, on the main
    /// multi-thread runtime with one worker.
    fn order_after_a_wake_up() -> Vec<&'static str> {
        let mut builder = super::multi_thread();
        let runtime = builder.worker_threads(1).enable_all().build().unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let seen = order.clone();
        runtime.block_on(async move {
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let woken_seen = seen.clone();
                let woken = tokio::spawn(async move {
                    let _ = rx.await;
                    woken_seen.lock().unwrap().push("woken");
                });
                // The woken task runs up to its await.
                tokio::task::yield_now().await;
                let queued_seen = seen.clone();
                let queued = tokio::spawn(async move {
                    queued_seen.lock().unwrap().push("queued");
                });
                tx.send(()).unwrap();
                (woken, queued)
            })
            .await
            .map(|(a, b)| async move { (a.await.unwrap(), b.await.unwrap()) })
            .unwrap()
            .await
        });
        let order = order.lock().unwrap().clone();
        order
    }

    #[test]
    #[allow(clippy::assertions_on_constants)]
    fn the_build_switches_tokios_unstable_api_on() {
        // Whatever tokio does with its slot in a later version, the flag must be set.
        assert!(
            cfg!(tokio_unstable),
            "built without --cfg tokio_unstable (.cargo/config.toml)"
        );
    }

    #[test]
    fn the_multi_thread_runtime_runs_queued_tasks_before_a_task_woken_later() {
        // With the LIFO slot, the task woken last would run first.
        assert_eq!(
            order_after_a_wake_up(),
            ["queued", "woken"],
            "the LIFO slot is on: was this built without --cfg tokio_unstable (.cargo/config.toml)?"
        );
    }
}
