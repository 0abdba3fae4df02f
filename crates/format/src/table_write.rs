//! A copy of one metadata table, taken under a driver's metadata lock for a write-back plan
//! that writes it without the lock.

/// The bytes of one table to write at `offset`, and the edit number of the cached table they
/// copy: the write-back marks that table clean only if no change came after the copy.
#[derive(Debug)]
pub struct TableWrite {
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub edit: u64,
}
