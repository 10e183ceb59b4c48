"""What copying the input bytes costs on this machine, by method, on the same files (cold cache before each run).

    python -m bench.copy_floor FILE [FILE ...] [--methods cp,rw,rw_drop,cfr,cfr_drop] [--out DIR] [--json PATH]

Methods:
- ``cp``: coreutils ``cp`` (9.x uses ``copy_file_range``), the benchmark's I/O floor;
- ``rw``: ``readinto`` a 4 MiB buffer, ``write`` it (what a streaming converter does at the least);
- ``cfr``: ``os.copy_file_range`` in 256 MiB calls (the kernel copies page to page);
- ``*_drop``: the same, dropping the input pages right after reading them and pushing the output to disk and
  out of the page cache every 256 MiB (``sync_file_range`` + ``POSIX_FADV_DONTNEED``), the converter's fallback;
- ``rw_direct``: ``readinto`` (input pages dropped) and the converter's own ``O_DIRECT`` writer, as it runs.

For each it prints wall time, the process's user and system CPU, the CPU the whole machine spent meanwhile (kswapd
and writeback threads included) and the pages the kernel scanned to reclaim memory. It exists because cp's time
varies by 2x between identical runs here, and the variation follows the reclaim work, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert.sinks import _DirectSink, _sync_range, drop_cached

CHUNK = 1 << 22
STEP = 1 << 28
METHODS = ("cp", "rw", "rw_drop", "cfr", "cfr_drop", "rw_direct")


def _vmstat() -> dict[str, int]:
    return {line.split()[0]: int(line.split()[1]) for line in Path("/proc/vmstat").read_text().splitlines()}


def _busy() -> float:
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def _copy_direct(src: Path, dst: Path) -> None:
    sink = _DirectSink(dst)
    with open(src, "rb", buffering=0) as fi:
        os.posix_fadvise(fi.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(CHUNK)
        off = 0
        while n := fi.readinto(buf):
            drop_cached(fi.fileno(), off, n)
            sink.write(memoryview(buf)[:n])
            off += n
    sink.close()
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _copy(src: Path, dst: Path, method: str) -> None:
    if method == "rw_direct":
        return _copy_direct(src, dst)
    drop = method.endswith("_drop")
    size = src.stat().st_size
    with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
        os.posix_fadvise(fi.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buf = bytearray(CHUNK)
        off = flushed = 0
        while off < size:
            if method.startswith("cfr"):
                n = os.copy_file_range(fi.fileno(), fo.fileno(), min(STEP, size - off), off, off)
            else:
                n = fi.readinto(buf)
                view = memoryview(buf)[:n]
                while view:
                    view = view[fo.write(view) :]
            if not n:
                raise SystemExit(f"{src}: shrank while being copied")
            if drop:
                drop_cached(fi.fileno(), off, n)
            off += n
            if drop and off - flushed >= STEP:
                _sync_range(fo.fileno(), flushed, off - flushed, wait=False)
                if flushed:
                    _sync_range(fo.fileno(), 0, flushed, wait=True)
                    drop_cached(fo.fileno(), 0, flushed)
                flushed = off
        if drop:
            os.fsync(fo.fileno())


def run(files: list[Path], method: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["sync"], check=False)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    r0, c0, b0, v0 = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        _busy(),
        _vmstat(),
    )
    t0 = time.perf_counter()
    if method == "cp":
        subprocess.run(["cp", *map(str, files), str(out)], check=True)
    else:
        for f in files:
            _copy(f, out / f.name, method)
    wall = time.perf_counter() - t0
    r1, c1, b1, v1 = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
        _busy(),
        _vmstat(),
    )
    shutil.rmtree(out)
    return {
        "method": method,
        "seconds": round(wall, 2),
        "user": round(r1.ru_utime - r0.ru_utime + c1.ru_utime - c0.ru_utime, 2),
        "sys": round(r1.ru_stime - r0.ru_stime + c1.ru_stime - c0.ru_stime, 2),
        "machine_cpu": round(b1 - b0, 1),
        "reclaim_scanned_pages": sum(v1.get(k, 0) - v0.get(k, 0) for k in ("pgscan_kswapd", "pgscan_direct")),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument(
        "--out", type=Path, default=None, help="scratch folder on the same disk (default: beside the first file)"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("needs root: every run starts with a dropped page cache", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        ap.error(f"--methods: unknown {', '.join(bad)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="copy-floor-", dir=args.files[0].parent))
    total = sum(f.stat().st_size for f in args.files)
    print(f"{len(args.files)} file(s), {total / 1e9:.2f} GB")
    print("| method | wall | user | sys | machine CPU | reclaim scanned |\n| --- | --- | --- | --- | --- | --- |")
    results = []
    for _ in range(args.rounds):
        for m in methods:
            r = run(args.files, m, out)
            results.append(r)
            print(
                f"| {m} | {r['seconds']:.1f} s | {r['user']:.1f} | {r['sys']:.1f} | {r['machine_cpu']:.1f} | "
                f"{r['reclaim_scanned_pages'] * 4096 / 1e9:.1f} GB |",
                flush=True,
            )
    shutil.rmtree(out, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"bytes": total, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
