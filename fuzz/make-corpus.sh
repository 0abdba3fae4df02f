#!/usr/bin/env bash
# Regenerates the seed corpora in fuzz/corpus/<target>/ from real images made by qemu-img and
# qemu-io: several cluster sizes, qcow2 v2 and v3, backing names with and without a format,
# written, zeroed and compressed clusters. Every seed is kept under 64 KiB: images are made
# small enough, and the header-only targets get just the first cluster (or 4 KiB).
#
# Usage: fuzz/make-corpus.sh   (needs qemu-img and qemu-io on PATH)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
corpus="$here/corpus"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Largest seed we keep (libFuzzer's default -max_len is derived from the corpus).
max_seed=65536

for target in qcow2_header qcow2_open qed_header qed_open chain_probe; do
    mkdir -p "$corpus/$target"
    # Keep inputs found by fuzzing (crash-*, named after what they found); regenerate the rest.
    find "$corpus/$target" -maxdepth 1 -type f -name 'seed-*' -delete
done

# add TARGET NAME FILE [BYTES]: copies FILE (or its first BYTES) into TARGET's corpus.
add() {
    local target=$1 name=$2 file=$3 bytes=${4:-}
    local out="$corpus/$target/seed-$name"
    if [[ -n $bytes ]]; then
        head -c "$bytes" "$file" >"$out"
    else
        cp "$file" "$out"
    fi
    local size
    size=$(stat -c %s "$out")
    if ((size > max_seed)); then
        echo "make-corpus: $out is $size bytes (> $max_seed)" >&2
        exit 1
    fi
}

qio() { qemu-io "$@" >/dev/null; }

# A raw base that the overlays below name (its content does not matter to the parsers).
qemu-img create -q -f raw "$work/base.raw" 1M

# ---- qcow2 ------------------------------------------------------------------------------------
# name, create options, virtual size, qemu-io commands
qcow2_images=(
    "v3-c512|cluster_size=512|64K|write -P 0x11 0 4k;write -z 8k 1k"
    "v3-c4k|cluster_size=4096|1M|write -P 0x22 0 8k;write -P 0x23 512k 4k;write -z 64k 8k"
    "v3-c64k-empty|cluster_size=65536|16M|"
    "v2-c4k|compat=0.10,cluster_size=4096|1M|write -P 0x33 4k 12k"
    "v2-c512|compat=0.10,cluster_size=512|32K|write -P 0x34 0 2k"
    "v3-c4k-rc1|cluster_size=4096,refcount_bits=1|256K|write -P 0x44 0 4k"
    "v3-c4k-rc64|cluster_size=4096,refcount_bits=64|256K|write -P 0x45 0 4k"
    "v3-c4k-lazy|cluster_size=4096,lazy_refcounts=on|256K|write -P 0x46 0 4k"
    "v3-c4k-backing|cluster_size=4096,backing_file=base.raw,backing_fmt=raw|1M|write -P 0x55 4k 4k;write -z 16k 4k"
    "v2-c4k-backing|compat=0.10,cluster_size=4096,backing_file=base.raw,backing_fmt=raw|1M|write -P 0x56 0 4k"
    "v3-c4k-zstd|cluster_size=4096,compression_type=zstd|256K|write -P 0x66 0 4k"
)
for spec in "${qcow2_images[@]}"; do
    IFS='|' read -r name options size commands <<<"$spec"
    img="$work/$name.qcow2"
    (cd "$work" && qemu-img create -q -f qcow2 -o "$options" "$img" "$size")
    if [[ -n $commands ]]; then
        IFS=';' read -ra cmds <<<"$commands"
        args=()
        for c in "${cmds[@]}"; do args+=(-c "$c"); done
        qio -f qcow2 "${args[@]}" "$img"
    fi
    # Whole images go to the open target only when small (64 KiB clusters make 192 KiB).
    if (($(stat -c %s "$img") <= max_seed)); then add qcow2_open "$name" "$img"; fi
    cluster=$(qemu-img info --output=json "$img" | sed -n 's/.*"cluster-size": \([0-9]*\).*/\1/p')
    add qcow2_header "$name" "$img" "$cluster"
    add chain_probe "qcow2-$name" "$img" "$((cluster < 4096 ? cluster : 4096))"
done

# Compressed clusters (zlib and zstd): written by convert -c from a patterned raw image.
for ctype in zlib zstd; do
    qemu-img create -q -f raw "$work/pattern.raw" 64K
    qio -f raw -c 'write -P 0x5a 0 16k' -c 'write -P 0xa5 32k 8k' "$work/pattern.raw"
    img="$work/compressed-$ctype.qcow2"
    qemu-img convert -q -c -f raw -O qcow2 -o "cluster_size=4096,compression_type=$ctype" \
        "$work/pattern.raw" "$img"
    add qcow2_open "compressed-$ctype" "$img"
    add qcow2_header "compressed-$ctype" "$img" 4096
done

# An image left dirty by lazy refcounts (the dirty bit set, as after a crash).
img="$work/dirty.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=4096,lazy_refcounts=on "$img" 256K
qio -f qcow2 -c 'write -P 0x77 0 8k' -c 'sigraise 9' "$img" 2>/dev/null || true
add qcow2_open "dirty-lazy" "$img"

# ---- QED --------------------------------------------------------------------------------------
qed_images=(
    "c4k-t2|cluster_size=4096,table_size=2|1M|write -P 0x11 0 8k;write -P 0x12 512k 4k"
    "c4k-t4|cluster_size=4096,table_size=4|256K|write -P 0x13 0 4k"
    # QEMU creates table_size=1 images but refuses to open them ("QED table offset is
    # invalid"): kept unwritten, as a seed near that edge.
    "c4k-t1-empty|cluster_size=4096,table_size=1|1M|"
    "c8k-t2|cluster_size=8192,table_size=2|1M|write -P 0x14 8k 8k;write -z 64k 8k"
    "c4k-backing|cluster_size=4096,table_size=2,backing_file=base.raw,backing_fmt=raw|1M|write -P 0x21 4k 4k"
    # QEMU 10 no longer creates a backing name without a format: made with one, then the
    # BACKING_FORMAT_NO_PROBE bit is cleared below so that the backing format is probed.
    "c4k-backing-probe|cluster_size=4096,table_size=2,backing_file=base.raw,backing_fmt=raw|1M|write -P 0x22 0 4k"
    "c64k-default|cluster_size=65536|16M|"
)
for spec in "${qed_images[@]}"; do
    IFS='|' read -r name options size commands <<<"$spec"
    img="$work/$name.qed"
    (cd "$work" && qemu-img create -q -f qed -o "$options" "$img" "$size")
    if [[ $name == *-probe ]]; then
        # features (qed_spec.txt, offset 16): QED_F_BACKING_FILE only.
        printf '\x01' | dd of="$img" bs=1 seek=16 conv=notrunc status=none
    fi
    if [[ -n $commands ]]; then
        IFS=';' read -ra cmds <<<"$commands"
        args=()
        for c in "${cmds[@]}"; do args+=(-c "$c"); done
        qio -f qed "${args[@]}" "$img"
    fi
    if (($(stat -c %s "$img") <= max_seed)); then add qed_open "$name" "$img"; fi
    add qed_header "$name" "$img" 4096
    add chain_probe "qed-$name" "$img" 4096
done

# ---- raw, for the prober ----------------------------------------------------------------------
add chain_probe "raw-zeroes" "$work/base.raw" 4096
printf 'QF' >"$corpus/chain_probe/seed-raw-short-magic"

for target in qcow2_header qcow2_open qed_header qed_open chain_probe; do
    echo "$target: $(find "$corpus/$target" -type f | wc -l) inputs," \
        "$(du -sk "$corpus/$target" | cut -f1) KiB"
done
