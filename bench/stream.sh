#!/usr/bin/env bash
# Full stream of a base <- mid <- top chain (64 KiB clusters; base ~50% data, mid ~10% with
# some zero clusters, top ~5%), timed three ways on fresh copies of the top, 3 runs each,
# interleaved: `imgstream stream`, `qemu-img rebase -b ''`, and qemu-storage-daemon's
# `block-stream` driven over QMP (wall = command -> BLOCK_JOB_COMPLETED, durable = + quit and
# exit). Every result is compared with the pre-stream chain. Writes a Markdown table to
# bench/results/stream-<date>.md.
#
# Usage: bench/stream.sh            (env: SIZES="2G 8G", RAW_BASE_SIZES="2G 8G", RUNS=3,
#                                    BENCH_DIR=/tmp/imgstream-bench, CARGO_TARGET_DIR)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
SIZES=${SIZES:-"2G 8G"}
RAW_BASE_SIZES=${RAW_BASE_SIZES:-"2G 8G"}
RUNS=${RUNS:-3}
BENCH_DIR=${BENCH_DIR:-/tmp/imgstream-bench}
target=${CARGO_TARGET_DIR:-$here/target}
bin=$target/release/imgstream
results=$here/bench/results
mkdir -p "$BENCH_DIR" "$results"

(cd "$here" && CARGO_TARGET_DIR=$target cargo build --release -q -p imgstream)
command -v /usr/bin/time >/dev/null || { echo "install GNU time: apt-get install -y time" >&2; exit 1; }

bytes() { numfmt --from=iec "$1"; }

# make_chain DIR SIZE BASEFMT: base.BASEFMT <- mid.qcow2 <- top.qcow2
make_chain() {
    local dir=$1 size=$2 basefmt=$3 n mib=$((1 << 20))
    n=$(($(bytes "$size") / mib))
    [ -f "$dir/done" ] && return
    rm -rf "$dir"
    mkdir -p "$dir"
    if [ "$basefmt" = raw ]; then
        qemu-img create -q -f raw "$dir/base.raw" "$size"
    else
        qemu-img create -q -f qcow2 -o cluster_size=64k "$dir/base.qcow2" "$size"
    fi
    qemu-img create -q -f qcow2 -o cluster_size=64k -b "base.$basefmt" -F "$basefmt" "$dir/mid.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size=64k -b mid.qcow2 -F qcow2 "$dir/top.qcow2"
    # base: 1 MiB of every 2 MiB; mid: 256 KiB of every 2.5 MiB plus zero clusters; top: 128 KiB
    # of every 2.5 MiB elsewhere.
    for ((i = 0; i < n; i += 2)); do echo "write -q -P 0xaa $((i * mib)) 1M"; done |
        qemu-io -f "$basefmt" "$dir/base.$basefmt" >/dev/null
    for ((k = 0; (k * 5 + 4) / 2 <= n; k++)); do
        off=$((k * 5 * mib / 2))
        echo "write -q -P 0xcc $((off + 512 * 1024)) 256k"
        if ((k % 4 == 0)); then echo "write -q -z $((off + 1536 * 1024)) 128k"; fi
    done | qemu-io -f qcow2 "$dir/mid.qcow2" >/dev/null
    for ((k = 0; (k * 5 + 4) / 2 <= n; k++)); do
        echo "write -q -P 0xdd $((k * 5 * mib / 2 + 1024 * 1024)) 128k"
    done | qemu-io -f qcow2 "$dir/top.qcow2" >/dev/null
    touch "$dir/done"
}

now() { date +%s.%N; }

# rss_kib FILE: "Maximum resident set size" from /usr/bin/time -v output
rss_kib() { awk -F': ' '/Maximum resident set size/ {print $2}' "$1"; }

qsd_stream() { # DIR BASEFMT WORKTOP -> prints "wall durable rss_kib"
    local dir=$1 basefmt=$2 top=$3 sock=$1/qmp.sock
    rm -f "$sock"
    local basedrv=$basefmt
    qemu-storage-daemon \
        --blockdev "driver=file,filename=$dir/base.$basefmt,node-name=base-file,read-only=on" \
        --blockdev "driver=$basedrv,file=base-file,node-name=base,read-only=on" \
        --blockdev "driver=file,filename=$dir/mid.qcow2,node-name=mid-file,read-only=on" \
        --blockdev "driver=qcow2,file=mid-file,node-name=mid,backing=base,read-only=on" \
        --blockdev "driver=file,filename=$top,node-name=top-file" \
        --blockdev "driver=qcow2,file=top-file,node-name=top,backing=mid" \
        --chardev "socket,id=m,path=$sock,server=on,wait=off" --monitor chardev=m >/dev/null 2>&1 &
    local pid=$!
    python3 - "$sock" "$pid" <<'EOF'
import json, os, socket, sys, time
path, pid = sys.argv[1], int(sys.argv[2])
for _ in range(500):
    try:
        s = socket.socket(socket.AF_UNIX); s.connect(path); break
    except OSError:
        time.sleep(0.01)
f = s.makefile("rw")
def recv():
    return json.loads(f.readline())
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
recv()
cmd("qmp_capabilities"); recv()
start = time.monotonic()
cmd("block-stream", **{"job-id": "s", "device": "top"})
while True:
    m = recv()
    if m.get("event") == "BLOCK_JOB_COMPLETED":
        assert "error" not in m["data"], m
        wall = time.monotonic() - start
        break
    if "error" in m:
        sys.exit(f"block-stream failed: {m}")
hwm = 0
for line in open(f"/proc/{pid}/status"):
    if line.startswith("VmHWM:"):
        hwm = int(line.split()[1])
cmd("quit")
try:
    while recv():
        pass
except Exception:
    pass
def running():
    # The process may vanish between the checks: /proc then answers ENOENT or ESRCH.
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False
while running():
    time.sleep(0.001)
print(f"{wall:.3f} {time.monotonic() - start:.3f} {hwm}")
EOF
    wait "$pid"
}

verify() { # WORKTOP DIR -> ok|FAIL
    if qemu-img info "$1" | grep -q '^backing file:'; then echo "FAIL(backing)"; return; fi
    qemu-img check -q "$1" >/dev/null 2>&1 || { echo "FAIL(check)"; return; }
    qemu-img compare -q -f qcow2 -F qcow2 "$1" "$2/top.qcow2" && echo ok || echo "FAIL(compare)"
}

stats() { # values... -> "median (min–max)"
    printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {printf "%.3f (%.3f–%.3f)", v[int((NR+1)/2)], v[1], v[NR]}'
}
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }

date_tag=$(date +%F)
out=$results/stream-$date_tag.md
{
    echo "# Full stream: imgstream vs QEMU ($(date -u '+%F %H:%M UTC'), $(nproc) cores, $(uname -r))"
    echo
    echo "Chain per bench/stream.sh (64 KiB clusters; base ~50% data, mid ~10% + zero clusters, top ~5%)."
    echo "Medians of $RUNS runs (min–max), each on a fresh copy of the top, tools interleaved."
    echo "imgstream and qemu-img: whole process (includes flush and close). QSD wall: block-stream -> BLOCK_JOB_COMPLETED;"
    echo "QSD durable: + quit until exit. RSS: /usr/bin/time -v max RSS (QSD: VmHWM)."
    echo "Ratios compare durable medians (imgstream's time always includes its final flush and close)."
    echo
    echo "| size | base | tool | wall s | durable s | peak RSS MiB | imgstream / this (durable) | verify |"
    echo "|---|---|---|---|---|---|---|---|"
} >"$out.tmp"

for size in $SIZES; do
    bases=qcow2
    for r in $RAW_BASE_SIZES; do [ "$r" = "$size" ] && bases="qcow2 raw"; done
    for basefmt in $bases; do
        dir=$BENCH_DIR/$size-$basefmt
        echo "== $size, $basefmt base: making the chain" >&2
        make_chain "$dir" "$size" "$basefmt"
        sync # the chain's own writeback must not land in the first timed run
        cat "$dir"/*.qcow2 "$dir/base.$basefmt" >/dev/null # warm the page cache for everyone
        declare -A wall=() durable=() rss=() ver=()
        for ((run = 1; run <= RUNS; run++)); do
            for tool in imgstream rebase qsd; do
                work=$dir/work-top.qcow2
                rm -f "$work"
                cp --sparse=always "$dir/top.qcow2" "$work"
                sync # nobody pays for the previous run's dirty pages
                case $tool in
                imgstream | rebase)
                    if [ $tool = imgstream ]; then cmd=("$bin" stream "$work"); else cmd=(qemu-img rebase -f qcow2 -b '' "$work"); fi
                    t0=$(now)
                    /usr/bin/time -v -o "$dir/time.txt" "${cmd[@]}" >/dev/null
                    t1=$(now)
                    w=$(echo "$t1 - $t0" | bc)
                    wall[$tool]+="$w "
                    durable[$tool]+="$w "
                    rss[$tool]+="$(rss_kib "$dir/time.txt") "
                    ;;
                qsd)
                    read -r w d h < <(qsd_stream "$dir" "$basefmt" "$work")
                    wall[$tool]+="$w "
                    durable[$tool]+="$d "
                    rss[$tool]+="$h "
                    ;;
                esac
                v=$(verify "$work" "$dir")
                ver[$tool]+="$v "
                echo "   run $run $tool: wall ${w}s verify $v" >&2
            done
        done
        # shellcheck disable=SC2086
        img_med=$(median ${durable[imgstream]})
        for tool in imgstream rebase qsd; do
            # shellcheck disable=SC2086
            med=$(median ${durable[$tool]})
            ratio=$(awk -v a="$img_med" -v b="$med" 'BEGIN {printf "%.2f", a / b}')
            # shellcheck disable=SC2086
            rss_mib=$(printf '%s\n' ${rss[$tool]} | sort -g | tail -1 | awk '{printf "%.1f", $1/1024}')
            oks=$(printf '%s\n' ${ver[$tool]} | grep -c '^ok$' || true)
            name=$tool
            [ $tool = rebase ] && name="qemu-img rebase -b ''"
            [ $tool = qsd ] && name="QSD block-stream"
            # shellcheck disable=SC2086
            echo "| $size | $basefmt | $name | $(stats ${wall[$tool]}) | $(stats ${durable[$tool]}) | $rss_mib | $ratio | $oks/$RUNS ok |" >>"$out.tmp"
        done
        unset wall durable rss ver
        rm -f "$dir/work-top.qcow2"
    done
done
mv "$out.tmp" "$out"
cat "$out"
