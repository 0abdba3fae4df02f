//! Guest I/O on a chain: reads fall through to lower layers, writes allocate with
//! copy-on-write of partial clusters, zeroes become zero clusters where the format can.

use crate::chain::Layer;
use crate::{Disk, Error, Result};
use imgstream_format::{Extent, ImageFormat, Mapping, Writeback};
use std::sync::atomic::Ordering;
use std::sync::{Arc, TryLockError};

/// Largest guest range one allocation covers; bounds the bounce buffer of a write.
const MAX_ALLOCATION_BYTES: u64 = 4 << 20;
/// Size of the zero buffer used where zeroes have to be written as data.
const ZERO_CHUNK: u64 = 1 << 20;

/// What zeroing does where metadata alone cannot make a range read as zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZeroFallback {
    /// Writes the zeroes as data.
    WriteData,
    /// Fails, having changed nothing.
    Refuse,
}

/// How [`read_through_with`] gets bytes from the layers' files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// Whatever it takes.
    Wait,
    /// Only what needs no waiting: mappings from free metadata locks and cached tables, bytes
    /// already in memory. Anything else (or a compressed cluster) gives up.
    CachedOnly,
}

impl Fetch {
    /// The layer's mapping from `offset`, or `None` where this fetch gives up.
    fn map(self, image: &dyn ImageFormat, offset: u64, max: u64) -> Result<Option<Extent>> {
        match self {
            Fetch::Wait => image.map(offset, max).map(Some),
            Fetch::CachedOnly => image.map_if_free(offset, max),
        }
    }
}

/// Reads guest bytes at `offset` as layer `depth` and those below see them.
pub(crate) fn read_through(
    layers: &[Arc<Layer>],
    depth: usize,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    read_through_with(layers, depth, offset, buf, Fetch::Wait).map(drop)
}

/// [`read_through`], which with [`Fetch::CachedOnly`] returns `false` as soon as a piece is
/// not in memory (then `buf` holds nothing useful).
fn read_through_with(
    layers: &[Arc<Layer>],
    depth: usize,
    offset: u64,
    buf: &mut [u8],
    fetch: Fetch,
) -> Result<bool> {
    let Some(layer) = layers.get(depth) else {
        buf.fill(0);
        return Ok(true);
    };
    let image = &layer.image;
    let size = image.virtual_size();
    let mut done = 0usize;
    while done < buf.len() {
        let pos = offset + done as u64;
        let rest = buf.len() - done;
        if pos >= size {
            // A backing image shorter than its overlay reads as zeroes past its end.
            buf[done..].fill(0);
            break;
        }
        let Some(extent) = fetch.map(image.as_ref(), pos, rest as u64)? else {
            return Ok(false);
        };
        let n = (extent.length as usize).min(rest);
        let piece = &mut buf[done..done + n];
        match extent.mapping {
            Mapping::Data { host_offset, .. } if fetch == Fetch::CachedOnly => {
                if !image.storage().read_cached(host_offset, piece)? {
                    return Ok(false);
                }
            }
            Mapping::Data { host_offset, .. } => image.storage().read_at(host_offset, piece)?,
            Mapping::Zero { .. } => piece.fill(0),
            Mapping::Compressed { .. } if fetch == Fetch::CachedOnly => return Ok(false),
            Mapping::Compressed { descriptor } => {
                let cluster_size = image.cluster_size();
                let mut cluster = vec![0u8; cluster_size as usize];
                image.read_compressed(descriptor, &mut cluster)?;
                let within = (pos % cluster_size) as usize;
                piece.copy_from_slice(&cluster[within..within + n]);
            }
            Mapping::Unallocated => {
                if !read_through_with(layers, depth + 1, pos, piece, fetch)? {
                    return Ok(false);
                }
            }
        }
        done += n;
    }
    Ok(true)
}

impl Disk {
    /// Reads guest bytes. While a stream job runs, ranges the top does not define yet are
    /// copied up first (copy-on-read), so what the guest touches is pulled early.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let layers = self.read_layers();
        let first = self.align_down(offset);
        let last = self.align_up(offset + buf.len() as u64);
        let limit = self.copy_on_read_limit.load(Ordering::SeqCst);
        if limit > 1 && self.writable && !self.top_defines(&layers, offset, buf.len() as u64)? {
            let _guard = self.locks.exclusive(first, last);
            self.populate_locked(&layers, first, last.min(self.align_up(self.size)), limit)?;
            return read_through(&layers, 0, offset, buf);
        }
        let _guard = self.locks.shared(first, last);
        read_through(&layers, 0, offset, buf)
    }

    /// [`Disk::read`] if that needs no waiting: nothing to copy up, no write to the range under
    /// way, the chain not being changed, every layer's metadata lock free and the tables
    /// needed cached ([`ImageFormat::map_if_free`]), and every byte in memory (page cache).
    /// `false`: nothing useful was read, call [`Disk::read`]. A server's event loop answers
    /// most guest reads this way without handing them to a thread.
    pub fn read_if_cached(&self, offset: u64, buf: &mut [u8]) -> Result<bool> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(true);
        }
        let layers = match self.layers.try_read() {
            Ok(layers) => layers,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        let limit = self.copy_on_read_limit.load(Ordering::SeqCst);
        if limit > 1
            && self.writable
            && self.top_defines_with(&layers, offset, buf.len() as u64, Fetch::CachedOnly)?
                != Some(true)
        {
            return Ok(false);
        }
        let (first, last) = (
            self.align_down(offset),
            self.align_up(offset + buf.len() as u64),
        );
        let Some(_guard) = self.locks.try_shared(first, last) else {
            return Ok(false);
        };
        read_through_with(&layers, 0, offset, buf, Fetch::CachedOnly)
    }

    /// Whether the top defines all of `[offset, offset + length)`: then a read has nothing to
    /// copy up and need not serialise against anything (QEMU's COR filter checks the same).
    /// A range the top defines stays defined, so the answer cannot go stale.
    fn top_defines(&self, layers: &[Arc<Layer>], offset: u64, length: u64) -> Result<bool> {
        self.top_defines_with(layers, offset, length, Fetch::Wait)
            .map(|defines| defines == Some(true))
    }

    /// [`Disk::top_defines`], `None` where `fetch` gives up.
    fn top_defines_with(
        &self,
        layers: &[Arc<Layer>],
        offset: u64,
        length: u64,
        fetch: Fetch,
    ) -> Result<Option<bool>> {
        let image = &top_of(layers)?.image;
        let end = offset + length;
        let mut pos = offset;
        while pos < end {
            let Some(extent) = fetch.map(image.as_ref(), pos, end - pos)? else {
                return Ok(None);
            };
            if !extent.mapping.is_allocated() {
                return Ok(Some(false));
            }
            pos += extent.length;
        }
        Ok(Some(true))
    }

    /// Writes guest bytes; with `fua`, they are durable when this returns.
    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let _change = self.change_begins();
        let layers = self.read_layers();
        let top = top_of(&layers)?;
        if top.image.in_place() {
            top.image.storage().write_at(offset, data)?;
        } else {
            let _guard = self.locks.exclusive(
                self.align_down(offset),
                self.align_up(offset + data.len() as u64),
            );
            self.write_locked(&layers, offset, data)?;
        }
        if fua {
            top.image.flush()?;
        }
        Ok(())
    }

    /// The write path once the clusters of the request are locked exclusively.
    pub(crate) fn write_locked(
        &self,
        layers: &[Arc<Layer>],
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let image = &top_of(layers)?.image;
        let cs = self.cluster_size;
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            let extent = image.map(pos, end - pos)?;
            let n = extent.length.min(end - pos);
            if let Mapping::Data {
                host_offset,
                in_place: true,
            } = extent.mapping
            {
                let from = (pos - offset) as usize;
                image
                    .storage()
                    .write_at(host_offset, &data[from..from + n as usize])?;
                pos += n;
                continue;
            }
            // Allocate fresh clusters, fill the parts the request does not cover with what the
            // guest saw there before, then point the clusters at them: data before metadata.
            let first = self.align_down(pos);
            let last = self
                .align_up(pos + n)
                .min(first + MAX_ALLOCATION_BYTES.max(cs));
            let piece_end = last.min(end);
            let count = (last - first) / cs;
            let mut buffer = vec![0u8; (last - first) as usize];
            if pos > first {
                read_through(layers, 0, first, &mut buffer[..(pos - first) as usize])?;
            }
            if piece_end < last {
                read_through(
                    layers,
                    0,
                    piece_end,
                    &mut buffer[(piece_end - first) as usize..],
                )?;
            }
            buffer[(pos - first) as usize..(piece_end - first) as usize]
                .copy_from_slice(&data[(pos - offset) as usize..(piece_end - offset) as usize]);
            let host = image.allocate_clusters(count)?;
            write_allocated(image.as_ref(), host, count, &buffer)?;
            image.map_clusters(first, host, count)?;
            pos = piece_end;
        }
        Ok(())
    }

    /// Makes guest bytes read as zeroes: whole clusters become zero clusters where the format
    /// can record them (releasing their space), partial clusters are written.
    pub fn write_zeroes(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        self.zero_range(offset, length, fua, ZeroFallback::WriteData)
    }

    /// [`Disk::write_zeroes`] only if no zeroes need writing as data (QEMU's
    /// `BDRV_REQ_NO_FALLBACK`, NBD's `FAST_ZERO`): partial clusters at either end must read as
    /// zeroes already, and whole clusters must become zeroes by metadata alone (zero clusters,
    /// unallocated clusters over no backing image, holes in a raw file). Otherwise fails with
    /// an unsupported error (`ENOTSUP`) and changes nothing, so that the caller can choose to
    /// write the zeroes itself.
    pub fn write_zeroes_without_fallback(&self, offset: u64, length: u64, fua: bool) -> Result<()> {
        self.zero_range(offset, length, fua, ZeroFallback::Refuse)
    }

    fn zero_range(
        &self,
        offset: u64,
        length: u64,
        fua: bool,
        fallback: ZeroFallback,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, length)?;
        if length == 0 {
            return Ok(());
        }
        let _change = self.change_begins();
        let layers = self.read_layers();
        let top = top_of(&layers)?;
        let end = offset + length;
        let _guard = self
            .locks
            .exclusive(self.align_down(offset), self.align_up(end));
        // Whole clusters in the middle; the partial clusters at either end are written. The
        // last cluster of an image whose size it does not fill is whole from `end` = size on
        // (not so in a raw file, whose end is the disk's).
        let whole_start = self.align_up(offset);
        let whole_end = if end == self.size && !top.image.in_place() {
            self.align_up(end)
        } else {
            self.align_down(end)
        }
        .max(whole_start);
        let head = (whole_start > offset).then(|| (offset, whole_start.min(end)));
        let tail = (end > whole_end).then_some((whole_end, end));
        match fallback {
            ZeroFallback::WriteData => {
                for (start, end) in head.into_iter().chain(tail) {
                    self.write_zero_data(&layers, start, end)?;
                }
                if whole_end > whole_start {
                    self.zero_whole_clusters(&layers, whole_start, whole_end)?;
                }
            }
            ZeroFallback::Refuse => {
                for (start, end) in head.into_iter().chain(tail) {
                    if !self.reads_as_zeroes(&layers, start, end)? {
                        return Err(Error::unsupported(format!(
                            "Zeroing {start}..{end} would write zeroes into a cluster with data"
                        )));
                    }
                }
                if whole_end > whole_start {
                    self.zero_whole_clusters_by_metadata(&layers, whole_start, whole_end)?;
                }
            }
        }
        if fua {
            top.image.flush()?;
        }
        Ok(())
    }

    /// Whether guest bytes `[start, end)` (within one cluster) read as zeroes now.
    fn reads_as_zeroes(&self, layers: &[Arc<Layer>], start: u64, end: u64) -> Result<bool> {
        let mut bytes = vec![0u8; (end - start) as usize];
        read_through(layers, 0, start, &mut bytes)?;
        Ok(bytes.iter().all(|&b| b == 0))
    }

    /// Makes whole clusters `[start, end)` read as zeroes without writing any data, or fails
    /// with an unsupported error having changed nothing.
    fn zero_whole_clusters_by_metadata(
        &self,
        layers: &[Arc<Layer>],
        start: u64,
        end: u64,
    ) -> Result<()> {
        let image = &top_of(layers)?.image;
        let refused = |why: &str| {
            Err(Error::unsupported(format!(
                "Zeroing {start}..{end} would write zeroes: {why}"
            )))
        };
        if image.in_place() {
            // Raw: a hole in the file reads as zeroes.
            return if image.storage().punch_hole(start, end - start)? {
                Ok(())
            } else {
                refused("the file system cannot punch holes")
            };
        }
        if !image.releases_clusters() {
            // QED zeroes allocated clusters in place; only the others become zero clusters.
            let mut pos = start;
            while pos < end {
                let extent = image.map(pos, end - pos)?;
                if matches!(
                    extent.mapping,
                    Mapping::Data { .. } | Mapping::Compressed { .. }
                ) {
                    return refused("the format cannot release a cluster with data");
                }
                pos += extent.length.max(1);
            }
            return self.zero_without_release(layers, start, end);
        }
        if self.release_as_zeroes(layers, start, end)? {
            return Ok(());
        }
        refused("the format has no zero clusters and a backing image shows through")
    }

    /// Makes whole clusters `[start, end)` read as zeroes by releasing their space, on a format
    /// that can: as zero clusters, or unallocated where nothing shows through. Returns false,
    /// having changed nothing, where neither can be done.
    fn release_as_zeroes(&self, layers: &[Arc<Layer>], start: u64, end: u64) -> Result<bool> {
        let image = &top_of(layers)?.image;
        let count = (end - start) / self.cluster_size;
        if image.zero_clusters(start, count)? {
            return Ok(true);
        }
        if self.unallocated_reads_zero(layers) {
            // Without a backing image, unallocated clusters read as zeroes.
            image.unmap_clusters(start, count)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Makes whole clusters `[start, end)` read as zeroes, as cheaply as the format allows.
    fn zero_whole_clusters(&self, layers: &[Arc<Layer>], start: u64, end: u64) -> Result<()> {
        let image = &top_of(layers)?.image;
        if !image.releases_clusters() {
            return self.zero_without_release(layers, start, end);
        }
        if self.release_as_zeroes(layers, start, end)? {
            return Ok(());
        }
        self.write_zero_data(layers, start, end)
    }

    /// Whole clusters on a format that cannot release space: allocated clusters get zeroes
    /// written in place (as QEMU's QED driver does), the others become zero clusters.
    fn zero_without_release(&self, layers: &[Arc<Layer>], start: u64, end: u64) -> Result<()> {
        let image = &top_of(layers)?.image;
        let mut pos = start;
        while pos < end {
            let extent = image.map(pos, end - pos)?;
            let run_end = self.align_up(pos + extent.length).min(end);
            match extent.mapping {
                Mapping::Data { .. } | Mapping::Compressed { .. } => {
                    self.write_zero_data(layers, pos, run_end)?
                }
                _ => {
                    image.zero_clusters(pos, (run_end - pos) / self.cluster_size)?;
                }
            }
            pos = run_end;
        }
        Ok(())
    }

    fn write_zero_data(&self, layers: &[Arc<Layer>], start: u64, end: u64) -> Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(end - start) as usize];
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(ZERO_CHUNK);
            let top = top_of(layers)?;
            if top.image.in_place() {
                top.image.storage().write_at(pos, &zeroes[..n as usize])?;
            } else {
                self.write_locked(layers, pos, &zeroes[..n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Discards whole clusters: afterwards they read as zeroes (zero clusters, or unallocated
    /// without a backing image, or a hole in a raw file). Partial clusters, and qcow2 v2
    /// clusters over a backing image, are left as they are: discard is advisory.
    pub fn discard(&self, offset: u64, length: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, length)?;
        let layers = self.read_layers();
        let top = top_of(&layers)?;
        if !top.image.releases_clusters() {
            // Discarding could only leak space; discard is advisory, so do nothing.
            return Ok(());
        }
        let start = self.align_up(offset);
        let end = if offset + length == self.size {
            self.align_up(self.size)
        } else {
            self.align_down(offset + length)
        };
        if end <= start {
            return Ok(());
        }
        let _guard = self.locks.exclusive(start, end);
        let _change = self.change_begins();
        let count = (end - start) / self.cluster_size;
        if !top.image.zero_clusters(start, count)? && self.unallocated_reads_zero(&layers) {
            top.image.unmap_clusters(start, count)?;
        }
        Ok(())
    }

    /// Writes back `[offset, offset + len)` of the top's file (see
    /// [`Storage::write_back`](imgstream_format::Storage::write_back)).
    pub fn write_back(&self, offset: u64, len: u64, step: Writeback) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let layers = self.read_layers();
        top_of(&layers)?
            .image
            .storage()
            .write_back(offset, len, step)
    }

    /// Reserves `[offset, offset + len)` of the top's file for writes to come (see
    /// [`Storage::reserve`](imgstream_format::Storage::reserve)); returns whether it did.
    pub fn reserve_top(&self, offset: u64, len: u64) -> Result<bool> {
        if !self.writable {
            return Ok(false);
        }
        let layers = self.read_layers();
        top_of(&layers)?.image.storage().reserve(offset, len)
    }

    /// The length of the top's file: where its next new clusters go.
    pub fn top_file_len(&self) -> Result<u64> {
        let layers = self.read_layers();
        top_of(&layers)?.image.storage().len()
    }

    /// Makes every completed write durable.
    ///
    /// A flush that no change has ended since the last successful flush began, and that has no
    /// header change to write, has nothing to make durable and returns at once, as QEMU's
    /// `bdrv_co_flush` does when its `flushed_gen` equals its `write_gen`. Guests send such
    /// flushes often: fio --fsync=8 with 16 requests in flight sent 1.4 flushes per write, and
    /// QSD synced its file for one in four. Syncing for each, our flush p99 was 1.5x QSD's;
    /// with this, 1.25x (bench/results/serve-2026-11-27-flushes.md).
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _counted = self.flush_begins();
        let mut flushed_changes = self.lock_flushed_changes();
        // Read once the flushes before this one have ended: a change that ends later may or
        // may not be made durable by this flush, so it is not counted as flushed.
        let changes = self.changes_ended.load(Ordering::SeqCst);
        if *flushed_changes == Some(changes) && !self.header_change_scheduled() {
            return Ok(());
        }
        let layers = self.read_layers();
        let top = top_of(&layers)?;
        let flushed = top.image.flush();
        if flushed.is_ok() {
            *flushed_changes = Some(changes);
        }
        // Only now: the header may stop naming the old chain once what replaced it is durable.
        self.settle_header_change(top, &flushed)?;
        flushed
    }
}

/// Writes data into freshly allocated clusters; if the write fails, they are handed back
/// (nothing maps them yet), so an I/O error or ENOSPC does not leak them.
pub(crate) fn write_allocated(
    image: &dyn imgstream_format::ImageFormat,
    host: u64,
    count: u64,
    data: &[u8],
) -> Result<()> {
    if let Err(error) = image.storage().write_at(host, data) {
        if let Err(release_error) = image.release_clusters(host, count) {
            tracing::warn!("could not release clusters after a failed write: {release_error}");
        }
        return Err(error);
    }
    Ok(())
}

pub(crate) fn top_of(layers: &[Arc<Layer>]) -> Result<&Arc<Layer>> {
    layers
        .first()
        .ok_or_else(|| Error::invalid("Disk has no layers"))
}
