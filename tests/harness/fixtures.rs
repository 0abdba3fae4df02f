//! Image fixtures built with QEMU's tools (backing chains with data, zero and compressed
//! clusters), together with an in-memory model of the guest-visible content they should have.

use crate::qemu;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// qcow2 header versions: v2 is `compat=0.10` (no zero clusters), v3 is `compat=1.1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qcow2Version {
    V2,
    V3,
}

/// An image format with the creation options the tests vary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2 {
        version: Qcow2Version,
        cluster_size: u64,
    },
    Qed {
        cluster_size: u64,
    },
}

impl Format {
    pub fn qcow2_v2(cluster_size: u64) -> Self {
        Format::Qcow2 {
            version: Qcow2Version::V2,
            cluster_size,
        }
    }

    pub fn qcow2_v3(cluster_size: u64) -> Self {
        Format::Qcow2 {
            version: Qcow2Version::V3,
            cluster_size,
        }
    }

    pub fn qed(cluster_size: u64) -> Self {
        Format::Qed { cluster_size }
    }

    /// The driver name qemu-img and imgstream use (`-f` argument).
    pub fn name(&self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 { .. } => "qcow2",
            Format::Qed { .. } => "qed",
        }
    }

    /// The `-o` string for `create`.
    pub fn create_options(&self) -> Option<String> {
        match self {
            Format::Raw => None,
            Format::Qcow2 {
                version,
                cluster_size,
            } => {
                let compat = match version {
                    Qcow2Version::V2 => "0.10",
                    Qcow2Version::V3 => "1.1",
                };
                Some(format!("cluster_size={cluster_size},compat={compat}"))
            }
            Format::Qed { cluster_size } => Some(format!("cluster_size={cluster_size}")),
        }
    }

    pub fn cluster_size(&self) -> Option<u64> {
        match self {
            Format::Raw => None,
            Format::Qcow2 { cluster_size, .. } | Format::Qed { cluster_size } => {
                Some(*cluster_size)
            }
        }
    }

    /// Whether the format records "reads as zero" without data (qcow2 v3 and QED).
    pub fn has_zero_clusters(&self) -> bool {
        matches!(
            self,
            Format::Qcow2 {
                version: Qcow2Version::V3,
                ..
            } | Format::Qed { .. }
        )
    }

    pub fn has_compressed_clusters(&self) -> bool {
        matches!(self, Format::Qcow2 { .. })
    }
}

/// Parses a size the way qemu-img does for the suffixes the tests use: plain bytes or k/K, M, G, T.
pub fn parse_size(size: &str) -> Result<u64> {
    let (digits, shift) = match size.chars().last() {
        Some('k' | 'K') => (&size[..size.len() - 1], 10),
        Some('M') => (&size[..size.len() - 1], 20),
        Some('G') => (&size[..size.len() - 1], 30),
        Some('T') => (&size[..size.len() - 1], 40),
        _ => (size, 0),
    };
    let n: u64 = digits
        .parse()
        .with_context(|| format!("bad size `{size}`"))?;
    Ok(n << shift)
}

/// What a guest should read from an image: one byte per guest byte.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    bytes: Vec<u8>,
}

impl Model {
    pub fn zeroed(size: u64) -> Self {
        Model {
            bytes: vec![0; size as usize],
        }
    }

    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn range(&mut self, offset: u64, len: u64) -> Result<&mut [u8]> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.len())
            .with_context(|| {
                format!(
                    "range {offset}+{len} is outside the {}-byte image",
                    self.len()
                )
            })?;
        Ok(&mut self.bytes[offset as usize..end as usize])
    }

    pub fn fill(&mut self, offset: u64, len: u64, pattern: u8) -> Result<()> {
        self.range(offset, len)?.fill(pattern);
        Ok(())
    }

    /// Records a guest write of `data` at `offset`.
    pub fn fill_from(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.range(offset, data.len() as u64)?.copy_from_slice(data);
        Ok(())
    }

    /// A new top layer of `size` bytes: reads past the backing file's end are zeroes.
    pub fn resize(&mut self, size: u64) {
        self.bytes.resize(size as usize, 0);
    }

    /// Writes the model as a raw image, for `qemu-img compare`.
    pub fn write_raw(&self, path: &Path) -> Result<()> {
        std::fs::write(path, &self.bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// Describes the first difference between the model and `actual`, or `None` if equal.
    pub fn first_difference(&self, actual: &[u8]) -> Option<String> {
        first_difference(&self.bytes, actual)
    }
}

/// Describes where two byte strings first differ, or `None` if they are equal.
pub fn first_difference(expected: &[u8], actual: &[u8]) -> Option<String> {
    if let Some(i) = expected.iter().zip(actual).position(|(a, b)| a != b) {
        return Some(format!(
            "first difference at byte {i}: expected {:#04x}, got {:#04x}",
            expected[i], actual[i]
        ));
    }
    if expected.len() != actual.len() {
        return Some(format!(
            "lengths differ: expected {} bytes, got {}",
            expected.len(),
            actual.len()
        ));
    }
    None
}

/// One image of a chain.
#[derive(Debug, Clone)]
pub struct Layer {
    pub path: PathBuf,
    pub format: Format,
    pub size: u64,
}

/// A backing chain built bottom-up in a directory; writes go to the current top layer and are
/// mirrored in the model. Overlays name their backing file relatively, as users usually do.
#[derive(Debug, Clone)]
pub struct Chain {
    dir: PathBuf,
    layers: Vec<Layer>,
    model: Model,
}

impl Chain {
    pub fn new(dir: &Path) -> Self {
        Chain {
            dir: dir.to_path_buf(),
            layers: Vec::new(),
            model: Model::default(),
        }
    }

    fn next_path(&self, format: Format) -> PathBuf {
        self.dir
            .join(format!("layer{}.{}", self.layers.len(), format.name()))
    }

    /// The bottom image, `size` like qemu-img (`"4M"`).
    pub fn base(mut self, format: Format, size: &str) -> Result<Self> {
        ensure!(self.layers.is_empty(), "base() must come first");
        let path = self.next_path(format);
        qemu::create(
            &path,
            format.name(),
            format.create_options().as_deref(),
            None,
            Some(size),
        )?;
        let size = parse_size(size)?;
        self.layers.push(Layer { path, format, size });
        self.model = Model::zeroed(size);
        Ok(self)
    }

    /// An overlay of the same virtual size as the current top.
    pub fn overlay(self, format: Format) -> Result<Self> {
        let size = self.top()?.size.to_string();
        self.overlay_sized(format, &size)
    }

    /// An overlay of `size`, which may exceed the backing file's (the rest reads as zeroes).
    pub fn overlay_sized(mut self, format: Format, size: &str) -> Result<Self> {
        let backing = self.top()?.clone();
        let backing_name = backing
            .path
            .file_name()
            .context("backing path has no file name")?
            .to_string_lossy()
            .into_owned();
        let path = self.next_path(format);
        qemu::create(
            &path,
            format.name(),
            format.create_options().as_deref(),
            Some((&backing_name, backing.format.name())),
            Some(size),
        )?;
        let size = parse_size(size)?;
        self.layers.push(Layer { path, format, size });
        self.model.resize(size);
        Ok(self)
    }

    fn io(self, command: String) -> Result<Self> {
        let top = self.top()?;
        qemu::io(&top.path, top.format.name(), &[command])?;
        Ok(self)
    }

    /// Writes `pattern` over `len` bytes at `offset` of the top layer.
    pub fn write(mut self, offset: u64, len: u64, pattern: u8) -> Result<Self> {
        self.model.fill(offset, len, pattern)?;
        self.io(format!("write -P {pattern:#x} {offset} {len}"))
    }

    /// Zeroes a range of the top layer (`write -z`): zero clusters in qcow2 v3 and QED where
    /// aligned, written zeroes elsewhere.
    pub fn write_zeroes(mut self, offset: u64, len: u64) -> Result<Self> {
        self.model.fill(offset, len, 0)?;
        self.io(format!("write -z {offset} {len}"))
    }

    /// Writes `pattern` as compressed clusters (qcow2 only; whole clusters).
    pub fn write_compressed(mut self, offset: u64, len: u64, pattern: u8) -> Result<Self> {
        let format = self.top()?.format;
        if !format.has_compressed_clusters() {
            bail!("{} has no compressed clusters", format.name());
        }
        self.model.fill(offset, len, pattern)?;
        self.io(format!("write -c -P {pattern:#x} {offset} {len}"))
    }

    pub fn top(&self) -> Result<&Layer> {
        self.layers.last().context("the chain has no image yet")
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The guest-visible content of the top layer.
    pub fn expected(&self) -> &Model {
        &self.model
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    fn qemu_reads_model(chain: &Chain) {
        let top = chain.top().unwrap();
        let model = chain.dir().join("model.raw");
        chain.expected().write_raw(&model).unwrap();
        let diff = qemu::compare(&model, "raw", &top.path, top.format.name()).unwrap();
        assert_eq!(
            diff,
            None,
            "qemu-img compare: model vs {}",
            top.path.display()
        );
    }

    #[test]
    fn size_suffixes_follow_qemu_img() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("64M").unwrap(), 64 * MIB);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn model_matches_qemu_for_qcow2_v3_chain_over_shorter_raw_base() {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::new(dir.path())
            .base(Format::Raw, "2M")
            .unwrap()
            .write(0, MIB, 0xaa)
            .unwrap()
            .overlay_sized(Format::qcow2_v3(4 * KIB), "4M")
            .unwrap()
            .write(512 * KIB + 100, 3000, 0xbb)
            .unwrap()
            .write_compressed(3 * MIB, 64 * KIB, 0xcc)
            .unwrap()
            .overlay(Format::qcow2_v3(64 * KIB))
            .unwrap()
            .write_zeroes(0, 64 * KIB)
            .unwrap();
        assert_eq!(chain.expected().len(), 4 * MIB);
        assert_eq!(chain.expected().bytes()[64 * 1024], 0xaa);
        assert_eq!(chain.expected().bytes()[0], 0);
        qemu_reads_model(&chain);
    }

    #[test]
    fn model_matches_qemu_for_qed_over_qcow2_v2() {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::new(dir.path())
            .base(Format::qcow2_v2(64 * KIB), "4M")
            .unwrap()
            .write(0, 2 * MIB, 0x11)
            .unwrap()
            .overlay(Format::qed(4 * KIB))
            .unwrap()
            .write_zeroes(MIB, 8 * KIB)
            .unwrap()
            .write(MIB + 8 * KIB, 1, 0x22)
            .unwrap();
        qemu_reads_model(&chain);
    }

    #[test]
    fn model_mismatch_is_detected_by_qemu_compare() {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::new(dir.path())
            .base(Format::qcow2_v3(64 * KIB), "1M")
            .unwrap()
            .write(4096, 512, 0x33)
            .unwrap();
        let mut wrong = chain.expected().clone();
        wrong.fill(4096, 1, 0x34).unwrap();
        let model = dir.path().join("wrong.raw");
        wrong.write_raw(&model).unwrap();
        let top = chain.top().unwrap();
        let diff = qemu::compare(&model, "raw", &top.path, "qcow2").unwrap();
        assert!(diff.is_some());
    }

    #[test]
    fn compressed_writes_are_refused_for_qed() {
        let dir = tempfile::tempdir().unwrap();
        let err = Chain::new(dir.path())
            .base(Format::qed(64 * KIB), "1M")
            .unwrap()
            .write_compressed(0, 64 * KIB, 1)
            .unwrap_err();
        assert!(err.to_string().contains("compressed"), "{err}");
    }

    #[test]
    fn qemu_map_reports_compressed_zero_and_backing_depths() {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::new(dir.path())
            .base(Format::qcow2_v3(64 * KIB), "1M")
            .unwrap()
            .write(0, 64 * KIB, 1)
            .unwrap()
            .overlay(Format::qcow2_v3(64 * KIB))
            .unwrap()
            .write_compressed(128 * KIB, 64 * KIB, 2)
            .unwrap()
            .write_zeroes(256 * KIB, 64 * KIB)
            .unwrap();
        let map = qemu::map(&chain.top().unwrap().path, None).unwrap();
        let entries = map.as_array().unwrap();
        let at = |start: u64| {
            entries
                .iter()
                .find(|e| e["start"] == start)
                .unwrap_or_else(|| panic!("no map entry at {start}: {map}"))
        };
        assert_eq!(at(0)["depth"], 1);
        assert_eq!(at(0)["data"], true);
        assert_eq!(at(128 * KIB)["compressed"], true);
        assert_eq!(at(256 * KIB)["zero"], true);
        assert_eq!(at(256 * KIB)["depth"], 0);
    }

    #[test]
    fn qemu_info_backing_chain_lists_layers_top_first() {
        let dir = tempfile::tempdir().unwrap();
        let chain = Chain::new(dir.path())
            .base(Format::Raw, "1M")
            .unwrap()
            .overlay(Format::qed(64 * KIB))
            .unwrap()
            .overlay(Format::qcow2_v2(4 * KIB))
            .unwrap();
        let info = qemu::info(&chain.top().unwrap().path, None, true).unwrap();
        let formats: Vec<_> = info
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["format"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(formats, ["qcow2", "qed", "raw"]);
        assert_eq!(info[0]["backing-filename"], "layer1.qed");
        assert_eq!(info[0]["format-specific"]["data"]["compat"], "0.10");
    }
}
