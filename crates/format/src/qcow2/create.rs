//! Creating an empty qcow2 image laid out as `qemu-img create` lays it out: header, refcount
//! table, refcount block(s), L1 table.

use super::header::{
    default_feature_table, CompressionType, Extension, Header, COMPAT_LAZY_REFCOUNTS,
    EXT_BACKING_FORMAT, V2_HEADER_LENGTH, V3_HEADER_LENGTH,
};
use super::refcount;
use crate::error::{Error, Result};
use crate::{CreateOptions, Storage};

const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

pub fn create(storage: &dyn Storage, options: &CreateOptions) -> Result<()> {
    let cluster_size = options.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(Error::invalid(format!(
            "Cluster size must be a power of two between 512 and 2048k, not {cluster_size}"
        )));
    }
    let version = options.qcow2_version.unwrap_or(3);
    if version != 2 && version != 3 {
        return Err(Error::invalid(format!("Invalid qcow2 version {version}")));
    }
    let refcount_bits = options.refcount_bits.unwrap_or(16);
    if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
        return Err(Error::invalid(format!(
            "Refcount width must be a power of two and may not exceed 64 bits, not {refcount_bits}"
        )));
    }
    if version == 2 && (refcount_bits != 16 || options.lazy_refcounts) {
        return Err(Error::invalid(
            "Different refcount widths and lazy refcounts need compat=1.1 or later",
        ));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let l2_entries = cluster_size / 8;
    let l1_size = options.size.div_ceil(cluster_size * l2_entries);
    let l1_clusters = (l1_size * 8).div_ceil(cluster_size);
    let refblock_entries = cluster_size * 8 / refcount_bits as u64;
    // Solve for the number of refcount blocks covering header, table, blocks and L1.
    let mut blocks = 1;
    let mut table_clusters = 1;
    loop {
        let used = 1 + table_clusters + blocks + l1_clusters;
        let needed_blocks = used.div_ceil(refblock_entries);
        let needed_table = (needed_blocks * 8).div_ceil(cluster_size);
        if needed_blocks <= blocks && needed_table <= table_clusters {
            break;
        }
        blocks = needed_blocks.max(blocks);
        table_clusters = needed_table.max(table_clusters);
    }
    let reftable_offset = cluster_size;
    let first_block = reftable_offset + table_clusters * cluster_size;
    let l1_offset = first_block + blocks * cluster_size;
    let used_clusters = 1 + table_clusters + blocks + l1_clusters;

    let mut extensions = Vec::new();
    if let Some(format) = options.backing.as_ref().and_then(|b| b.format.as_ref()) {
        extensions.push(Extension {
            kind: EXT_BACKING_FORMAT,
            data: format.as_bytes().to_vec(),
        });
    }
    if version == 3 && cluster_size > 4096 {
        extensions.push(default_feature_table());
    }
    let mut header = Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: options.size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: l1_offset,
        refcount_table_offset: reftable_offset,
        refcount_table_clusters: table_clusters as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: if options.lazy_refcounts {
            COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: refcount_bits.trailing_zeros(),
        header_length: if version == 3 {
            V3_HEADER_LENGTH as u32
        } else {
            V2_HEADER_LENGTH as u32
        },
        compression_type: CompressionType::Zlib,
        extensions,
        backing_name: options.backing.as_ref().map(|b| b.name.clone()),
    };
    let header_bytes = header.to_bytes()?;

    let mut table = vec![0u8; (table_clusters * cluster_size) as usize];
    for block in 0..blocks {
        let offset = first_block + block * cluster_size;
        table[(block * 8) as usize..(block * 8 + 8) as usize]
            .copy_from_slice(&offset.to_be_bytes());
    }
    let mut refblocks = vec![0u8; (blocks * cluster_size) as usize];
    for cluster in 0..used_clusters {
        let block = (cluster / refblock_entries) as usize * cluster_size as usize;
        refcount::set(
            &mut refblocks[block..block + cluster_size as usize],
            cluster % refblock_entries,
            refcount_bits,
            1,
        );
    }
    storage.write_at(0, &header_bytes)?;
    storage.write_at(reftable_offset, &table)?;
    storage.write_at(first_block, &refblocks)?;
    storage.set_len(used_clusters * cluster_size)?;
    storage.flush()
}
