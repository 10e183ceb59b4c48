"""The matrix: the reference probe (this environment), every version's environment and probe, the verdicts, and
their table and JSON."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..report import json_safe
from .envs import EnvError, ensure_env
from .judges import LOGITS_TOL, Row, expected_settings, judge
from .probing import Probe, repo_json, run_probe
from .releases import VERSIONS, CompatUsageError, capabilities, check_version

DEFAULT_JOBS = 2  # probes at once (each runs torch on one thread)


@dataclass
class Matrix:
    repo: str
    reference: Row
    rows: list[Row]
    tolerance: float
    seconds: float
    reference_versions: dict = field(default_factory=dict)
    model_type: str | None = None  # text_config.model_type (llama, phi3)

    @property
    def passed(self) -> bool:
        return self.reference.passed and all(r.passed for r in self.rows)

    def table(self) -> str:
        rows = [self.reference, *self.rows]
        cells = [_cells(row, row is self.reference) for row in rows]
        widths = [max(len(str(c)) for c in col) for col in zip(HEAD, *cells, strict=True)]

        def fmt(cells: list[str]) -> str:
            return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
        out = [
            f"compat {self.repo}  (reference: this environment; logits tolerance {self.tolerance:g} fp32)",
            fmt(HEAD),
            rule,
        ]
        for row, row_cells in zip(rows, cells, strict=True):
            out.append(fmt(row_cells))
            out.extend(_said(row))
        out.append(rule)
        failed = [r.label for r in rows if not r.passed]
        na = [r.label for r in self.rows if not r.applicable]
        out.append(
            (f"ALL VERSIONS PASSED ({self.seconds:.1f} s)" + (f"; not applicable: {', '.join(na)}" if na else ""))
            if not failed
            else f"FAILED: {', '.join(failed)}"
        )
        return "\n".join(out)

    def to_json(self) -> str:
        data = {
            "repo": self.repo,
            "passed": self.passed,
            "tolerance": self.tolerance,
            "seconds": round(self.seconds, 2),
            "reference_versions": self.reference_versions,
            "reference": {**asdict(self.reference), "verdict": self.reference.verdict},
            "model_type": self.model_type,
            "rows": [{**asdict(r), "verdict": r.verdict} for r in self.rows],
        }
        return json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n"


HEAD = [
    "transformers",
    "env",
    "load",
    "keys m/u/x",
    "settings",
    "tokenizer",
    "processor",
    "recipe",
    "image tokens",
    "max|logits diff|",
    "greedy",
    "attention",
    "verdict",
]


def _cells(row: Row, reference: bool) -> list[str]:
    """One row of the table (``reference``: the current environment's)."""
    e = row.env
    if reference:
        env_s = "this python"
    elif e.get("error"):
        env_s = "unavailable"
    else:
        env_s = f"{'new' if e.get('created') else 'cached'} {e.get('create_seconds', 0):.1f}s"
    label = f"{row.transformers} (current)" if reference else row.label
    if not row.applicable:
        return [label, env_s, "n/a", "-", "-", "-", "-", "-", "-", "-", "-", "-", row.verdict]
    diff = "-" if row.logits_max_diff is None else ("0" if row.logits_max_diff == 0 else f"{row.logits_max_diff:.2e}")
    if reference and row.logits_max_diff is not None:
        diff = "(reference)"
    processor = (
        _ok(row.processor_ok and row.image_tokens_ok) if row.processor_required or row.processor_ok else "cannot"
    )
    if not row.recipe_ok:
        recipe = "FAIL" if not row.processor_required else "differs (not needed)"
    else:
        recipe = "ok" if not row.recipe_logits_max_diff else f"ok {row.recipe_logits_max_diff:.1e}"
    uniq = sorted(set(row.image_tokens))
    tokens = "-" if not uniq else ",".join(map(str, uniq))
    if not row.processor_required:  # the recipe's ids
        tokens += " (recipe, model expands)" if capabilities(row.transformers).collapse else " (recipe)"
    elif not row.image_tokens_ok:
        tokens += " FAIL"
    keys = f"{_n(row.missing)}/{_n(row.unexpected)}/{_n(row.mismatched)}"
    attention = "-" if row.needs_eager is None else "eager only" if row.needs_eager else "default"
    return [
        label,
        env_s,
        _ok(row.load_ok),
        keys,
        _ok(row.settings_ok),
        _ok(row.tokenizer_ok),
        processor,
        recipe,
        tokens,
        diff,
        _ok(row.greedy_ok),
        attention,
        row.verdict,
    ]


def _said(row: Row) -> list[str]:
    """The lines under a row: its failures (the first 8), what it cannot do, its first note."""
    out = [f"    - {d}" for d in row.details[:8]]
    if len(row.details) > 8:
        out.append(f"    - ... {len(row.details) - 8} more (see --json)")
    out.extend(f"    cannot: {c}" for c in row.cannot)
    if row.notes:
        out.append(
            f"    note: {row.notes[0]}"
            + (f" (+{len(row.notes) - 1} more such notes in --json)" if len(row.notes) > 1 else "")
        )
    return out


def _n(v) -> str:
    return "-" if v is None else str(v)


def _ok(v: bool) -> str:
    return "ok" if v else "FAIL"


def run_matrix(
    repo: str | Path,
    versions=VERSIONS,
    envs_dir: Path | None = None,
    create: bool = True,
    prompts: list[dict] | None = None,
    images: dict | None = None,
    tol: float = LOGITS_TOL,
    keep: Path | None = None,
    timeout: float = 1800,
    jobs: int | None = None,
    log=None,
) -> Matrix:
    """Probe the current environment (the reference) and each version's environment; judge every row."""
    repo = Path(repo)
    if not repo.is_dir() or not (repo / "config.json").is_file():
        raise CompatUsageError(f"{repo}: not a converted repo (no config.json)")
    versions = [check_version(v) for v in versions]
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    if prompts is None or images is None:
        from ..samples import sample_images, sample_prompts

        prompts = sample_prompts() if prompts is None else prompts
        images = sample_images() if images is None else images
    work = Path(tempfile.mkdtemp(prefix="vipllava-compat-")) if keep is None else Path(keep)
    work.mkdir(parents=True, exist_ok=True)
    try:
        run = _Run(
            repo,
            work,
            prompts,
            _save_images(work, images, prompts),
            expected_settings(repo),
            (repo_json(repo, "config.json").get("text_config") or {}).get("model_type"),
            tol,
            timeout,
        )
        log("probing the current environment (reference) ...")
        ref = run.reference()
        ref_row = run.judge(ref, ref)
        # environments one at a time (creation times stay meaningful), then the probes in parallel
        envs = {v: _env(v, envs_dir, create, log) for v in versions}
        workers = max(1, min(len(versions), jobs or DEFAULT_JOBS))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            rows = list(pool.map(lambda v: run.version_row(v, envs[v], ref, log), versions))
        return Matrix(
            str(repo),
            ref_row,
            rows,
            tol,
            time.perf_counter() - t0,
            (ref.result or {}).get("versions", {}),
            run.model_type,
        )
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _save_images(work: Path, images: dict, prompts: list[dict]) -> dict:
    """The images the prompts use, as PNG files in ``work/images`` (lossless: the probe reads back the same
    pixels)."""
    (work / "images").mkdir(exist_ok=True)
    image_files = {}
    for name, im in images.items():
        image_files[name] = work / "images" / f"{name}.png"
        im.save(image_files[name])
    used = {p["image"] for p in prompts if p.get("image")}
    return {k: v for k, v in image_files.items() if k in used}


def _env(version: str, envs_dir: Path | None, create: bool, log) -> dict | str:
    """The environment's :class:`~verify.compat.envs.EnvInfo` as a dict, or why there is none."""
    try:
        return asdict(ensure_env(version, envs_dir, create=create, log=log))
    except EnvError as e:
        return str(e)


@dataclass
class _Run:
    """What every probe of one matrix shares."""

    repo: Path
    work: Path
    prompts: list[dict]
    image_files: dict
    expected: dict
    model_type: str | None
    tol: float
    timeout: float

    def judge(self, probe: Probe, ref: Probe) -> Row:
        return judge(probe, ref, self.expected, self.prompts, self.tol, model_type=self.model_type)

    def reference(self) -> Probe:
        """The probe in this environment, on its own processor's inputs."""
        ref = run_probe(
            "current", sys.executable, self.repo, self.work, self.prompts, self.image_files, None, self.timeout
        )
        ref.env = {"python": sys.executable}
        if ref.error is None and not all(f"own_ids_{i}" in ref.tensors for i in range(len(self.prompts))):
            ref.error = f"the reference processor failed: {(ref.result.get('errors') or {}).get('processor')}"
        return ref

    def version_row(self, v: str, env: dict | str, ref: Probe, log) -> Row:
        """The row of transformers ``v``: its probe in its environment (``env``, or why there is none), on the
        reference's inputs."""
        if isinstance(env, str):
            return self.judge(Probe(v, error=f"environment: {env}", env={"error": env}), ref)
        if ref.error:
            p = Probe(v, error="no reference (the current environment's probe failed)", env=env)
        else:
            log(f"probing transformers {v} ...")
            p = run_probe(
                v,
                env["python"],
                self.repo,
                self.work,
                self.prompts,
                self.image_files,
                self.work / "current" / "tensors.npz",
                self.timeout,
                collapse=capabilities(v).collapse,
            )
            p.env = env
        row = self.judge(p, ref)
        if row.transformers not in (None, v):
            row.passed = False
            row.details.append(f"the environment ran transformers {row.transformers}, not {v}")
        return row
