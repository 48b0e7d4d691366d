//! `--runtime per-core`: more serving threads next to the main one, each a `current_thread`
//! runtime with its own listening socket on the same address (`SO_REUSEPORT`, so the kernel
//! spreads new connections across them). A connection stays on the thread that accepted it, so
//! its calls never cross threads; the broker, its caches and its background work (run by the
//! main runtime) are shared.
//!
//! Only sockets of the same user can join a `SO_REUSEPORT` group on Linux, and that user can
//! read the data directory anyway.

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Listen backlog of every serving socket (what `TcpListener::bind` uses).
const BACKLOG: u32 = 1024;

/// A listening socket on `addr` that other sockets of this process may share
/// (`SO_REUSEPORT`). Needs a runtime.
pub fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Serves with `serve` on `listener` in this runtime and, when `threads` > 1, on `threads` - 1
/// extra threads with sockets of their own on its address. The returned task ends when every
/// server has stopped: all stop when `stop` resolves, or when one of them ends by itself.
pub(crate) async fn serve_on_cores<F, Fut>(
    threads: usize,
    listener: TcpListener,
    stop: oneshot::Receiver<()>,
    serve: F,
) -> Result<Serving, String>
where
    F: Fn(TcpListener, watch::Receiver<bool>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let (stop_all, stopping) = watch::channel(false);
    let mut extra = None;
    if threads > 1 {
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        extra = Some(ExtraCores::start(threads - 1, addr, &stopping, serve.clone()).await?);
    }
    let others = extra
        .as_mut()
        .map(|e: &mut ExtraCores| std::mem::take(&mut e.done))
        .unwrap_or_default();
    let main = serve(listener, stopping);
    let task = tokio::spawn(async move {
        let mut main = std::pin::pin!(main);
        let mut outcome = tokio::select! {
            outcome = &mut main => outcome,
            _ = stop => {
                let _ = stop_all.send(true);
                main.await
            }
        };
        // A server that ended by itself takes the others with it.
        let _ = stop_all.send(true);
        for other in others {
            if let Ok(Err(e)) = other.await {
                outcome = outcome.and(Err(e));
            }
        }
        outcome
    });
    Ok((task, extra))
}

/// A server's task (see [`serve_on_cores`]) and its extra threads, if any.
pub(crate) type Serving = (JoinHandle<Result<(), String>>, Option<ExtraCores>);

/// Resolves once `stop` says so (or its sender is gone).
pub(crate) async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The extra serving threads. Dropping this lets their runtimes end.
pub(crate) struct ExtraCores {
    /// Each thread's serving outcome, once its server has stopped.
    pub(crate) done: Vec<oneshot::Receiver<Result<(), String>>>,
    /// Lets the threads' runtimes end: until then they drive what their calls left running
    /// (a refresh a vendor has answered must still reach the store), which the main runtime
    /// drains before it releases them.
    release: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ExtraCores {
    /// Starts `count` threads, each serving with `serve` on its own socket bound to `addr`
    /// until `stop`; returns once every socket is bound (or the first error).
    pub(crate) async fn start<F, Fut>(
        count: usize,
        addr: SocketAddr,
        stop: &watch::Receiver<bool>,
        serve: F,
    ) -> Result<Self, String>
    where
        F: Fn(TcpListener, watch::Receiver<bool>) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<(), String>> + 'static,
    {
        let (release, released) = watch::channel(false);
        let mut cores = Self {
            done: Vec::with_capacity(count),
            release,
            threads: Vec::with_capacity(count),
        };
        for i in 1..=count {
            let (bound_tx, bound_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            let job = Job {
                addr,
                stop: stop.clone(),
                released: released.clone(),
                bound: bound_tx,
                done: done_tx,
            };
            let serve = serve.clone();
            let thread = std::thread::Builder::new()
                .name(format!("credbroker-core-{i}"))
                .spawn(move || job.run(serve))
                .map_err(|e| format!("cannot start serving thread {i}: {e}"))?;
            cores.threads.push(thread);
            cores.done.push(done_rx);
            match bound_rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(format!("serving thread {i} cannot listen on {addr}: {e}"))
                }
                Err(_) => return Err(format!("serving thread {i} ended before it listened")),
            }
        }
        Ok(cores)
    }

    /// Lets the threads' runtimes end and waits (a few seconds at most) until they have.
    pub(crate) async fn finish(mut self) {
        let _ = self.release.send(true);
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        if tokio::time::timeout(std::time::Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            tracing::warn!(message = "A serving thread did not end within 5 s; stopping anyway.");
        }
    }
}

impl Drop for ExtraCores {
    fn drop(&mut self) {
        let _ = self.release.send(true);
    }
}

/// One extra thread's work.
struct Job {
    addr: SocketAddr,
    stop: watch::Receiver<bool>,
    released: watch::Receiver<bool>,
    bound: oneshot::Sender<Result<(), String>>,
    done: oneshot::Sender<Result<(), String>>,
}

impl Job {
    fn run<F, Fut>(self, serve: F)
    where
        F: Fn(TcpListener, watch::Receiver<bool>) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = self.bound.send(Err(e.to_string()));
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match bind_shared(self.addr) {
                Ok(l) => l,
                Err(e) => {
                    let _ = self.bound.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = self.bound.send(Ok(()));
            let outcome = serve(listener, self.stop).await;
            let _ = self.done.send(outcome);
            stopped(self.released).await;
        });
    }
}
