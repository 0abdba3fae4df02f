//! Reading and writing one refcount entry inside a refcount block, for every width qcow2
//! allows (refcount_order 0..=6: 1 to 64 bits).

/// Reads entry `index` of a refcount block of `bits`-wide entries. Sub-byte widths are packed
/// with entry 0 in the least significant bits (qcow2.txt "refcount_bits < 8").
pub fn get(block: &[u8], index: u64, bits: u32) -> u64 {
    let i = index as usize;
    match bits {
        64 => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&block[i * 8..i * 8 + 8]);
            u64::from_be_bytes(raw)
        }
        32 => u32::from_be_bytes([
            block[i * 4],
            block[i * 4 + 1],
            block[i * 4 + 2],
            block[i * 4 + 3],
        ]) as u64,
        16 => u16::from_be_bytes([block[i * 2], block[i * 2 + 1]]) as u64,
        8 => block[i] as u64,
        _ => {
            let bit = i * bits as usize;
            let mask = (1u8 << bits) - 1;
            ((block[bit / 8] >> (bit % 8)) & mask) as u64
        }
    }
}

/// Writes entry `index`; the caller has checked that `value` fits in `bits`.
pub fn set(block: &mut [u8], index: u64, bits: u32, value: u64) {
    let i = index as usize;
    match bits {
        64 => block[i * 8..i * 8 + 8].copy_from_slice(&value.to_be_bytes()),
        32 => block[i * 4..i * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        16 => block[i * 2..i * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        8 => block[i] = value as u8,
        _ => {
            let bit = i * bits as usize;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            let byte = &mut block[bit / 8];
            *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
    }
}

/// Largest refcount representable in `bits`.
pub fn max_value(bits: u32) -> u64 {
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_without_touching_neighbours() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut block = vec![0u8; 512];
            let entries = 512 * 8 / bits as u64;
            for i in 0..entries {
                set(&mut block, i, bits, (i * 7 + 1) & max_value(bits));
            }
            for i in 0..entries {
                assert_eq!(
                    get(&block, i, bits),
                    (i * 7 + 1) & max_value(bits),
                    "bits {bits} entry {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_entries_start_at_the_least_significant_bit() {
        let mut block = vec![0u8; 1];
        set(&mut block, 0, 1, 1);
        assert_eq!(block[0], 0b0000_0001);
        set(&mut block, 1, 2, 3);
        assert_eq!(block[0], 0b0000_1101);
    }
}
