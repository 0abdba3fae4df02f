//! Crash modelling: an in-memory storage, a wrapper that records every write, resize, hole
//! punch and flush of any storage, and the replay that rebuilds the bytes a power loss at any
//! point would leave. The power-loss tests of every layer stand on it.

use crate::error::Result;
use crate::Storage;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// One recorded storage operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Punch(u64, u64),
    Flush,
}

impl Operation {
    /// Applies the operation to a file's bytes (a flush changes no bytes).
    pub fn apply(&self, bytes: &mut Vec<u8>) {
        match self {
            Operation::Write(offset, data) => {
                let end = *offset as usize + data.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[*offset as usize..end].copy_from_slice(data);
            }
            Operation::SetLen(len) => bytes.resize(*len as usize, 0),
            Operation::Punch(offset, len) => {
                let end = (offset + len).min(bytes.len() as u64) as usize;
                let start = (*offset as usize).min(end);
                bytes[start..end].fill(0);
            }
            Operation::Flush => {}
        }
    }
}

/// Bytes in memory behaving like a sparse file.
#[derive(Debug)]
pub struct MemoryStorage {
    bytes: Mutex<Vec<u8>>,
    path: PathBuf,
}

impl MemoryStorage {
    pub fn new(bytes: Vec<u8>, path: impl Into<PathBuf>) -> Self {
        MemoryStorage {
            bytes: Mutex::new(bytes),
            path: path.into(),
        }
    }

    /// The bytes as they are now.
    pub fn bytes(&self) -> Vec<u8> {
        lock(&self.bytes).clone()
    }
}

impl Storage for MemoryStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bytes = lock(&self.bytes);
        buf.fill(0);
        let start = (offset as usize).min(bytes.len());
        let end = (offset as usize).saturating_add(buf.len()).min(bytes.len());
        buf[..end - start].copy_from_slice(&bytes[start..end]);
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Operation::Write(offset, buf.to_vec()).apply(&mut lock(&self.bytes));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(lock(&self.bytes).len() as u64)
    }

    fn set_len(&self, len: u64) -> Result<()> {
        lock(&self.bytes).resize(len as usize, 0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        Operation::Punch(offset, len).apply(&mut lock(&self.bytes));
        Ok(true)
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Passes every call to `inner` and records each operation that changes bytes or durability.
#[derive(Debug)]
pub struct RecordingStorage {
    inner: Arc<dyn Storage>,
    operations: Mutex<Vec<Operation>>,
    before_next_flush: Mutex<Option<FlushHook>>,
}

/// What [`RecordingStorage::on_next_flush`] runs.
struct FlushHook(Box<dyn FnOnce() -> Result<()> + Send>);

impl std::fmt::Debug for FlushHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FlushHook")
    }
}

impl RecordingStorage {
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        RecordingStorage {
            inner,
            operations: Mutex::new(Vec::new()),
            before_next_flush: Mutex::new(None),
        }
    }

    /// Runs `before` when the next flush starts, on the flushing thread, before any lock of
    /// this storage is taken: a change racing that flush, or a fault. If it returns an error,
    /// that flush fails with it and records nothing.
    pub fn on_next_flush(&self, before: impl FnOnce() -> Result<()> + Send + 'static) {
        *lock(&self.before_next_flush) = Some(FlushHook(Box::new(before)));
    }

    /// An in-memory storage holding `bytes`, recorded.
    pub fn in_memory(bytes: Vec<u8>, path: impl Into<PathBuf>) -> Self {
        Self::new(Arc::new(MemoryStorage::new(bytes, path)))
    }

    /// Everything recorded so far, in order.
    pub fn operations(&self) -> Vec<Operation> {
        lock(&self.operations).clone()
    }

    /// The inner storage's bytes as they are now.
    pub fn bytes(&self) -> Result<Vec<u8>> {
        let mut bytes = vec![0u8; self.inner.len()? as usize];
        self.inner.read_at(0, &mut bytes)?;
        Ok(bytes)
    }
}

/// The bytes left by a power loss after `operations[..cut]`: everything up to the last flush
/// before `cut` is durable; of the writes after it, those `survives` picks reached the disk.
pub fn power_loss_state(
    initial: &[u8],
    operations: &[Operation],
    cut: usize,
    mut survives: impl FnMut(usize) -> bool,
) -> Vec<u8> {
    let cut = cut.min(operations.len());
    let durable = operations[..cut]
        .iter()
        .rposition(|op| *op == Operation::Flush)
        .map_or(0, |i| i + 1);
    let mut bytes = initial.to_vec();
    for op in &operations[..durable] {
        op.apply(&mut bytes);
    }
    for (index, op) in operations[durable..cut].iter().enumerate() {
        if survives(durable + index) {
            op.apply(&mut bytes);
        }
    }
    bytes
}

impl Storage for RecordingStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        // Recorded under the lock with the write, so the log order is the order of effects.
        let mut log = lock(&self.operations);
        self.inner.write_at(offset, buf)?;
        log.push(Operation::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        let hook = lock(&self.before_next_flush).take();
        if let Some(FlushHook(before)) = hook {
            before()?;
        }
        let mut log = lock(&self.operations);
        self.inner.flush()?;
        log.push(Operation::Flush);
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> Result<()> {
        let mut log = lock(&self.operations);
        self.inner.set_len(len)?;
        log.push(Operation::SetLen(len));
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<bool> {
        let mut log = lock(&self.operations);
        let done = self.inner.punch_hole(offset, len)?;
        if done {
            log.push(Operation::Punch(offset, len));
        }
        Ok(done)
    }

    fn data_or_hole(&self, offset: u64) -> Result<Option<(bool, u64)>> {
        self.inner.data_or_hole(offset)
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_loss_keeps_flushed_writes_and_chosen_later_ones() {
        let storage = RecordingStorage::in_memory(vec![0; 4], "mem");
        storage.write_at(0, &[1]).unwrap();
        storage.flush().unwrap();
        storage.write_at(1, &[2]).unwrap();
        storage.write_at(2, &[3]).unwrap();
        let ops = storage.operations();
        assert_eq!(
            power_loss_state(&[0; 4], &ops, ops.len(), |_| false),
            [1, 0, 0, 0]
        );
        assert_eq!(
            power_loss_state(&[0; 4], &ops, ops.len(), |i| i == 3),
            [1, 0, 3, 0]
        );
        assert_eq!(power_loss_state(&[0; 4], &ops, 1, |_| true), [1, 0, 0, 0]);
        assert_eq!(storage.bytes().unwrap(), [1, 2, 3, 0]);
    }

    #[test]
    fn a_hook_runs_before_the_next_flush_only_and_its_error_fails_that_flush() {
        let storage = RecordingStorage::in_memory(vec![0; 4], "mem");
        storage.on_next_flush(|| Err(crate::Error::invalid("injected")));
        assert!(storage.flush().is_err());
        assert!(
            storage.operations().is_empty(),
            "a failed flush is not recorded"
        );
        storage.flush().unwrap();
        assert_eq!(storage.operations(), [Operation::Flush]);
    }
}
