#!/usr/bin/env python3
"""imgstream serve vs qemu-storage-daemon on the same 2 GiB qcow2 chain, in one run.

For each daemon, on a fresh copy of the chain each time, RUNS times:
  (a) stream-noload: block-stream -> BLOCK_JOB_COMPLETED with no guest I/O;
  (b) stream+fio:    the same while fio (nbd engine, random 4k, 70% reads, QD16, one
                     connection) runs from just before the stream until it completes;
  (c) stream+fio-rate: the same with fio held to FIO_RATE_IOPS (70/30 reads/writes), a
                     rate both daemons sustain during a stream: stream time and latency at
                     the same guest load (in (b) the daemon that serves the guest faster
                     also gets more guest I/O to do while it streams);
  (c') stream+fio-flush: the same as (c) with a flush (NBD_CMD_FLUSH) after every
                     FIO_FLUSH_EVERY writes, as a guest's filesystem journal asks for: a
                     flush makes the stream's copies durable too;
  (d) fio-idle:      fio alone for FIO_IDLE_S seconds;
  (e) fio-flush:     the same with a flush (NBD_CMD_FLUSH) after every FIO_FLUSH_EVERY
                     writes, as a guest's filesystem journal asks for.
Every end state is verified: qemu-img check, no backing file after a stream, and the guest
content equal to the expected content outside the range fio writes to (fio is confined to
the second half of the disk; the first half must match the original chain byte for byte).
Peak RSS (VmHWM) of each daemon is read from /proc before it is told to quit.

Usage: bench/serve.py IMGSTREAM_BINARY WORKDIR OUTPUT.md
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

GIB = 1 << 30
MIB = 1 << 20
# Overridable for a quick smoke run of the script itself (and BENCH_PHASES to run only some).
RUNS = int(os.environ.get("BENCH_RUNS", 3))
FIO_IDLE_S = 5
FIO_FLUSH_EVERY = 8
FIO_RATE_IOPS = int(os.environ.get("FIO_RATE_IOPS", 12000))
# stream+fio-after: how long fio goes on after BLOCK_JOB_COMPLETED.
AFTER_EVENT_S = 2
SIZE = int(os.environ.get("BENCH_SIZE_MIB", 2048)) * MIB
CLUSTER = 64 * 1024
# fio writes only here; the other half is compared with the original chain.
FIO_OFFSET = SIZE // 2
FIO_SIZE = SIZE // 2


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def qemu_io_script(image, fmt, commands):
    sh("qemu-io", "-f", fmt, image, input="\n".join(commands) + "\nquit\n",
       text=True, stdout=subprocess.DEVNULL)


def build_chain(dir):
    """base qcow2 ~50% data, mid ~10% data plus zero clusters, top ~5%; 64 KiB clusters."""
    base, mid, top = (os.path.join(dir, n) for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    opts = f"cluster_size={CLUSTER}"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, base, str(SIZE))
    qemu_io_script(base, "qcow2", [f"write -P {i % 250 + 1} {i * 2 * MIB} {MIB}"
                                   for i in range(SIZE // (2 * MIB))])
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "base.qcow2", "-F", "qcow2",
       mid)
    qemu_io_script(mid, "qcow2",
                   [f"write -P 0xcc {i * 10 * MIB + 3 * MIB} {MIB}" for i in range(SIZE // (10 * MIB))]
                   + [f"write -z {i * 20 * MIB + 5 * MIB} {256 * 1024}" for i in range(SIZE // (20 * MIB))])
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", "mid.qcow2", "-F", "qcow2",
       top)
    qemu_io_script(top, "qcow2", [f"write -P 0xdd {i * 20 * MIB + 7 * MIB} {MIB}"
                                  for i in range(SIZE // (20 * MIB))])
    expected = os.path.join(dir, "expected.raw")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, expected)
    return expected


def fresh_copy(chain_dir, run_dir):
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(run_dir)
    for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
        sh("cp", "--sparse=always", os.path.join(chain_dir, name), run_dir)
    sh("sync")


def qsd_blockdev_args(dir, suffix=""):
    """qemu-storage-daemon's --blockdev arguments for the chain in `dir`: qcow2 nodes base, mid
    and top (each name followed by `suffix`) over file nodes with aio=threads."""
    args, below = [], None
    for name in ("base", "mid", "top"):
        node = name + suffix
        args += ["--blockdev", f"driver=file,filename={os.path.join(dir, name + '.qcow2')},"
                               f"node-name={node}-file,aio=threads"]
        backing = f",backing={below}" if below else ""
        args += ["--blockdev", f"driver=qcow2,file={node}-file,node-name={node}{backing}"]
        below = node
    return args


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.events = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def execute(self, command, **arguments):
        msg = {"execute": command, "id": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']}")
            if "return" not in reply:
                raise RuntimeError(f"{command}: unexpected QMP message {reply}")
            return reply["return"]

    def wait_event(self, names):
        while True:
            for i, e in enumerate(self.events):
                if e["event"] in names:
                    return self.events.pop(i)
            self.events.append(self._read())


class Daemon:
    """One daemon on a fresh chain copy in `dir`."""

    def __init__(self, kind, binary, dir):
        self.kind, self.dir = kind, dir
        self.qmp_path = os.path.join(dir, "qmp.sock")
        self.nbd_path = os.path.join(dir, "nbd.sock")
        pid_file = os.path.join(dir, "daemon.pid")
        top = os.path.join(dir, "top.qcow2")
        if kind == "imgstream":
            args = [binary, "serve", "--qmp", self.qmp_path, "--nbd", f"unix:{self.nbd_path}",
                    "--pid-file", pid_file, f"top={top}"]
        else:
            args = ["qemu-storage-daemon"] + qsd_blockdev_args(dir)
            args += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd_path}",
                     "--export", "type=nbd,id=e,node-name=top,name=top,writable=on",
                     "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=m",
                     "--monitor", "chardev=m", "--pidfile", pid_file]
        self.stderr = open(os.path.join(dir, "daemon.stderr"), "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.stderr)
        for _ in range(1000):  # the pid file appears once both sockets listen
            if os.path.exists(pid_file):
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited: {open(self.stderr.name).read()}")
            time.sleep(0.01)
        else:
            raise RuntimeError(f"{kind} never became ready")
        self.qmp = Qmp(self.qmp_path)

    @property
    def uri(self):
        return f"nbd+unix:///top?socket={self.nbd_path}"

    def stream(self):
        start = time.monotonic()
        self.qmp.execute("block-stream", device="top", **{"job-id": "s"})
        event = self.qmp.wait_event({"BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"})
        wall = time.monotonic() - start
        if event["event"] != "BLOCK_JOB_COMPLETED" or "error" in event["data"]:
            raise RuntimeError(f"stream failed: {event}")
        return wall

    def peak_rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def cpu_s(self):
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def quit(self):
        try:
            self.qmp.execute("quit")
        except RuntimeError:
            pass  # the connection may close before the reply
        if self.proc.wait(timeout=60) != 0:
            raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}")


def fio(uri, runtime_s, out_path, rate_iops=None, extra=()):
    rate = []
    if rate_iops:
        reads = rate_iops * 7 // 10
        rate = [f"--rate_iops={reads},{rate_iops - reads}"]
    return subprocess.Popen(
        ["fio", "--name=guest", *rate, "--ioengine=nbd", f"--uri={uri}", "--rw=randrw",
         "--rwmixread=70", "--bs=4k", "--iodepth=16", "--numjobs=1", "--time_based",
         f"--runtime={runtime_s}", f"--offset={FIO_OFFSET}", f"--size={FIO_SIZE}",
         "--randrepeat=1", "--randseed=1234", "--output-format=json", f"--output={out_path}",
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_guest_writes(top, proc):
    """Returns once fio's writes reach the image (fio takes a while to set up; the top file
    grows at the first write to a cluster it does not have)."""
    size0 = os.stat(top).st_size
    for _ in range(2000):
        if os.stat(top).st_size != size0 or proc.poll() is not None:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        raise RuntimeError(f"fio ended early: {proc.stderr.read().decode()}")


def fio_result(proc, out_path, interrupted=False):
    _, err = proc.communicate(timeout=120)
    # fio exits non-zero when stopped by SIGINT, but still writes its report.
    if proc.returncode != 0 and not interrupted:
        raise RuntimeError(f"fio failed ({proc.returncode}): {err.decode()}")
    try:
        text = open(out_path).read()
        # A signalled fio prints "fio: terminating on signal 2" before its JSON.
        job = json.loads(text[text.index("{"):])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise RuntimeError(f"fio left no report ({proc.returncode}, {e}): {err.decode()}")
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {err.decode()}")
    r, w = job["read"], job["write"]
    def pct(side, p):
        value = side["clat_ns"].get("percentile", {}).get(p)
        return value / 1e6 if value is not None else None

    # Flushes (--fsync) are reported apart, with their latency from submission.
    sync = job.get("sync", {}).get("lat_ns", {})
    sync_p99 = sync.get("percentile", {}).get("99.000000") if sync.get("N") else None
    return {
        "iops": r["iops"] + w["iops"], "read_iops": r["iops"], "write_iops": w["iops"],
        "read_p50": pct(r, "50.000000"), "read_p99": pct(r, "99.000000"),
        "write_p50": pct(w, "50.000000"), "write_p99": pct(w, "99.000000"),
        "flush_p99": sync_p99 / 1e6 if sync_p99 is not None else None,
        "client_s": job["job_runtime"] / 1000,
    }


def verify(dir, expected, streamed):
    top = os.path.join(dir, "top.qcow2")
    check = subprocess.run(["qemu-img", "check", "-f", "qcow2", top], capture_output=True, text=True)
    if check.returncode != 0:
        return f"check failed: {check.stdout}{check.stderr}"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", top],
                                     check=True, capture_output=True, text=True).stdout)
    if streamed and "backing-filename" in info:
        return "backing file left"
    out = os.path.join(dir, "out.raw")
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, out)
    cmp = subprocess.run(["cmp", "-n", str(FIO_OFFSET), out, expected], capture_output=True, text=True)
    os.unlink(out)
    if cmp.returncode != 0:
        return f"content differs outside fio's range: {cmp.stdout}"
    return "ok"


def fsync_s(dir):
    """Seconds an fsync of the top file takes: how long after BLOCK_JOB_COMPLETED the streamed
    data is durable. (Neither daemon waits for the device before the event: QSD's data and
    header rewrite are in the page cache then; imgstream's data too, its header change waits
    for the flush it starts at the event, which this fsync runs alongside.)"""
    start = time.monotonic()
    fd = os.open(os.path.join(dir, "top.qcow2"), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - start


def one_run(kind, binary, chain_dir, expected, phase, run):
    dir = os.path.join(chain_dir, f"{kind}-{phase}-{run}")
    fresh_copy(chain_dir, dir)
    d = Daemon(kind, binary, dir)
    result = {}
    try:
        cpu0 = d.cpu_s()
        if phase == "stream-noload":
            result["stream_s"] = d.stream()
            result["durable_s"] = result["stream_s"] + fsync_s(dir)
        elif phase in ("stream+fio", "stream+fio-rate", "stream+fio-flush", "stream+fio-after"):
            out = os.path.join(dir, "fio.json")
            rate = FIO_RATE_IOPS if phase != "stream+fio" else None
            extra = [f"--fsync={FIO_FLUSH_EVERY}"] if phase == "stream+fio-flush" else []
            proc = fio(d.uri, 600, out, rate, extra=extra)
            wait_for_guest_writes(os.path.join(dir, "top.qcow2"), proc)
            result["stream_s"] = d.stream()
            if phase == "stream+fio-after":
                # The guest goes on past the event, through the writeback of the copies.
                result["durable_s"] = result["stream_s"] + fsync_s(dir)
                time.sleep(AFTER_EVENT_S)
            proc.send_signal(2)  # SIGINT: fio stops and reports
            if phase != "stream+fio-after":
                result["durable_s"] = result["stream_s"] + fsync_s(dir)
            result.update(fio_result(proc, out, interrupted=True))
        else:
            out = os.path.join(dir, "fio.json")
            extra = [f"--fsync={FIO_FLUSH_EVERY}"] if phase == "fio-flush" else []
            result.update(fio_result(fio(d.uri, FIO_IDLE_S, out, extra=extra), out))
        result["cpu_s"] = d.cpu_s() - cpu0
        result["rss_mib"] = d.peak_rss_kib() / 1024
    finally:
        try:
            d.quit()
        except Exception:
            d.proc.kill()
            raise
    result["verify"] = verify(dir, expected, phase.startswith("stream"))
    shutil.rmtree(dir)
    print(f"  {kind:9} {phase:13} run {run}: " +
          ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
          flush=True)
    return result


def med(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def fmt(values, digits=3):
    m, lo, hi = med(values)
    if m is None:
        return "-"
    return f"{m:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def main():
    binary, workdir, output = sys.argv[1:4]
    os.makedirs(workdir, exist_ok=True)
    print(f"building the {SIZE // MIB} MiB chain in {workdir}", flush=True)
    expected = build_chain(workdir)
    map_out = subprocess.run(["qemu-img", "map", "--output=json", os.path.join(workdir, "top.qcow2")],
                             check=True, capture_output=True, text=True).stdout
    to_copy = sum(e["length"] for e in json.loads(map_out) if e["depth"] > 0 and e["present"])
    phases = os.environ.get("BENCH_PHASES", "stream-noload stream+fio stream+fio-rate stream+fio-after stream+fio-flush fio-idle fio-flush").split()
    # One discarded run of each daemon first: the first run of a series has come out 2-3x
    # slower than the rest, whoever ran it (bench/results/serve-2026-11-27-background-turns.md).
    print("warm-up (discarded)", flush=True)
    for kind in ("imgstream", "qsd"):
        one_run(kind, binary, workdir, expected, phases[0], "warm-up")
    results = {}
    for phase in phases:
        for run in range(RUNS):
            for kind in ("imgstream", "qsd"):  # interleaved so drift hits both alike
                results.setdefault((kind, phase), []).append(
                    one_run(kind, binary, workdir, expected, phase, run))

    cols = [("stream wall s", "stream_s", 3), ("until durable s", "durable_s", 3),
            ("client IOPS", "iops", 0),
            ("read IOPS", "read_iops", 0), ("write IOPS", "write_iops", 0),
            ("read p50 ms", "read_p50", 3), ("read p99 ms", "read_p99", 3),
            ("write p50 ms", "write_p50", 3), ("write p99 ms", "write_p99", 3),
            ("flush p99 ms", "flush_p99", 3),
            ("daemon cpu s", "cpu_s", 2), ("peak RSS MiB", "rss_mib", 1)]
    lines = [f"# imgstream serve vs qemu-storage-daemon ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {os.cpu_count()} cores, `{subprocess.run(['uname', '-r'], capture_output=True, text=True).stdout.strip()}`, "
             f"`{subprocess.run(['qemu-storage-daemon', '--version'], capture_output=True, text=True).stdout.splitlines()[0]}`, "
             f"imgstream release build.",
             f"Chain: {SIZE / GIB:g} GiB, 64 KiB clusters, base qcow2 ~50% data <- mid ~10% (+ zero clusters) <- top ~5%; "
             f"a full stream copies {to_copy / GIB:.2f} GiB. QSD: file nodes aio=threads, default cache. "
             f"fio {subprocess.run(['fio', '--version'], capture_output=True, text=True).stdout.strip()}: "
             f"nbd engine, one connection, randrw 4k, rwmixread=70, iodepth=16, confined to the second half of the disk; "
             f"stream+fio starts block-stream once fio's first writes reach the top file and stops fio (SIGINT) at BLOCK_JOB_COMPLETED; stream+fio-rate is the same with fio held to {FIO_RATE_IOPS} IOPS (--rate_iops, 70/30); stream+fio-after is stream+fio-rate with fio going on {AFTER_EVENT_S} s after the event and the fsync below (its p99 covers the writeback of the copies); stream+fio-flush is stream+fio-rate with a flush after every {FIO_FLUSH_EVERY} writes (--fsync; flush p99 from fio's sync latencies); fio-flush is fio alone with a flush after every {FIO_FLUSH_EVERY} writes (--fsync). "
             f"until durable = stream wall + an fsync of the top file issued at BLOCK_JOB_COMPLETED (neither daemon flushes before that event; imgstream starts a flush at it and rewrites its header after). "
             f"Medians of {RUNS} runs (min–max), each on a fresh copy of the chain, after one discarded run of each daemon. "
             f"verify = qemu-img check clean, no backing file after a stream, first half byte-equal to the original chain.",
             "",
             "| daemon | phase | " + " | ".join(c[0] for c in cols) + " | verify |",
             "|---|---|" + "---|" * len(cols) + "---|"]
    for phase in phases:
        for kind in ("imgstream", "qsd"):
            rs = results[(kind, phase)]
            cells = [fmt([r.get(key) for r in rs], d) for _, key, d in cols]
            ok = sum(r["verify"] == "ok" for r in rs)
            bad = [r["verify"] for r in rs if r["verify"] != "ok"]
            lines.append(f"| {kind} | {phase} | " + " | ".join(cells) + f" | {ok}/{len(rs)} ok"
                         + (f" ({'; '.join(bad)})" if bad else "") + " |")
    def ratio_of_medians(phase, key):
        a = med([r.get(key) for r in results[("imgstream", phase)]])[0]
        b = med([r.get(key) for r in results[("qsd", phase)]])[0]
        return f"{a / b:.2f}" if a is not None and b else "-"

    def median_of_ratios(phase, key):
        # Run i of each daemon ran back to back, so their ratio cancels most of the drift
        # of the machine's speed between runs.
        pairs = zip(results[("imgstream", phase)], results[("qsd", phase)])
        ratios = [a.get(key) / b.get(key) for a, b in pairs if a.get(key) is not None and b.get(key)]
        return f"{statistics.median(ratios):.2f}" if ratios else "-"

    for title, ratio in (("Ratios imgstream / QSD, of the medians:", ratio_of_medians),
                         ("Ratios imgstream / QSD, median of the per-run ratios (run i of each back to back):",
                          median_of_ratios)):
        lines += ["", title, "",
                  "| phase | stream time | until durable | client IOPS | read p99 | write p99 | flush p99 | peak RSS |",
                  "|---|---|---|---|---|---|---|---|"]
        for phase in phases:
            lines.append(f"| {phase} | {ratio(phase, 'stream_s')} | {ratio(phase, 'durable_s')} | {ratio(phase, 'iops')} | "
                         f"{ratio(phase, 'read_p99')} | {ratio(phase, 'write_p99')} | {ratio(phase, 'flush_p99')} | {ratio(phase, 'rss_mib')} |")
    lines += ["", "Targets: stream time <= 0.8x QSD's; guest p99 during the stream no worse than QSD's.", ""]
    text = "\n".join(lines)
    print(text)
    with open(output, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
