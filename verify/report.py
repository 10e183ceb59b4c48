"""Check results and the report: a readable table on stdout and JSON for machines."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from convert.safejson import clean as _printable  # names from files: no newline or escape code reaches the table

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"


@dataclass
class Check:
    name: str
    status: str  # PASS | FAIL | WARN (passed, with something worth a look)
    summary: str  # one line, with the measured numbers
    numbers: dict = field(default_factory=dict)
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status == FAIL


def _clean(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


@dataclass
class Report:
    repo: str
    checks: list[Check] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)  # tool, transformers, torch, python that produced the report

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)

    @property
    def failed_checks(self) -> list[str]:
        return [c.name for c in self.checks if c.failed]

    def get(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def table(self) -> str:
        w = max([len(c.name) for c in self.checks] + [5])
        head = f"verify {_printable(self.repo)}"
        if self.settings.get("backbone"):
            head += f"  (backbone {self.settings['backbone']}, original prompt mode {self.settings.get('conv_mode')})"
        lines = [head, f"{'check':<{w}}  result  {'seconds':>7}  numbers", "-" * (w + 60)]
        for c in self.checks:
            lines.append(f"{c.name:<{w}}  {c.status:<6}  {c.seconds:>7.2f}  {_printable(c.summary)}")
            for d in c.details[:8]:
                lines.append(f"{'':<{w}}          {'':>7}    - {_printable(d, 300)}")
            if len(c.details) > 8:
                lines.append(f"{'':<{w}}          {'':>7}    - ... {len(c.details) - 8} more (see --json)")
        verdict = "ALL CHECKS PASSED" if self.passed else f"FAILED: {', '.join(self.failed_checks)}"
        lines.append("-" * (w + 60))
        lines.append(verdict)
        return "\n".join(lines)

    def to_json(self) -> str:
        data = {
            "repo": self.repo,
            "passed": self.passed,
            "failed_checks": self.failed_checks,
            "settings": self.settings,
            "environment": self.environment,
            "checks": [asdict(c) for c in self.checks],
        }
        return json.dumps(_clean(data), indent=2, sort_keys=True) + "\n"
