//! A plugin's stdout and stderr: captured in memory, drained after every call, with a budget
//! of bytes per call. Bytes over the budget are dropped, never refused: a write error would
//! make an innocent plugin that prints a little on every call fail once a lifetime cap filled.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    /// Bytes dropped since the last drain because the call's budget was spent.
    dropped: usize,
}

/// One captured stream. Clones share the buffer.
#[derive(Debug, Clone)]
pub struct CapturedPipe {
    budget: usize,
    buffer: Arc<Mutex<Buffer>>,
}

impl CapturedPipe {
    pub fn new(budget_per_call: usize) -> Self {
        CapturedPipe {
            budget: budget_per_call,
            buffer: Arc::default(),
        }
    }

    /// What was written since the last drain, and how many bytes were dropped; the budget
    /// starts afresh.
    pub fn drain(&self) -> (Vec<u8>, usize) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut buffer.dropped);
        (std::mem::take(&mut buffer.bytes), dropped)
    }

    fn write_bytes(&self, data: &[u8]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.budget.saturating_sub(buffer.bytes.len());
        let kept = data.len().min(room);
        buffer.bytes.extend_from_slice(&data[..kept]);
        buffer.dropped += data.len() - kept;
    }
}

impl IsTerminal for CapturedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CapturedPipe {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: what does not fit the budget is dropped, not refused.
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedPipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write_bytes(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_per_drain_and_overflow_is_counted() {
        let pipe = CapturedPipe::new(4);
        let mut stream = pipe.clone();
        stream.write(Bytes::from_static(b"abcdef")).unwrap();
        assert_eq!(pipe.drain(), (b"abcd".to_vec(), 2));
        stream.write(Bytes::from_static(b"xy")).unwrap();
        assert_eq!(pipe.drain(), (b"xy".to_vec(), 0));
    }
}
