#!/usr/bin/env python3
"""The guest's tail latency during a stream, request by request: bench/serve.py's stream+fio
phase with fio's per-request latency log, for several daemons or builds interleaved.

usage: serve_tail.py CHAIN_DIR RUNS DAEMON...
  DAEMON is `qsd`, or `imgstream:BINARY` optionally followed by `:VAR=VALUE;VAR=VALUE`
  (environment for that daemon, for A/B runs of an experimental knob).
CHAIN_DIR holds the chain bench/serve.py builds (built there if missing).

For each run it prints the stream's time, the p99, p99.9 and maximum latency over all guest
requests, and, per 100 ms of the run, requests / requests over 1.5 ms / the slowest (ms):
where in the stream the slow requests fall.
"""
import glob
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve  # noqa: E402


def parse_daemon(spec):
    if spec == "qsd":
        return "qsd", "", {}
    parts = spec.split(":", 2)
    if parts[0] != "imgstream" or len(parts) < 2:
        raise SystemExit(f"bad daemon {spec!r}: qsd or imgstream:BINARY[:VAR=VALUE;...]")
    env = dict(kv.split("=", 1) for kv in parts[2].split(";")) if len(parts) == 3 else {}
    return "imgstream", parts[1], env


def one(kind, binary, env, chain, run):
    dir = os.path.join(chain, f"tail-{kind}-{run}")
    serve.fresh_copy(chain, dir)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        d = serve.Daemon(kind, binary, dir)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        out = os.path.join(dir, "fio.json")
        proc = serve.fio(d.uri, 600, out, extra=[f"--write_lat_log={dir}/lat", "--log_avg_msec=0"])
        serve.wait_for_guest_writes(os.path.join(dir, "top.qcow2"), proc)
        stream_s = d.stream()
        proc.send_signal(2)
        serve.fio_result(proc, out, interrupted=True)
    finally:
        d.quit()
    latencies = []  # (ms since fio started, latency ms)
    for path in glob.glob(f"{dir}/lat_clat*.log"):
        with open(path) as f:
            for line in f:
                fields = line.split(",")
                latencies.append((int(fields[0]), int(fields[1]) / 1e6))
    shutil.rmtree(dir)
    values = [lat for _, lat in latencies]
    q = statistics.quantiles(values, n=1000)
    buckets = {}
    for at, lat in latencies:
        buckets.setdefault(at // 100, []).append(lat)
    timeline = " ".join(f"{b * 100}:{len(v)}/{sum(x > 1.5 for x in v)}/{max(v):.1f}"
                        for b, v in sorted(buckets.items()))
    name = kind if not env else f"{kind} {env}"
    print(f"{name} run {run}: stream {stream_s:.3f} s, {len(values)} requests, "
          f"p99 {q[989]:.2f} p99.9 {q[998]:.2f} max {max(values):.1f} ms | {timeline}", flush=True)


def main():
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    chain, runs = sys.argv[1], int(sys.argv[2])
    daemons = [parse_daemon(spec) for spec in sys.argv[3:]]
    os.makedirs(chain, exist_ok=True)
    if not os.path.exists(os.path.join(chain, "expected.raw")):
        serve.build_chain(chain)
    for run in range(runs):
        for kind, binary, env in daemons:
            one(kind, binary, env, chain, run)


if __name__ == "__main__":
    main()
