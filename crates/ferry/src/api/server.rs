//! API server (axum on a tokio runtime of its own, beside the vCPU threads).
use super::handlers::*;
use super::host::Host;
use anyhow::{bail, Context, Result};
use axum::routing::{get, put};
use axum::Router;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A bound, not yet served, API socket.
pub struct Bound {
    listener: UnixListener,
    path: PathBuf,
}

/// Binds `path`. A live socket there (another VMM) is an error; a stale one is replaced.
pub fn bind(path: &Path) -> Result<Bound> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "API socket {}: the path exists and is not a socket",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!("API socket {} is in use by another process", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale API socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot bind API socket {}", path.display()))?;
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
    })
}

/// A running API server; dropping it stops serving and removes the socket.
pub struct Server {
    rt: tokio::runtime::Runtime,
    path: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Stops accepting, lets requests in flight (e.g. the shutdown that ended the VM) send
    /// their answers, bounded by a second, then removes the socket.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let wait =
                async { tokio::time::timeout(std::time::Duration::from_secs(1), task).await };
            let _ = self.rt.block_on(wait);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn spawn(bound: Bound, host: Arc<Host>) -> Result<Server> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("api")
        .enable_all()
        .build()
        .context("starting the API runtime")?;
    bound.listener.set_nonblocking(true).context("API socket")?;
    let listener = {
        let _g = rt.enter();
        tokio::net::UnixListener::from_std(bound.listener).context("API socket")?
    };
    let app = Router::new()
        .route("/vm", get(info))
        .route("/vm/pause", put(pause))
        .route("/vm/resume", put(resume))
        .route("/vm/shutdown", put(shutdown))
        .route("/vm/snapshot", put(snapshot))
        .route("/vm/seed", put(seed))
        .route("/vm/restore", put(restore))
        .route("/vm/migrate", put(super::migration::start))
        .route("/vm/migration", get(super::migration::status))
        .route("/vm/migration/cancel", put(super::migration::cancel))
        .route(
            "/vm/migration/resume-postcopy",
            put(super::migration::resume_postcopy),
        )
        .route(
            "/vm/disk/move",
            put(super::disk::start).get(super::disk::status),
        )
        .route("/vm/disk/move/cancel", put(super::disk::cancel))
        .route(
            "/vm/fence",
            get(super::fence::info).put(super::fence::renew),
        )
        .fallback(super::extract::not_found)
        .method_not_allowed_fallback(super::extract::wrong_method)
        .layer(axum::extract::DefaultBodyLimit::max(
            super::extract::MAX_BODY,
        ))
        .with_state(host);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        if let Err(e) = serve.await {
            tracing::error!("API server stopped: {e}");
        }
    });
    Ok(Server {
        rt,
        path: bound.path,
        stop: Some(stop),
        task: Some(task),
    })
}
