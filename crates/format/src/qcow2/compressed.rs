//! Decompressing qcow2 compressed clusters: raw deflate (zlib type) or zstd frames.

use super::header::CompressionType;
use crate::error::{Error, Result};
use std::io::Read;

/// Inflates `input` into exactly `cluster.len()` bytes. Trailing bytes after the compressed
/// stream (sector padding) are ignored, as QEMU does.
pub fn decompress(kind: CompressionType, input: &[u8], cluster: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => {
            // QEMU writes raw deflate streams (no zlib header, window bits -12).
            let mut inflater = flate2::Decompress::new(false);
            let status = inflater
                .decompress(input, cluster, flate2::FlushDecompress::Finish)
                .map_err(|e| Error::corrupt(format!("deflate data is corrupt: {e}")))?;
            if inflater.total_out() as usize != cluster.len() {
                return Err(Error::corrupt(format!(
                    "deflate data inflates to {} bytes instead of {} ({status:?})",
                    inflater.total_out(),
                    cluster.len()
                )));
            }
            Ok(())
        }
        CompressionType::Zstd => {
            let mut decoder = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| Error::corrupt(format!("zstd data is corrupt: {e}")))?;
            decoder
                .read_exact(cluster)
                .map_err(|e| Error::corrupt(format!("zstd data is corrupt or short: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn raw_deflate_round_trips_with_trailing_padding() {
        let original: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut encoder =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&original).unwrap();
        let mut compressed = encoder.finish().unwrap();
        compressed.extend_from_slice(&[0xee; 300]);
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &compressed, &mut out).unwrap();
        assert_eq!(out, original);
    }

    #[test]
    fn garbage_is_reported_as_corrupt_not_a_panic() {
        let mut out = vec![0u8; 4096];
        let err = decompress(CompressionType::Zlib, &[0xff; 64], &mut out).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        let err = decompress(CompressionType::Zstd, &[0xff; 64], &mut out).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
    }
}
