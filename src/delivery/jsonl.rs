//! The JSONL event target: [`JsonlSink`] appends each event as one line to
//! `<data dir>/events.jsonl` (when no billing URL is set), through a
//! [`JsonlWriter`]. Every failure is transient (a full disk, a missing
//! directory): the worker retries it.
//!
//! - **Group commit**: lines that arrive together are written and fsynced
//!   once, and each append is answered only after its fsync (one fsync per
//!   event would cap delivery at the disk's fsync rate).
//! - **Rotation**: before each group commit the path is compared with the
//!   open file (device and inode); when it names another file, or nothing
//!   (renamed away by logrotate, deleted), the file is reopened (created).
//!   After the fsync the path is compared again: if it was rotated during
//!   the write, the lines went to the old file, so they are written again to
//!   the new one. An append is answered `Ok` only when its line reached the
//!   file the path names. SIGHUP also makes the writer reopen the file.
//! - **Start-up**: the file is created when the writer starts, so `tail` works
//!   before the first event.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use super::sink::{Message, Report, Sink, SinkError};

/// Events as JSON lines in a file (see the module docs).
pub struct JsonlSink {
    path: PathBuf,
    writer: JsonlWriter,
}

impl JsonlSink {
    /// Creates the file now and reopens it on SIGHUP (logrotate's postrotate).
    /// Must be called inside a Tokio runtime.
    pub fn start(path: PathBuf) -> Self {
        let writer = JsonlWriter::start(path.clone());
        writer.reopen_on_sighup();
        Self { path, writer }
    }
}

#[async_trait::async_trait]
impl Sink for JsonlSink {
    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// A file answers nothing: the report has no answer.
    async fn send(&self, message: &Message<'_>) -> Report {
        self.writer.append(message.body).await.map_err(SinkError::transient).into()
    }
}

/// A line to append, and where to say whether it is at the path.
type PendingLine = (Vec<u8>, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Lines written per group commit at most.
const BATCH: usize = 512;
/// Writes of one batch when the path keeps being rotated under it.
const TRIES: usize = 3;

/// Appends lines to a JSONL file (see the module docs).
pub struct JsonlWriter {
    lines: tokio::sync::mpsc::Sender<PendingLine>,
    reopen: Arc<AtomicBool>,
    /// Stops the SIGHUP listener when the writer goes.
    stop: tokio_util::sync::CancellationToken,
}

/// The open file and the (device, inode) it had when opened.
struct Open {
    file: tokio::fs::File,
    id: (u64, u64),
}

async fn open(path: &Path) -> std::io::Result<Open> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let file = tokio::fs::OpenOptions::new().create(true).append(true).open(path).await?;
    let meta = file.metadata().await?;
    Ok(Open { file, id: (meta.dev(), meta.ino()) })
}

/// Whether `path` still names the open file.
async fn names(path: &Path, open: &Open) -> bool {
    match tokio::fs::metadata(path).await {
        Ok(meta) => (meta.dev(), meta.ino()) == open.id,
        Err(_) => false,
    }
}

impl JsonlWriter {
    /// Creates the file (and its directory) now, then serves appends from a task.
    /// Must be called inside a Tokio runtime.
    pub fn start(path: PathBuf) -> Self {
        let (lines, rx) = tokio::sync::mpsc::channel::<PendingLine>(1024);
        let reopen = Arc::new(AtomicBool::new(false));
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            // Not fatal: every append tries again and is retried by delivery.
            tracing::warn!(path = %path.display(), error = %e, "cannot create the events file");
        }
        tokio::spawn(Self::serve(path, rx, Arc::clone(&reopen)));
        Self { lines, reopen, stop: tokio_util::sync::CancellationToken::new() }
    }

    /// Makes the writer reopen the file on SIGHUP (for `logrotate`'s postrotate).
    pub fn reopen_on_sighup(&self) {
        let reopen = Arc::clone(&self.reopen);
        let stop = self.stop.clone();
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        match hangup {
            Ok(mut hangup) => {
                tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            got = hangup.recv() => {
                                if got.is_none() { return; }
                                tracing::info!("SIGHUP: the events file will be reopened");
                                reopen.store(true, Ordering::SeqCst);
                            }
                            () = stop.cancelled() => return,
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
        }
    }

    /// Makes the next group commit reopen the file (what SIGHUP does).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::SeqCst);
    }

    async fn serve(path: PathBuf, mut rx: tokio::sync::mpsc::Receiver<PendingLine>, reopen: Arc<AtomicBool>) {
        let mut file: Option<Open> = None;
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            let mut buf = Vec::new();
            for (line, _) in &batch {
                buf.extend_from_slice(line);
            }
            let written = Self::commit(&path, &mut file, &reopen, &buf).await;
            for (_, reply) in batch {
                let _ = reply.send(written.clone());
            }
        }
    }

    /// Writes `buf` to the file the path names, reopening as needed.
    async fn commit(path: &Path, file: &mut Option<Open>, reopen: &AtomicBool, buf: &[u8]) -> Result<(), String> {
        let fail = |e: std::io::Error| format!("cannot append to {}: {e}", path.display());
        for _ in 0..TRIES {
            let stale = match file.as_ref() {
                None => true,
                Some(open) => reopen.swap(false, Ordering::SeqCst) || !names(path, open).await,
            };
            if stale {
                *file = None;
                *file = Some(open(path).await.map_err(fail)?);
            }
            let Some(open) = file.as_mut() else { continue };
            let written = async {
                open.file.write_all(buf).await?;
                open.file.sync_data().await
            }
            .await;
            if let Err(e) = written {
                *file = None; // reopen next time
                return Err(fail(e));
            }
            if names(path, open).await {
                return Ok(());
            }
            // Rotated while writing: the lines are in the old file only; write them again.
            *file = None;
        }
        Err(format!("{} kept being replaced while writing to it", path.display()))
    }
}

impl Drop for JsonlWriter {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl JsonlWriter {
    /// Appends one line (a newline is added); `Ok` once it is fsynced in the file the path names.
    pub async fn append(&self, body: &[u8]) -> Result<(), String> {
        let mut line = Vec::with_capacity(body.len() + 1);
        line.extend_from_slice(body);
        line.push(b'\n');
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.lines.send((line, reply)).await.map_err(|_| "the JSONL writer stopped".to_owned())?;
        rx.await.map_err(|_| "the JSONL writer stopped".to_owned())?
    }
}
