//! The orders in which QEMU looks at the members of a JSON object, which decide the error a
//! request with several faults gets: QEMU's `QDict` (qobject/qdict.c: 512 buckets by
//! `tdb_hash`, the key added last first within a bucket), which the request checks walk, and
//! GLib's `GHashTable` (glib/ghash.c, 2.74), in which QAPI's input visitor keeps the members it
//! has not read yet and names the first one left as unexpected.
//!
//! Both are plain functions of the keys, their order in the input and the order in which the
//! visitor reads the declared ones, so we compute them instead of approximating them
//! (checked against QSD 10.0.2 with GLib 2.74 on hundreds of random key sets).

use serde_json::{Map, Value};

/// The keys of a parsed JSON object in input order, with the same for each member, and for an
/// array, for each element. A `serde_json::Map` keeps its keys sorted, which loses the order
/// QEMU's QDict keeps among keys that share a bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyOrder {
    keys: Vec<(String, KeyOrder)>,
    items: Vec<KeyOrder>,
}

impl KeyOrder {
    /// The order of an array whose elements have `items`' orders.
    pub fn array(items: Vec<KeyOrder>) -> KeyOrder {
        KeyOrder {
            keys: Vec::new(),
            items,
        }
    }

    /// Appends `key` (whose value has `member`'s order) unless it is already listed.
    pub fn push(&mut self, key: String, member: KeyOrder) {
        if !self.keys.iter().any(|(k, _)| *k == key) {
            self.keys.push((key, member));
        }
    }

    /// The order inside member `key` (empty if unknown).
    pub fn member(&self, key: &str) -> KeyOrder {
        self.member_ref(key).cloned().unwrap_or_default()
    }

    fn member_ref(&self, key: &str) -> Option<&KeyOrder> {
        self.keys.iter().find(|(k, _)| k == key).map(|(_, o)| o)
    }

    /// The order inside array element `index` (empty if unknown).
    pub fn item(&self, index: usize) -> Option<&KeyOrder> {
        self.items.get(index)
    }

    /// The order inside member `key`, if known.
    pub fn member_order(&self, key: &str) -> Option<&KeyOrder> {
        self.member_ref(key)
    }

    /// The order inside member `key`, for changing it.
    pub fn member_mut(&mut self, key: &str) -> Option<&mut KeyOrder> {
        self.keys.iter_mut().find(|(k, _)| k == key).map(|(_, o)| o)
    }

    /// The keys of `map` in QDict order (see [`KeyOrder::qdict_order_of`]).
    pub fn qdict_keys<'m>(&self, map: &'m Map<String, Value>) -> Vec<&'m str> {
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        self.qdict_order_of(&keys)
    }

    /// `keys` in QDict order, taking their input order from this list, then for keys not
    /// listed (in a map not parsed from input) from their order in `keys`.
    pub fn qdict_order_of<'k>(&self, keys: &[&'k str]) -> Vec<&'k str> {
        let listed = self
            .keys
            .iter()
            .filter_map(|(key, _)| keys.iter().find(|k| **k == key.as_str()).copied());
        let unlisted = keys
            .iter()
            .copied()
            .filter(|key| !self.keys.iter().any(|(k, _)| k == key));
        let input: Vec<&str> = listed.chain(unlisted).collect();
        qdict_order(&input)
    }
}

/// `QDICT_BUCKET_MAX`.
const QDICT_BUCKETS: u32 = 512;

/// `tdb_hash()` of qobject/qdict.c.
fn tdb_hash(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &byte) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(byte) << (i * 5 % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345)
}

/// The keys of an object in the order `qdict_first()`/`qdict_next()` visit them, given the
/// order in which they appeared in the input (the order they were added to the QDict).
pub fn qdict_order<'a>(input_order: &[&'a str]) -> Vec<&'a str> {
    let mut keyed: Vec<(u32, std::cmp::Reverse<usize>, &str)> = input_order
        .iter()
        .enumerate()
        .map(|(i, key)| (tdb_hash(key) % QDICT_BUCKETS, std::cmp::Reverse(i), *key))
        .collect();
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, _, key)| key).collect()
}

/// The member QAPI's input visitor reports as `Parameter 'X' is unexpected`: the keys go into
/// a `GHashTable` in QDict order (`qdict_order`), the visitor removes each declared member it
/// reads, in `read` order, and the first key left in the table's slot order is named.
pub fn first_unexpected<'a>(qdict_order: &[&'a str], read: &[&str]) -> Option<&'a str> {
    let mut table = StrHashSet::new();
    for key in qdict_order {
        table.insert(key);
    }
    for key in read {
        table.remove(key);
    }
    table.first()
}

/// `g_str_hash()`: djb2 over signed chars.
fn str_hash(key: &str) -> u32 {
    key.as_bytes().iter().fold(5381u32, |h, &byte| {
        h.wrapping_mul(33).wrapping_add(byte as i8 as i32 as u32)
    })
}

/// GLib's primes for each table size (`prime_mod`), indexed by the size's log2.
const PRIME_MOD: [u32; 32] = [
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071,
    262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393, 67108859, 134217689,
    268435399, 536870909, 1073741789, 2147483647,
];
/// `HASH_TABLE_MIN_SHIFT`.
const MIN_SHIFT: u32 = 3;
const UNUSED: u32 = 0;
const TOMBSTONE: u32 = 1;

/// The parts of GLib's open-addressing `GHashTable` that decide where keys sit: quadratic
/// probing, tombstones, and the in-place resize with its evictions.
struct StrHashSet<'a> {
    hashes: Vec<u32>,
    keys: Vec<Option<&'a str>>,
    modulus: u32,
    mask: usize,
    nnodes: usize,
    noccupied: usize,
}

impl<'a> StrHashSet<'a> {
    fn new() -> Self {
        let mut table = StrHashSet {
            hashes: Vec::new(),
            keys: Vec::new(),
            modulus: 0,
            mask: 0,
            nnodes: 0,
            noccupied: 0,
        };
        table.set_shift(MIN_SHIFT);
        table.hashes = vec![UNUSED; table.size()];
        table.keys = vec![None; table.size()];
        table
    }

    fn size(&self) -> usize {
        self.mask + 1
    }

    fn set_shift(&mut self, shift: u32) {
        self.modulus = PRIME_MOD[shift as usize];
        self.mask = (1usize << shift) - 1;
    }

    /// `g_hash_table_set_shift_from_size()`.
    fn set_shift_from_size(&mut self, size: usize) {
        let shift = usize::BITS - size.leading_zeros();
        self.set_shift(shift.clamp(MIN_SHIFT, PRIME_MOD.len() as u32 - 1));
    }

    /// `g_hash_table_hash_to_index()`.
    fn index_of(&self, hash: u32) -> usize {
        (hash.wrapping_mul(11) % self.modulus) as usize
    }

    /// `g_hash_table_lookup_node()`: the slot holding `key`, else where it would go.
    fn lookup(&self, key: &str) -> (usize, u32) {
        let hash = str_hash(key).max(2);
        let mut index = self.index_of(hash);
        let mut step = 0;
        let mut first_tombstone = None;
        while self.hashes[index] != UNUSED {
            if self.hashes[index] == hash && self.keys[index] == Some(key) {
                return (index, hash);
            }
            if self.hashes[index] == TOMBSTONE && first_tombstone.is_none() {
                first_tombstone = Some(index);
            }
            step += 1;
            index = (index + step) & self.mask;
        }
        (first_tombstone.unwrap_or(index), hash)
    }

    fn insert(&mut self, key: &'a str) {
        let (index, hash) = self.lookup(key);
        let old = self.hashes[index];
        if old >= 2 {
            return;
        }
        self.hashes[index] = hash;
        self.keys[index] = Some(key);
        self.nnodes += 1;
        if old == UNUSED {
            self.noccupied += 1;
            self.maybe_resize();
        }
    }

    fn remove(&mut self, key: &str) {
        let (index, _) = self.lookup(key);
        if self.hashes[index] < 2 {
            return;
        }
        self.hashes[index] = TOMBSTONE;
        self.keys[index] = None;
        self.nnodes -= 1;
        self.maybe_resize();
    }

    /// `g_hash_table_maybe_resize()`.
    fn maybe_resize(&mut self) {
        let size = self.size();
        if (size > self.nnodes * 4 && size > 1 << MIN_SHIFT)
            || size <= self.noccupied + self.noccupied / 16
        {
            self.resize();
        }
    }

    /// `g_hash_table_resize()` with `resize_map()`: rehashes in place, evicting entries that
    /// sit where another belongs.
    fn resize(&mut self) {
        let old_size = self.size();
        // GLib computes `nnodes * 1.333` in floating point and truncates it.
        self.set_shift_from_size((self.nnodes as f64 * 1.333) as usize);
        let size = self.size();
        if size > old_size {
            self.hashes.resize(size, UNUSED);
            self.keys.resize(size, None);
        }
        let mut placed = vec![false; size.max(old_size)];
        for i in 0..old_size {
            let mut hash = self.hashes[i];
            if hash < 2 {
                self.hashes[i] = UNUSED;
                continue;
            }
            if placed[i] {
                continue;
            }
            self.hashes[i] = UNUSED;
            let mut key = self.keys[i].take();
            loop {
                let mut index = self.index_of(hash);
                let mut step = 0;
                while placed[index] {
                    step += 1;
                    index = (index + step) & self.mask;
                }
                placed[index] = true;
                let replaced = self.hashes[index];
                self.hashes[index] = hash;
                if replaced < 2 {
                    self.keys[index] = key;
                    break;
                }
                hash = replaced;
                key = std::mem::replace(&mut self.keys[index], key);
            }
        }
        self.hashes.truncate(size);
        self.keys.truncate(size);
        self.noccupied = self.nnodes;
    }

    /// The first key in slot order, as `g_hash_table_iter_next()` finds it.
    fn first(&self) -> Option<&'a str> {
        self.hashes
            .iter()
            .zip(&self.keys)
            .find(|(hash, _)| **hash >= 2)
            .and_then(|(_, key)| *key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qdict_walks_buckets_then_newest_first() {
        // As QSD walks them: `exec-oob`, `execute`, `arguments`, `id`.
        assert_eq!(
            qdict_order(&["execute", "arguments", "exec-oob", "id"]),
            vec!["exec-oob", "execute", "arguments", "id"]
        );
        // `a` and `rb` share a bucket: the one added last comes first (observed on QSD).
        assert_eq!(tdb_hash("a") % 512, tdb_hash("rb") % 512);
        assert_eq!(qdict_order(&["a", "rb"]), vec!["rb", "a"]);
        assert_eq!(qdict_order(&["rb", "a"]), vec!["a", "rb"]);
    }

    /// Replies of QSD 10.0.2 (GLib 2.74) to `query-version` and `block-stream` with these
    /// arguments in this order; the last cases grow the table past 8 slots and shrink it back
    /// while the declared members are read.
    #[test]
    fn unexpected_member_is_the_one_qsd_names() {
        const STREAM: &[&str] = &[
            "job-id",
            "device",
            "base",
            "base-node",
            "backing-file",
            "backing-mask-protocol",
            "bottom",
            "speed",
            "on-error",
            "filter-node-name",
            "auto-finalize",
            "auto-dismiss",
        ];
        let cases: &[(&[&str], &[&str], &str)] = &[
            (&["foo", "bar"], &[], "bar"),
            (&["bar", "foo"], &[], "bar"),
            (&["zz", "aa", "mm"], &[], "aa"),
            // Alphabetical order would name `foo`.
            (&["device", "foo", "zzz"], STREAM, "zzz"),
            (
                &[
                    "x", "device", "speed", "base", "bottom", "q", "on-error", "job-id", "r",
                ],
                STREAM,
                "r",
            ),
            (
                &[
                    "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "device", "speed",
                ],
                STREAM,
                "a4",
            ),
        ];
        for (keys, read, expected) in cases {
            let order = qdict_order(keys);
            assert_eq!(first_unexpected(&order, read), Some(*expected), "{keys:?}");
        }
    }

    #[test]
    fn nothing_left_means_nothing_unexpected() {
        let order = qdict_order(&["device", "speed"]);
        assert_eq!(first_unexpected(&order, &["device", "speed"]), None);
        assert_eq!(first_unexpected(&[], &[]), None);
    }
}
