//! Opening an image with its backing chain: resolving backing names, choosing formats
//! (recorded, or probed only where none is recorded), detecting loops, taking locks.

use imgstream_format::probe::probe_format;
use imgstream_format::storage::lock_image;
use imgstream_format::{
    open_format, Error, ErrorKind, FileStorage, FormatKind, ImageFormat, LockMode, Result, Storage,
};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Deepest backing chain we open; deeper chains are treated as hostile.
pub const MAX_CHAIN_DEPTH: usize = 256;

/// One image of a chain.
#[derive(Debug)]
pub struct Layer {
    pub image: Arc<dyn ImageFormat>,
    /// The path the image was opened from (backing names resolved).
    pub path: PathBuf,
    /// The backing name as the overlay recorded it (for the top: as the user gave it).
    pub recorded_name: String,
    pub format: FormatKind,
}

/// How to open a chain.
#[derive(Debug, Clone)]
pub struct ChainOptions {
    /// Open the top image read-write (the layers below are always read-only).
    pub writable: bool,
    /// Format of the top image; probed when `None`.
    pub format: Option<FormatKind>,
    /// Take no locks, like `qemu-img -U` (for inspecting an image a VM is using).
    pub force_share: bool,
    /// Open the top image alone, without its backing chain.
    pub no_backing: bool,
}

impl ChainOptions {
    pub fn read_only() -> Self {
        ChainOptions {
            writable: false,
            format: None,
            force_share: false,
            no_backing: false,
        }
    }

    pub fn writable() -> Self {
        ChainOptions {
            writable: true,
            ..Self::read_only()
        }
    }
}

/// Opens one image file: storage, lock, format.
pub fn open_layer(
    path: &Path,
    recorded_name: &str,
    format: Option<FormatKind>,
    writable: bool,
    force_share: bool,
) -> Result<Layer> {
    let storage = FileStorage::open(path, writable)?;
    let mode = match (force_share, writable) {
        (true, false) => LockMode::None,
        (_, true) => LockMode::Write,
        (false, false) => LockMode::SharedRead,
    };
    lock_image(storage.file(), path, mode)?;
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let format = match format {
        Some(format) => format,
        None => {
            let mut head = [0u8; 8];
            storage.read_at(0, &mut head)?;
            probe_format(&head)
        }
    };
    let image = open_format(format, storage, imgstream_format::OpenOptions { writable })
        .map_err(|e| e.context(format!("Could not open '{}'", path.display())))?;
    Ok(Layer {
        image,
        path: path.to_path_buf(),
        recorded_name: recorded_name.to_string(),
        format,
    })
}

/// Resolves a backing name recorded in `overlay` the way QEMU does: relative to the folder of
/// the overlay's path. Protocol names (`nbd:...`, `json:{...}`) are not files we can open.
pub fn resolve_backing(overlay: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("json:") || (name.contains("://") && !name.starts_with('/')) {
        return Err(Error::unsupported(format!(
            "Backing file '{name}' is not a local file name"
        )));
    }
    let path = Path::new(name);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let folder = overlay.parent().unwrap_or_else(|| Path::new(""));
    Ok(folder.join(path))
}

/// Opens `path` and, unless told not to, every image below it.
pub fn open_chain(path: &Path, options: &ChainOptions) -> Result<Vec<Layer>> {
    let mut layers = Vec::new();
    let mut seen = HashSet::new();
    let top = open_layer(
        path,
        &path.to_string_lossy(),
        options.format,
        options.writable,
        options.force_share,
    )?;
    seen.insert(file_identity(path)?);
    layers.push(top);
    if options.no_backing {
        return Ok(layers);
    }
    loop {
        let overlay = layers.last().ok_or_else(|| Error::invalid("Empty chain"))?;
        let Some(backing) = overlay.image.backing() else {
            break;
        };
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::invalid(format!(
                "Backing chain of '{}' is deeper than {MAX_CHAIN_DEPTH} images",
                path.display()
            )));
        }
        let backing_path = resolve_backing(&overlay.path, &backing.name)?;
        let identity = file_identity(&backing_path).map_err(|e| {
            let message = format!(
                "Could not open backing file '{}' of '{}': {e}",
                backing.name,
                overlay.path.display()
            );
            Error::new(e.kind(), message)
        })?;
        if !seen.insert(identity) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "Backing file loop: '{}' (backing of '{}') is already in the chain",
                    backing.name,
                    overlay.path.display()
                ),
            ));
        }
        // The recorded format is authoritative; probing only where none is recorded (see
        // imgstream_format::probe for why probing guest-writable data is dangerous).
        let format = backing
            .format
            .as_deref()
            .map(FormatKind::from_name)
            .transpose()?;
        let layer = open_layer(
            &backing_path,
            &backing.name,
            format,
            false,
            options.force_share,
        )
        .map_err(|e| {
            let message = format!(
                "Could not open backing file of '{}': {e}",
                overlay.path.display()
            );
            Error::new(e.kind(), message)
        })?;
        layers.push(layer);
    }
    Ok(layers)
}

fn file_identity(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("Could not open '{}'", path.display()), e))?;
    Ok((meta.dev(), meta.ino()))
}
