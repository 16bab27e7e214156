//! Embedded servers, each on its own OS thread with its own tokio runtime.
//!
//! A server on a dedicated thread keeps serving whatever runtime the test uses: a
//! current-thread `#[tokio::test]` runtime that is blocked in a synchronous call, a
//! multi-thread runtime, or none at all between two `block_on`s of a plain `fn main`.
//! Dropping the [`ServerThread`] sends the stop signal and returns at once; the thread then
//! gives open connections a moment to finish and exits on its own.

use crate::error::{Error, Result};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::sync::oneshot;

/// How long a stopping server waits for open connections before it drops them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A running embedded server; stops when dropped.
#[derive(Debug)]
pub(crate) struct ServerThread {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerThread {
    /// Binds 127.0.0.1 on a port the OS chooses, then runs `serve` on a new thread.
    ///
    /// `setup` runs inside the new runtime (so it may spawn tasks) and gets the listener and
    /// a future that resolves when the server has to stop; it returns the server's future.
    /// This returns once `setup` has succeeded, so the server accepts connections from then on.
    pub(crate) async fn spawn<S, F>(name: &str, worker_threads: usize, setup: S) -> Result<Self>
    where
        S: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Result<F, String> + Send + 'static,
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| Error::with_source(format!("{name}: could not bind a port on 127.0.0.1"), e))?;
        let addr = listener.local_addr().map_err(|e| Error::with_source(format!("{name}: no local address"), e))?;

        let (ready_tx, ready_rx) = oneshot::channel::<Result<(), String>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread_name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-server"))
            .spawn(move || run(&thread_name, worker_threads, listener, setup, ready_tx, stop_rx))
            .map_err(|e| Error::with_source(format!("{name}: could not start the server thread"), e))?;

        match ready_rx.await {
            Ok(Ok(())) => Ok(Self { addr, stop: Some(stop_tx), thread: Some(thread) }),
            Ok(Err(message)) => Err(Error::msg(format!("{name}: the embedded server did not start: {message}"))),
            Err(_) => Err(Error::msg(format!("{name}: the embedded server thread ended before it was ready"))),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the server and waits until its thread has ended (its state is written, its port
    /// closed), as a process that exits would.
    pub(crate) async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The thread may already be gone; nothing to do then.
            let _ = stop.send(());
        }
    }
}

fn run<S, F>(
    name: &str,
    worker_threads: usize,
    listener: std::net::TcpListener,
    setup: S,
    ready: oneshot::Sender<Result<(), String>>,
    stop: oneshot::Receiver<()>,
) where
    S: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Result<F, String>,
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .thread_name(format!("{name}-worker"))
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(format!("could not build a tokio runtime: {e}")));
            return;
        }
    };

    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                let _ = ready.send(Err(format!("could not register the listener: {e}")));
                return;
            }
        };
        let (serve_stop_tx, serve_stop_rx) = oneshot::channel();
        let server = match setup(listener, serve_stop_rx) {
            Ok(server) => tokio::spawn(server),
            Err(message) => {
                let _ = ready.send(Err(message));
                return;
            }
        };
        let _ = ready.send(Ok(()));

        // Either a stop signal or the handle dropped without one: both mean stop.
        let _ = stop.await;
        let _ = serve_stop_tx.send(());
        match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
            Ok(Ok(Err(message))) => eprintln!("kinesis-testkit: embedded {name} stopped with an error: {message}"),
            Ok(Err(join_error)) if join_error.is_panic() => {
                eprintln!("kinesis-testkit: embedded {name} panicked: {join_error}")
            }
            _ => {}
        }
    });
    // Aborts whatever is left (connections that did not drain in time).
    runtime.shutdown_timeout(DRAIN_TIMEOUT);
}
