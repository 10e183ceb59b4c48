"""Run the CLIs many times, fast, each run in its own process with a memory cap, measured.

``python tests/forkrun.py`` imports the converter, the verifier and their libraries once, then for each request
(one JSON line on stdin) forks a child that runs ``convert.cli.main`` or ``verify.cli.main`` with its stdout and
stderr sent to files (file descriptors 1 and 2 themselves, so a C library's or a logger's output is caught too)
under ``RLIMIT_AS``. The parent answers one JSON line: exit code, wall time, the child's peak resident memory
(``ru_maxrss``) and the server's own at fork time (the child starts with those pages, so the run's own cost is
the difference). The server itself never runs a torch operation, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(req: dict) -> int:
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.update(req.get("env", {}))
    os.chdir(req["cwd"])
    limit = _vm_bytes() + req["extra_address_space"]
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    torch.set_num_threads(1)
    if req["tool"] == "convert":
        from convert.cli import main
    else:
        from verify.cli import main
    try:
        return main(req["argv"])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    except BaseException:
        traceback.print_exc()
        return 99


def serve() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import safetensors.torch  # noqa: F401
    import sentencepiece  # noqa: F401
    import torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    from transformers import (  # noqa: F401
        LlamaTokenizer,
        LlamaTokenizerFast,
        PreTrainedTokenizerFast,
        VipLlavaConfig,
        VipLlavaForConditionalGeneration,
    )

    import convert.cli  # noqa: F401
    import convert.pipeline  # noqa: F401
    import verify.api  # noqa: F401
    import verify.cli  # noqa: F401
    import verify.context  # noqa: F401

    out = os.fdopen(os.dup(1), "w", buffering=1)
    out.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sys.stdout.flush()
        sys.stderr.flush()
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            code = 99
            try:
                code = _child(req)
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code if isinstance(code, int) and 0 <= code < 256 else 98)
        deadline = t0 + req["timeout"]
        while True:
            done, status, ru = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() > deadline:
                os.kill(pid, 9)
                done, status, ru = os.wait4(pid, 0)
                break
            time.sleep(0.01)
        out.write(
            json.dumps(
                {
                    "code": os.waitstatus_to_exitcode(status),
                    "seconds": time.perf_counter() - t0,
                    "maxrss_kb": ru.ru_maxrss,
                    "base_kb": base,
                }
            )
            + "\n"
        )


class Runner:
    """The test side: start the server once, then ``run(...)`` per row."""

    def __init__(self, cwd: str, env: dict | None = None):
        import subprocess

        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={**os.environ, **(env or {})},
        )
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError("the fork server did not start")

    def run(
        self,
        tool: str,
        argv: list[str],
        workdir: str,
        timeout: float = 60.0,
        extra_address_space: int = 3 << 30,
        env: dict | None = None,
    ) -> dict:
        req = {
            "tool": tool,
            "argv": argv,
            "cwd": workdir,
            "stdout": os.path.join(workdir, "stdout.txt"),
            "stderr": os.path.join(workdir, "stderr.txt"),
            "timeout": timeout,
            "extra_address_space": extra_address_space,
            "env": env or {},
        }
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        with open(req["stdout"], errors="replace") as f:
            reply["stdout"] = f.read()
        with open(req["stderr"], errors="replace") as f:
            reply["stderr"] = f.read()
        return reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
