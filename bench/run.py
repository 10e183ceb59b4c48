"""Time ``cp -r``, our converter, the upstream baseline and ``verify`` on the same synthetic checkpoint.

    python -m bench.run --size mini|7b|13b [--workdir DIR] [--keep] [--write-md] [--json FILE]
                        [--steps cp,baseline,ours,verify] [--mem-limit-gb 20] [--verify-timeout 1800] [--profile]
                        [--verify-args '--dtype bfloat16'] [--section NAME] [--note TEXT]
    python -m bench.run --md-from bench/results/7b.json     # re-render a BENCHMARKS.md section from a report

One run, one input: the checkpoint is generated once into WORKDIR/input (``bench.make_checkpoint``; reused when
WORKDIR/input/checkpoint.json says it is the same size and seed), then each step runs as a subprocess on it:

    cp        cp -r input/original scratch (the I/O floor), then fsync of the copies (timed separately); deleted
    baseline  python -m bench.baseline ... (the upstream one-shot script, restated); output deleted
    ours      python -m convert --original ... --text-model ... --vision-model ... --output ... --quiet
    verify    python -m verify <ours' output> (killed past --verify-timeout or the memory limit)

Before each step dirty pages are synced and the page cache dropped (``echo 3 > /proc/sys/vm/drop_caches``, root
only), so every step starts cold; where that is not possible, the table says so. For each step: wall time,
ratio to ``cp -r``, PEAK ANONYMOUS memory (the sum of ``RssAnon`` over the process and all its descendants,
sampled every 50 ms: file-backed mmap pages and page cache do not count), peak RSS of the tree (anon + file, for
comparison), CPU seconds of the tree and of everything else on the machine during the step (concurrent load).
A step whose tree exceeds --mem-limit-gb of anonymous memory is killed (SIGKILL to its process group) and
recorded as such, so a step that cannot fit does not take the machine down.

``--profile`` adds one more run of ``ours`` under ``py-spy record`` (not timed in the table) and summarises where
its samples fall. ``--write-md`` puts the table, the machine, the command and notes into BENCHMARKS.md,
replacing the section of the same size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = REPO / "BENCHMARKS.md"
STEPS = ("cp", "baseline", "ours", "verify", "verify-short", "floor", "push")
# The short form of issue 14: one image prompt, two tokens, --dtype bfloat16 (--short-dtype changes the dtype).
SHORT_VERIFY = ["--prompts", str(Path(__file__).resolve().parent / "prompts-fullsize.json"), "--max-new-tokens", "2"]
# A matrix product of a 7B layer's shape over a 619-token prompt, timed per dtype: it says whether this CPU's bf16 is
# fast (bf16 units: avx512_bf16 / amx_bf16) or slow (emulated), which decides what the short form can reach.
GEMM_PROBE = r"""
import json, time, torch
out = {}
for name in ("float32", "bfloat16"):
    dt = getattr(torch, name)
    x, w = torch.randn(619, 4096).to(dt), torch.randn(11008, 4096).to(dt)
    torch.nn.functional.linear(x, w)
    n, t = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t < 1.0:
        torch.nn.functional.linear(x, w)
        n += 1
    out[name] = round(2 * 619 * 4096 * 11008 * n / (time.perf_counter() - t) / 1e9, 1)
print(json.dumps(out))
"""
PAGE = os.sysconf("SC_PAGE_SIZE")


# ----------------------------------------------------------------------------------------------------------------
# process-tree memory sampling
# ----------------------------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses, so split after the last ')'
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in fields:
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            parts = f.read().rsplit(b")", 1)[1].split()
        return int(parts[11]) + int(parts[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


class Sampler(threading.Thread):
    """Every ``interval`` s: sum RssAnon (and RssFile) over the tree of ``pid``; remember the maxima; kill the
    process group when anonymous memory passes ``limit`` bytes."""

    def __init__(self, pid: int, limit: int | None, interval: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.limit, self.interval = pid, limit, interval
        self.peak_anon = 0
        self.peak_rss = 0
        self.peak_procs = 0
        self.killed = False
        self.samples = 0
        self.tree_ticks: dict[int, int] = {}  # last seen cpu ticks of every process of the tree
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            pids = tree(self.pid)
            anon = rss = 0
            for p in pids:
                st = _status_kb(p, ("RssAnon", "RssFile", "RssShmem"))
                anon += st.get("RssAnon", 0) * 1024
                rss += (st.get("RssAnon", 0) + st.get("RssFile", 0) + st.get("RssShmem", 0)) * 1024
                ticks = _cpu_ticks(p)
                if ticks:
                    self.tree_ticks[p] = ticks
            self.samples += 1
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_procs = max(self.peak_procs, len(pids))
            if self.limit and anon > self.limit and not self.killed:
                self.killed = True
                try:
                    os.killpg(self.pid, signal.SIGKILL)  # the step runs in its own session: its group is ours
                except ProcessLookupError:
                    pass
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _machine_busy_ticks() -> tuple[int, int]:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts[:8]) - idle, sum(parts[:8])


# ----------------------------------------------------------------------------------------------------------------
# steps
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    step: str
    command: str
    seconds: float | None = None
    returncode: int | None = None
    peak_anon_bytes: int = 0
    peak_rss_bytes: int = 0
    cpu_seconds: float = 0.0  # of the step's process tree
    other_cpu_seconds: float = 0.0  # everything else on the machine meanwhile
    killed: str | None = None  # "memory" | "timeout"
    cold_cache: bool = False
    output_bytes: int | None = None
    extra: dict = field(default_factory=dict)
    tail: str = ""
    round: int = 1  # with --repeat: which round of cp/ours pairs this run belongs to
    cache: str = "cold"  # cold: page cache dropped before the step; warm: dropped, then the input read into it


def drop_caches() -> bool:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def warm_input(folder: Path) -> dict:
    """Drop the page cache, then read every file of ``folder`` once so that it sits in the page cache, as right
    after a download (not timed as part of the step). Returns how long that took and how much the cache grew."""
    cold = drop_caches()
    before = _meminfo("Cached")
    t = time.perf_counter()
    total = 0
    buf = bytearray(1 << 24)
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return {
        "dropped_first": cold,
        "warm_seconds": round(time.perf_counter() - t, 2),
        "bytes": total,
        "cached_growth": _meminfo("Cached") - before,
    }


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_step(
    name: str,
    argv: list[str],
    limit: int | None,
    timeout: float | None,
    drop: bool,
    log_path: Path,
    env: dict | None = None,
    warm: Path | None = None,
) -> StepResult:
    """Run one step; ``warm``: instead of starting cold, the page cache holds that folder (see :func:`warm_input`)."""
    warmed = warm_input(warm) if warm is not None else None
    cold = drop_caches() if drop and warm is None else False
    res = StepResult(step=name, command=shlex.join(argv), cold_cache=cold, cache="warm" if warm is not None else "cold")
    if warmed:
        res.extra["warmed"] = warmed
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    busy0, _ = _machine_busy_ticks()
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        sampler = Sampler(proc.pid, limit)
        sampler.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            res.killed = "timeout"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        res.seconds = round(time.perf_counter() - t0, 2)
        sampler.stop()
    busy1, _ = _machine_busy_ticks()
    if sampler.killed:
        res.killed = "memory"
    res.returncode = proc.returncode
    res.peak_anon_bytes, res.peak_rss_bytes = sampler.peak_anon, sampler.peak_rss
    res.cpu_seconds = round(sum(sampler.tree_ticks.values()) / ticks_per_s, 1)
    res.other_cpu_seconds = round(max(0.0, (busy1 - busy0) / ticks_per_s - res.cpu_seconds), 1)
    res.extra["samples"] = sampler.samples
    text = [ln for ln in re.split(r"[\r\n]+", log_path.read_text(errors="replace")) if ln.strip()]
    res.tail = "\n".join(text[-15:])
    return res


# ----------------------------------------------------------------------------------------------------------------
# py-spy summary
# ----------------------------------------------------------------------------------------------------------------


def summarize_collapsed(path: Path, top: int = 25) -> dict:
    """From a py-spy ``--format raw`` (collapsed stacks) file: the inclusive share of samples of every frame in
    this project's code (``convert/``, ``verify/``, ``bench/``; by line), and the self share by function (the
    leaves: where the CPU or the wait actually is). Main thread only: idle helper threads (tqdm's monitor, which
    py-spy ``--idle`` samples too) would dilute the shares."""
    total = 0
    self_c: Counter = Counter()
    incl: Counter = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        if stack.startswith("Thread._bootstrap"):
            continue
        total += n
        frames = [
            re.sub(r" \((?:.*?/site-packages/|/work/main/|.*?/lib/python3\.\d+/)", " (", f) for f in stack.split(";")
        ]
        self_c[re.sub(r":\d+\)$", ")", frames[-1])] += n
        for f in set(frames):
            if re.search(r" \((convert|verify|bench)/", f):
                incl[f] += n

    def share(c: Counter) -> list:
        return [(f, round(100 * k / total, 1)) for f, k in c.most_common(top)] if total else []

    return {"samples": total, "self": share(self_c), "inclusive": share(incl)}


# ----------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------


def _gb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e9:.2f} GB"


def durable_seconds(r: StepResult) -> float | None:
    """cp's time to a durable copy: ``cp -r`` plus the ``sync`` of the copied files (the converter fsyncs its output,
    cp does not); any other step's wall time."""
    if r.step == "cp" and r.seconds is not None:
        return r.seconds + float((r.extra or {}).get("fsync_seconds", 0.0))
    return r.seconds


def table(results: list[StepResult]) -> str:
    """One row per run; ``x cp`` divides by the cp + sync run of the same round (the one just before it)."""
    rounds = max((r.round for r in results), default=1)
    mixed = len({r.cache for r in results}) > 1
    head = ["step", "wall", "x cp", "peak anon", "peak RSS sum", "CPU s (tree)", "CPU s (others)", "result"]
    rows = []
    floor = None
    for r in results:
        if r.step == "cp":
            floor = durable_seconds(r) if r.returncode == 0 else None
        if r.killed:
            status = f"killed ({r.killed}) after {r.seconds:.1f} s"
        elif r.returncode == 0:
            status = "ok"
        else:
            status = f"exit {r.returncode}"
        ratio = (
            f"{durable_seconds(r) / floor:.2f}"
            if floor and r.seconds and r.returncode == 0 and r.step in ("cp", "ours", "baseline")
            else "-"
        )
        name = f"{r.step} ({r.round})" if rounds > 1 else r.step
        if mixed:
            name += f", {r.cache}"
        wall = f"{r.seconds:.1f} s" if r.seconds is not None else "-"
        if r.step == "cp" and r.seconds is not None and "fsync_seconds" in (r.extra or {}):
            wall = f"{r.seconds:.1f} + {r.extra['fsync_seconds']:.1f} s"
        rows.append(
            [
                name,
                wall,
                ratio,
                _gb(r.peak_anon_bytes),
                _gb(r.peak_rss_bytes),
                f"{r.cpu_seconds:.0f}",
                f"{r.other_cpu_seconds:.0f}",
                status,
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def paired_ratios(results: list[StepResult], cache: str | None = None) -> dict | None:
    """ours / cp per round (each ours run against the cp run just before it), with the median: cp's own time on
    this kind of machine varies by 2x between runs, so a single pair says little. ``cache``: only the runs of that
    page-cache state (cold or warm)."""
    pairs = []
    floor = None
    for r in results:
        if cache is not None and r.cache != cache:
            continue
        if r.step == "cp":
            floor = durable_seconds(r) if r.returncode == 0 else None
        elif r.step == "ours" and floor and r.returncode == 0 and r.seconds:
            pairs.append((floor, r.seconds))
    if len(pairs) < 2:
        return None
    ratios = sorted(o / c for c, o in pairs)
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return {
        "pairs": [{"cp": c, "ours": o, "ratio": round(o / c, 3)} for c, o in pairs],
        "median_ratio": round(median, 3),
        "cp_range": [min(c for c, _ in pairs), max(c for c, _ in pairs)],
        "ours_range": [min(o for _, o in pairs), max(o for _, o in pairs)],
    }


def _sh(cmd: str) -> str:
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as e:  # noqa: BLE001 (machine facts are best effort)
        return f"({e})"


def _gemm_gflops() -> dict:
    try:
        run = subprocess.run([sys.executable, "-c", GEMM_PROBE], capture_output=True, text=True, timeout=120)
        return json.loads(run.stdout.strip().rpartition("\n")[2])
    except Exception as e:  # noqa: BLE001 (machine facts are best effort)
        return {"error": str(e)}


def machine(workdir: Path) -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")), [])
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        "?",
    )
    return {
        "nproc": _sh("nproc"),
        "cpu": cpu,
        "free_g": _sh("free -g"),
        "disk": _sh(f"df -h {shlex.quote(str(workdir))} | tail -1"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": _sh(f"{shlex.quote(sys.executable)} -c 'import torch; print(torch.__version__)'"),
        "transformers": _sh(f"{shlex.quote(sys.executable)} -c 'import transformers; print(transformers.__version__)'"),
        "bf16_units": [f for f in flags if f in ("avx512_bf16", "amx_bf16")],
        "gemm_gflops": _gemm_gflops(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "git_head": _sh(f"git -C {shlex.quote(str(REPO))} rev-parse --short HEAD"),
        "git_dirty": _sh(f"git -C {shlex.quote(str(REPO))} status --short -- convert verify").split("\n"),
    }


def _gemm_line(m: dict) -> list[str]:
    g = m["gemm_gflops"]
    units = ", ".join(m.get("bf16_units") or []) or "none"
    if "error" in g:
        return ["", f"bf16 units: {units}; GEMM probe failed: {g['error']}."]
    return [
        "",
        f"bf16 units: {units}. A 619 x 4096 x 11008 matrix product (`torch.nn.functional.linear`, all cores) ran at "
        f"{g.get('float32')} GFLOPS in float32 and {g.get('bfloat16')} GFLOPS in bfloat16 at the start.",
    ]


def markdown(report: dict) -> str:
    m = report["machine"]
    gen = report.get("generator") or {}
    sid = report.get("section") or report["size"]
    lines = [
        f"<!-- bench:{sid} start -->",
        f"## {sid}: {report['date']}",
        "",
        "Command:",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"Machine: {m['nproc']} cores ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, torch {m['torch']}, "
        f"transformers {m['transformers']}; disk `{m['disk']}`; load average at start {' '.join(m['loadavg_start'])}, "
        f"at end {' '.join(report.get('loadavg_end', []))}.",
        *(_gemm_line(m) if "gemm_gflops" in m else []),
        "",
        "```",
        m["free_g"],
        "```",
        "",
        *(
            [
                f"Code: commit `{m['git_head']}`"
                + (
                    ", with uncommitted changes in "
                    f"{', '.join(ln.split()[-1] for ln in m.get('git_dirty', []) if ln.strip())}."
                    if any(ln.strip() for ln in m.get("git_dirty", []))
                    else ", clean tree."
                ),
                "",
            ]
            if m.get("git_head")
            else []
        ),
        f"Input: `bench.make_checkpoint --size {report['size']} --seed {report['seed']}`: "
        f"{gen.get('parameters', 0) / 1e9:.3f} B parameters, {gen.get('tensors', '?')} tensors, "
        f"{_gb(gen.get('original_bytes'))} of bf16 `.bin` shards ({len(gen.get('shards', {}))}); "
        + (
            f"generated in {gen['generate_seconds']:.1f} s, peak anon {_gb(gen.get('generate_peak_anon'))}."
            if gen.get("generate_seconds")
            else "reused from an earlier generation."
        ),
        "",
        "Page cache: " + _cache_line(report["steps"]),
        "",
        table([StepResult(**{k: v for k, v in r.items()}) for r in report["steps"]]),
        "",
        *_paired_lines(report),
        "`x cp` = wall time / (wall time of `cp -r` of the same shards + `sync` of the copies). `peak anon` = maximum "
        "over 50 ms samples of "
        "the sum of `RssAnon` over the step's process tree (file-backed mmap pages and page cache excluded); "
        "`peak RSS sum` adds `RssFile` and `RssShmem` per process (informational: a file page mapped twice or by two "
        "processes counts twice, so it can exceed physical memory). `CPU s (others)` = CPU seconds used by everything "
        "else on the "
        "machine during the step: concurrent load.",
        "",
    ]
    for r in report["steps"]:
        extra = r.get("extra") or {}
        if r.get("round", 1) > 1 and not (r.get("killed") or r.get("returncode") not in (0, None)):
            continue  # the notes of round 1 stand for the repeats
        if r["step"] == "cp" and "fsync_seconds" in extra:
            lines.append(
                f"- cp: wall = `cp -r` + `sync` of the copied files ({extra['fsync_seconds']:.1f} s of it the sync); "
                "our converter fsyncs its output, cp and the baseline do not, so `x cp` divides by the sum."
            )
        if r["step"] == "baseline" and extra.get("phases"):
            order = [
                "setup",
                "torch_load",
                "rename_load_state_dict",
                "sigma",
                "mvn_cholesky",
                "resize_sample",
                "save_pretrained",
            ]
            ph = extra["phases"]
            lines.append(
                "- baseline phases (s): "
                + ", ".join(
                    f"{k} {ph[k]}"
                    for k in sorted(ph, key=lambda k: (k not in order, order.index(k) if k in order else 0, k))
                )
            )
        if r["step"] == "ours" and extra.get("summary"):
            lines.append("- ours: " + extra["summary"])
        lines += _step_notes(r, report["steps"])
        if r.get("killed") or (r.get("returncode") not in (0, None)):
            last = [ln.strip() for ln in re.split(r"[\r\n]+", r.get("tail", "")) if ln.strip()][-3:]
            lines.append(f"- {r['step']}: last output lines:\n\n```\n" + "\n".join(last) + "\n```")
    prof = report.get("profile")
    if prof:
        lines += [
            "",
            f"py-spy profile of `ours` ({prof['samples']} samples at {prof['rate']} Hz, wall "
            f"{prof['seconds']:.1f} s under the profiler, `--idle` so I/O waits count; main thread only).",
            "",
            "Inclusive share of samples, our code by line:",
            "",
        ]
        lines += [f"- {share}% `{fn}`" for fn, share in prof["inclusive"][:18]]
        lines += ["", "Self share (leaf functions):", ""]
        lines += [f"- {share}% `{fn}`" for fn, share in prof["self"][:12]]
        lines.append("")
    for note in report.get("notes", []):
        lines.append(f"- {note}")
    lines.append(f"<!-- bench:{sid} end -->")
    return "\n".join(lines) + "\n"


def _cache_line(steps: list[dict]) -> str:
    warm = [r for r in steps if r.get("cache") == "warm"]
    if warm:
        w = [r["extra"]["warmed"] for r in warm if (r.get("extra") or {}).get("warmed")]
        grown = min((x["cached_growth"] / max(x["bytes"], 1) for x in w), default=0)
        return (
            "`cold` steps start with a dropped page cache; `warm` steps with a dropped page cache into which the input "
            "was then read once, untimed (as right after a download; the page cache grew by at least "
            f"{100 * grown:.0f}% "
            "of the input each time)."
        )
    if all(r["cold_cache"] for r in steps):
        return "dropped before every step (cold cache)."
    return "NOT dropped (warm cache for some steps): compare with care."


def _paired_lines(report: dict) -> list[str]:
    """Recomputed from the steps (so a report written before a change of definition renders with the current one)."""
    steps = [StepResult(**r) for r in report["steps"]]
    by_cache = {c: paired_ratios(steps, c) for c in dict.fromkeys(r.cache for r in steps)}
    lines = []
    for cache, pr in by_cache.items():
        if not pr:
            continue
        lines += [
            f"Paired rounds, {cache} page cache (each `ours` against the `cp` run just before it): ours / cp = "
            + ", ".join(f"{p['ratio']:.2f}" for p in pr["pairs"])
            + f"; median {pr['median_ratio']:.2f}. cp took {pr['cp_range'][0]:.1f} to {pr['cp_range'][1]:.1f} s, "
            f"ours {pr['ours_range'][0]:.1f} to {pr['ours_range'][1]:.1f} s.",
            "",
        ]
    return lines


def _step_notes(r: dict, steps: list[dict]) -> list[str]:
    """One line per verify/floor/push step: what it ran and what came out."""
    extra = r.get("extra") or {}
    out = []
    if r["step"] in ("verify", "verify-short") and extra.get("report"):
        v = extra["report"]
        st = v.get("settings") or {}
        checks = ", ".join(f"{c['name']} {c['status']} {c.get('seconds', 0):.1f} s" for c in v.get("checks", []))
        out.append(
            f"- {r['step']}: exit {r['returncode']}, dtype {st.get('dtype')}, {len(st.get('prompts') or [])} prompts, "
            f"{st.get('max_new_tokens')} new tokens; {checks}"
        )
        checks = {c["name"]: c for c in v.get("checks", [])}
        secs = {
            **((checks.get("logits") or {}).get("numbers") or {}).get("seconds", {}),
            **((checks.get("generation") or {}).get("numbers") or {}).get("seconds", {}),
        }
        fwd = secs.get("reference_forward", 0.0) + secs.get("converted_forward", 0.0)
        if fwd and r.get("seconds"):
            data = ((checks.get("files") or {}).get("numbers") or {}).get("data_pass") or {}
            data_gb = (data.get("converted_bytes", 0) + data.get("original_bytes", 0)) / 1e9
            out.append(
                f"- {r['step']}: its own prompt forwards (timed inside the run; a prefix that prompts share is "
                f"computed once per model) took "
                f"{fwd:.1f} s "
                f"(reference {secs.get('reference_forward', 0):.1f}, converted "
                f"{secs.get('converted_forward', 0):.1f}); "
                f"wall / forward passes = {r['seconds'] / fwd:.2f}; decode {secs.get('reference_decode', 0):.1f} + "
                f"{secs.get('converted_decode', 0):.1f} s, loads {secs.get('reference_load', 0):.1f} + "
                f"{secs.get('converted_load', 0):.1f} s"
                + (
                    f"; the data pass read {data.get('converted_bytes', 0) / 1e9:.2f} GB converted + "
                    f"{data.get('original_bytes', 0) / 1e9:.2f} GB original in {data.get('seconds', 0):.1f} s "
                    f"({data_gb / max(data.get('seconds', 0), 1e-9):.2f} GB/s; "
                    "its time is counted in `files`, the first check to use it)"
                    if data
                    else ""
                )
            )
        floor = next((x for x in steps if x["step"] == "floor" and (x.get("extra") or {}).get("floor")), None)
        if r["step"] == "verify" and floor and r.get("seconds"):
            f = floor["extra"]["floor"]
            out.append(
                f"- verify / floor = {r['seconds']:.1f} / {f['floor_s']:.1f} s = {r['seconds'] / f['floor_s']:.2f} "
                f"(floor: the forward passes alone, {len(f['prompts'])} prompts x 2 models, {f['dtype']})"
            )
    if r["step"] == "floor" and extra.get("floor"):
        f = extra["floor"]
        out.append(
            f"- floor: {f['floor_s']:.1f} s of forward passes, {f['dtype']}, {len(f['prompts'])} prompts of "
            f"{min(f['tokens'])}-{max(f['tokens'])} tokens: reference {sum(f['reference_forward_s']):.1f} s "
            f"(load {f['reference_load_s']:.1f} s), converted {sum(f['converted_forward_s']):.1f} s (load "
            f"{f['converted_load_s']:.1f} s); the step's wall time includes the loads and the tokenization"
        )
    if r["step"] == "push" and extra.get("push"):
        pu = extra["push"]
        ver = pu.get("verification") or {}
        out.append(
            f"- push: exit {pu['exit']}, Hub calls {' -> '.join(pu['calls'])}; {pu.get('commits')} commit of "
            f"{pu.get('files_pushed')} files ({(pu.get('bytes_pushed') or 0) / 1e9:.2f} GB), every sha256 as in the "
            f"manifest: {pu.get('hashes_match_manifest')}, added {', '.join(pu.get('extra_files') or [])}; the gate's "
            f"verification: passed {ver.get('passed')}, {ver.get('dtype')}, {ver.get('prompts')} prompts; "
            + ", ".join(f"{k} {v[0]} {v[1]} s" for k, v in (ver.get("checks") or {}).items())
        )
    return out


def write_md(report: dict, path: Path = BENCHMARKS_MD) -> None:
    section = markdown(report)
    header = (
        "# Benchmarks\n\nWritten by `python -m bench.run --write-md`; one section per size, replaced on every run "
        "of that size. See `bench/run.py` for what is measured and how.\n\n"
    )
    text = path.read_text() if path.exists() else header
    sid = re.escape(report.get("section") or report["size"])
    pat = re.compile(rf"<!-- bench:{sid} start -->.*?<!-- bench:{sid} end -->\n", re.S)
    text = pat.sub(lambda _: section, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------


def ensure_input(workdir: Path, size: str, seed: int, limit: int | None, drop: bool) -> dict:
    inp = workdir / "input"
    rec_path = inp / "checkpoint.json"
    if rec_path.is_file():
        rec = json.loads(rec_path.read_text())
        if rec.get("size") == size and rec.get("seed") == seed:
            print(f"reusing {inp} ({rec['original_bytes'] / 1e9:.2f} GB)", flush=True)
            return rec
    if inp.exists():
        shutil.rmtree(inp)
    print(f"generating the {size} checkpoint into {inp} ...", flush=True)
    res = run_step(
        "generate",
        [sys.executable, "-m", "bench.make_checkpoint", str(inp), "--size", size, "--seed", str(seed)],
        limit,
        None,
        drop,
        workdir / "generate.log",
    )
    if res.returncode != 0:
        raise SystemExit(f"checkpoint generation failed (exit {res.returncode}):\n{res.tail}")
    rec = json.loads(rec_path.read_text())
    rec["generate_seconds"] = res.seconds
    rec["generate_peak_anon"] = res.peak_anon_bytes
    rec_path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    print(
        f"  {res.seconds:.1f} s, peak anon {_gb(res.peak_anon_bytes)}, {rec['original_bytes'] / 1e9:.2f} GB", flush=True
    )
    return rec


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["mini", "7b", "13b"])
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default /tmp/vipllava-bench-SIZE)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint and our output afterwards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument(
        "--mem-limit-gb", type=float, default=20.0, help="kill a step whose tree exceeds this much anonymous memory"
    )
    ap.add_argument("--verify-timeout", type=float, default=1800.0)
    ap.add_argument(
        "--short-dtype",
        default="bfloat16",
        choices=["float32-blocks", "bfloat16", "float32"],
        help="--dtype of the verify-short step (default bfloat16: the short form as issue 14 states it)",
    )
    ap.add_argument("--verify-args", default="", help="extra arguments for python -m verify (e.g. '--dtype bfloat16')")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run cp and ours this many times, interleaved (cp, ours, cp, ours, ...), "
        "and report each ours/cp ratio and their median; baseline and verify run in the first round only",
    )
    ap.add_argument(
        "--cache",
        choices=["cold", "warm", "both"],
        default="cold",
        help="page cache before each cp/ours run: cold (dropped), warm (the input read into it first, as right "
        "after a download) or both (every round runs cp, ours cold, then cp, ours warm)",
    )
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--profile", action="store_true", help="one more run of ours under py-spy (not timed in the table)")
    ap.add_argument(
        "--json", type=Path, default=None, help="where to write the report (default WORKDIR/../bench-SIZE.json)"
    )
    ap.add_argument("--write-md", action="store_true", help=f"put the table into {BENCHMARKS_MD.name}")
    ap.add_argument("--note", action="append", default=[], help="a note for BENCHMARKS.md (repeatable)")
    ap.add_argument("--section", help="name of the BENCHMARKS.md section to replace (default: the size)")
    ap.add_argument(
        "--md-from", type=Path, metavar="JSON", help="only re-render BENCHMARKS.md from a report this tool wrote"
    )
    return ap


@dataclass
class _Bench:
    """One benchmark run: its options, folders and the results so far (saved after every step)."""

    args: argparse.Namespace
    workdir: Path
    limit: int
    drop: bool
    states: list[str]
    report: dict
    report_path: Path
    results: list[StepResult] = field(default_factory=list)
    verify_dtype: str = "float32-blocks"
    round_: int = 1

    @property
    def original(self) -> Path:
        return self.workdir / "input" / "original"

    @property
    def ours_out(self) -> Path:
        return self.workdir / "out-ours"

    def sources(self) -> list[str]:
        inp = self.workdir / "input"
        return [
            "--original",
            str(inp / "original"),
            "--text-model",
            str(inp / "text-model"),
            "--vision-model",
            str(inp / "vision-model"),
        ]

    def save(self) -> None:
        """The report so far (after every step: a run stopped early keeps what it measured)."""
        report, states = self.report, self.states
        report["steps"] = [asdict(r) for r in self.results]
        report["paired"] = paired_ratios(self.results, states[0] if len(states) == 1 else "cold")
        report["paired_by_cache"] = {c: paired_ratios(self.results, c) for c in states}
        report["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
        self.report_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")

    def show(self, r: StepResult) -> None:
        r.round = self.round_
        self.results.append(r)
        print(
            f"  {r.step}: {r.seconds:.1f} s, peak anon {_gb(r.peak_anon_bytes)}, peak rss {_gb(r.peak_rss_bytes)}, "
            f"exit {r.returncode}{', killed: ' + r.killed if r.killed else ''}",
            flush=True,
        )
        self.save()


def _step_cp(b: _Bench, warm: Path | None) -> None:
    shutil.rmtree(b.ours_out, ignore_errors=True)  # free its space (13B: input + two copies fill the disk)
    dst = b.workdir / "cp-scratch"
    shutil.rmtree(dst, ignore_errors=True)
    r = run_step("cp", ["cp", "-r", str(b.original), str(dst)], b.limit, None, b.drop, b.workdir / "cp.log", warm=warm)
    t = time.perf_counter()
    subprocess.run(["sync", *[str(p) for p in sorted(dst.iterdir())]], check=False)
    r.extra["fsync_seconds"] = round(time.perf_counter() - t, 2)
    r.output_bytes = du(dst)
    shutil.rmtree(dst, ignore_errors=True)
    b.show(r)


def _step_baseline(b: _Bench, warm: Path | None) -> None:
    dst = b.workdir / "out-baseline"
    shutil.rmtree(dst, ignore_errors=True)
    jpath = b.workdir / "baseline-phases.json"
    jpath.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.baseline", *b.sources(), "--output", str(dst), "--json", str(jpath)]
    r = run_step("baseline", cmd, b.limit, None, b.drop, b.workdir / "baseline.log")
    if jpath.is_file():
        r.extra["phases"] = json.loads(jpath.read_text())["phases"]
    r.output_bytes = du(dst) if dst.exists() else None
    shutil.rmtree(dst, ignore_errors=True)
    b.show(r)


def _step_ours(b: _Bench, warm: Path | None) -> None:
    shutil.rmtree(b.ours_out, ignore_errors=True)
    jpath = b.workdir / "ours-summary.json"
    cmd = [sys.executable, "-m", "convert", *b.sources(), "--output", str(b.ours_out), "--quiet", "--json", str(jpath)]
    r = run_step("ours", cmd, b.limit, None, b.drop, b.workdir / "ours.log", warm=warm)
    if jpath.is_file():
        s = json.loads(jpath.read_text())
        r.extra["converter"] = s
        r.extra["summary"] = (
            f"{s['mapped']} tensors mapped, {s['dropped']} dropped, rows {s['original_rows']} -> "
            f"{s['rows']}, {s['shards']} shards, {s['output_bytes'] / 1e9:.2f} GB, "
            f"its own clock {s['seconds']:.1f} s"
        )
    r.output_bytes = du(b.ours_out) if b.ours_out.exists() else None
    b.show(r)


def _step_verify(b: _Bench, step: str) -> None:
    if not (b.ours_out / "conversion.json").is_file():
        print("  skipped: no output of ours to verify", flush=True)
        return
    vjson = b.workdir / f"{step}-report.json"
    vjson.unlink(missing_ok=True)
    extra_args = shlex.split(b.args.verify_args) if step == "verify" else [*SHORT_VERIFY, "--dtype", b.args.short_dtype]
    cmd = [sys.executable, "-m", "verify", str(b.ours_out), "--json", str(vjson), "--quiet", *extra_args]
    r = run_step(step, cmd, b.limit, b.args.verify_timeout, b.drop, b.workdir / f"{step}.log")
    if vjson.is_file():
        v = json.loads(vjson.read_text())
        r.extra["report"] = v
        if step == "verify":
            b.verify_dtype = (v.get("settings") or {}).get("dtype") or b.verify_dtype
    b.show(r)


def _step_floor(b: _Bench, warm: Path | None) -> None:
    if not (b.ours_out / "conversion.json").is_file():
        print("  skipped: no output of ours", flush=True)
        return
    fjson = b.workdir / "floor.json"
    fjson.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bench.floor", str(b.ours_out), "--dtype", b.verify_dtype, "--json", str(fjson)]
    r = run_step("floor", cmd, b.limit, b.args.verify_timeout, b.drop, b.workdir / "floor.log")
    if fjson.is_file():
        r.extra["floor"] = json.loads(fjson.read_text())
    b.show(r)


def _step_push(b: _Bench, warm: Path | None) -> None:
    dst = b.workdir / "out-push"
    shutil.rmtree(dst, ignore_errors=True)
    pjson = b.workdir / "push.json"
    pjson.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.push",
        "--json",
        str(pjson),
        "--",
        *b.sources(),
        "--output",
        str(dst),
        "--quiet",
    ]
    r = run_step("push", cmd, b.limit, b.args.verify_timeout, b.drop, b.workdir / "push.log")
    if pjson.is_file():
        r.extra["push"] = json.loads(pjson.read_text())
    shutil.rmtree(dst, ignore_errors=True)
    b.show(r)


_STEPS: dict[str, Callable[[_Bench, Path | None], None]] = {
    "cp": _step_cp,
    "baseline": _step_baseline,
    "ours": _step_ours,
    "verify": lambda b, warm: _step_verify(b, "verify"),
    "verify-short": lambda b, warm: _step_verify(b, "verify-short"),
    "floor": _step_floor,
    "push": _step_push,
}


def _profile(b: _Bench) -> None:
    """One more run of ours under py-spy (not timed in the table)."""
    prof_out = b.workdir / "out-ours-profiled"
    shutil.rmtree(prof_out, ignore_errors=True)
    raw = b.workdir / "ours-pyspy.txt"
    rate = 20
    conv = [sys.executable, "-m", "convert", *b.sources(), "--output", str(prof_out), "--quiet"]
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy not installed (pip install py-spy): no profile", file=sys.stderr)
        return
    print("profiling ours under py-spy ...", flush=True)
    r = run_step(
        "ours-profiled",
        [spy, "record", "--format", "raw", "--rate", str(rate), "--idle", "--output", str(raw), "--", *conv],
        b.limit,
        None,
        b.drop,
        b.workdir / "ours-pyspy.log",
    )
    shutil.rmtree(prof_out, ignore_errors=True)
    if raw.is_file():
        b.report["profile"] = {"rate": rate, "seconds": r.seconds, **summarize_collapsed(raw)}


def _render_only(args: argparse.Namespace) -> int:
    report = json.loads(args.md_from.read_text())
    report["notes"] = report.get("notes", []) + list(args.note)
    if args.section:
        report["section"] = args.section
    write_md(report)
    print(f"wrote {BENCHMARKS_MD} from {args.md_from}")
    return 0


def _start(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> _Bench:
    """Check the options, make the work folder and the input checkpoint, and start the report."""
    if not args.size:
        ap.error("--size is required (unless --md-from)")
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        ap.error(f"--steps: unknown {', '.join(unknown)}")
    workdir = (args.workdir or Path(f"/tmp/vipllava-bench-{args.size}")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    limit = int(args.mem_limit_gb * 1e9)
    drop = not args.no_drop_caches
    if drop and not os.access("/proc/sys/vm/drop_caches", os.W_OK):
        print("cannot drop the page cache here (not root): steps run warm-cache", file=sys.stderr)
        drop = False
    report: dict = {
        "size": args.size,
        "seed": args.seed,
        "date": _sh("date -u"),
        "command": "python -m bench.run " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(workdir),
        "steps": [],
        "notes": list(args.note),
        "section": args.section,
    }
    report["generator"] = ensure_input(workdir, args.size, args.seed, limit, drop)
    states = ["cold", "warm"] if args.cache == "both" else [args.cache]
    report_path = args.json or workdir.parent / f"bench-{args.size}.json"
    return _Bench(args, workdir, limit, drop, states, report, report_path)


def _plan(b: _Bench) -> list[tuple[int, str, str]]:
    """(round, step, cache): the cp/ours rounds first (each state in turn), then the steps that use the last output
    of ours."""
    steps = [s.strip() for s in b.args.steps.split(",") if s.strip()]
    rounds = range(1, max(1, b.args.repeat) + 1)
    plan = [(k, s, c) for k in rounds for c in b.states for s in ("cp", "ours") if s in steps]
    return plan + [(1, s, "cold") for s in STEPS if s in steps and s not in ("cp", "ours")]


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.md_from:
        return _render_only(args)
    b = _start(ap, args, argv)
    for round_, step, cache in _plan(b):
        b.round_ = round_
        print(
            f"step {step}"
            + (f" (round {round_})" if args.repeat > 1 else "")
            + (f", {cache} cache" if len(b.states) > 1 else "")
            + " ...",
            flush=True,
        )
        _STEPS[step](b, b.original if cache == "warm" else None)
    if args.profile:
        _profile(b)
    if not args.keep:
        shutil.rmtree(b.ours_out, ignore_errors=True)
        shutil.rmtree(b.workdir / "input", ignore_errors=True)
    b.save()
    print()
    print(table(b.results))
    for c, pr in b.report["paired_by_cache"].items():
        if pr:
            print(
                f"\n{c} cache: ours / cp per round: {', '.join(str(p['ratio']) for p in pr['pairs'])}; median "
                f"{pr['median_ratio']}"
            )
    print(f"\nreport: {b.report_path}")
    if args.write_md:
        write_md(b.report)
        print(f"wrote {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
