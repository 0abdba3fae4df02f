#!/usr/bin/env python3
"""Streams at once in one daemon: imgstream serve vs qemu-storage-daemon, in one run.

Each daemon serves STREAMS fresh copies of serve.py's 2 GiB chain and is told to stream all of
them at once; the time is from the first block-stream to the last BLOCK_JOB_COMPLETED. The same
with one chain, for scale. Runs are interleaved (imgstream, QSD) after one discarded round.
Every streamed image is verified as serve.py verifies (qemu-img check clean, no backing file,
the first half byte-equal to the original chain).

Usage: bench/serve_streams.py IMGSTREAM_BINARY WORKDIR OUTPUT.md
"""

import os
import shutil
import statistics
import subprocess
import sys
import time

import serve

RUNS = int(os.environ.get("BENCH_RUNS", 4))
STREAMS = int(os.environ.get("BENCH_STREAMS", 2))


def start(kind, binary, chains, work):
    """Starts a daemon whose nodes top0, top1, ... are the tops of `chains`; returns (process, Qmp)."""
    qmp, pid = os.path.join(work, "qmp.sock"), os.path.join(work, "pid")
    if kind == "imgstream":
        args = [binary, "serve", "--qmp", qmp, "--pid-file", pid]
        args += [f"top{i}={os.path.join(chain, 'top.qcow2')}" for i, chain in enumerate(chains)]
    else:
        args = ["qemu-storage-daemon"]
        for i, chain in enumerate(chains):
            args += serve.qsd_blockdev_args(chain, str(i))
        args += ["--chardev", f"socket,path={qmp},server=on,wait=off,id=m", "--monitor", "chardev=m",
                 "--pidfile", pid]
    stderr = open(os.path.join(work, "daemon.stderr"), "w")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
    for _ in range(1000):  # the pid file appears once the monitor listens
        if os.path.exists(pid):
            return proc, serve.Qmp(qmp)
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited: {open(stderr.name).read()}")
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError(f"{kind} never became ready")


def one_run(kind, binary, chain_dir, expected, streams):
    work = os.path.join(chain_dir, f"streams-{kind}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    chains = [os.path.join(work, f"chain{i}") for i in range(streams)]
    for chain in chains:
        serve.fresh_copy(chain_dir, chain)
    proc, qmp = start(kind, binary, chains, work)
    try:
        began = time.monotonic()
        for i in range(streams):
            qmp.execute("block-stream", device=f"top{i}", **{"job-id": f"s{i}"})
        for _ in range(streams):
            event = qmp.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"})
            if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
                raise RuntimeError(f"{kind}: stream failed: {event}")
        wall = time.monotonic() - began
    finally:
        try:
            qmp.execute("quit")
        except RuntimeError:
            pass  # the connection may close before the reply
        proc.wait(timeout=60)
    verdicts = {serve.verify(chain, expected, True) for chain in chains}
    shutil.rmtree(work)
    verdict = "ok" if verdicts == {"ok"} else "; ".join(sorted(verdicts))
    print(f"  {kind:9} {streams} stream(s): {wall:.3f} s, verify={verdict}", flush=True)
    return wall, verdict


def main():
    binary, workdir, output = sys.argv[1:4]
    os.makedirs(workdir, exist_ok=True)
    expected = os.path.join(workdir, "expected.raw")
    if not os.path.exists(expected):
        print(f"building the {serve.SIZE // serve.MIB} MiB chain in {workdir}", flush=True)
        expected = serve.build_chain(workdir)
    counts = (1, STREAMS)
    results = {}
    for round in range(RUNS + 1):
        for streams in counts:
            for kind in ("imgstream", "qsd"):
                outcome = one_run(kind, binary, workdir, expected, streams)
                if round > 0:  # round 0 is the discarded warm-up
                    results.setdefault((kind, streams), []).append(outcome)
    lines = [f"# Streams at once in one daemon: imgstream serve vs qemu-storage-daemon "
             f"({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"serve.py's chain ({serve.SIZE // serve.MIB} MiB); time from the first block-stream to "
             f"the last BLOCK_JOB_COMPLETED. Medians of {RUNS} runs (min-max), after one discarded "
             "round, imgstream and QSD interleaved.", "",
             "| streams | imgstream s | QSD s | imgstream / QSD (median of per-run ratios) | verify |",
             "|---|---|---|---|---|"]
    for streams in counts:
        ours = [wall for wall, _ in results[("imgstream", streams)]]
        theirs = [wall for wall, _ in results[("qsd", streams)]]
        ratios = [a / b for a, b in zip(ours, theirs)]
        verdicts = [v for kind in ("imgstream", "qsd") for _, v in results[(kind, streams)]]
        ok = sum(v == "ok" for v in verdicts)
        lines.append(f"| {streams} | {statistics.median(ours):.3f} ({min(ours):.3f}-{max(ours):.3f}) | "
                     f"{statistics.median(theirs):.3f} ({min(theirs):.3f}-{max(theirs):.3f}) | "
                     f"{statistics.median(ratios):.2f} | {ok}/{len(verdicts)} ok |")
    text = "\n".join(lines + [""])
    print(text)
    with open(output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
