"""The forward-pass floor of ``python -m verify``: one forward pass per model and prompt, nothing else timed.

    python -m bench.floor REPO [--dtype NAME] [--prompts FILE] [--json OUT]

The same inputs verify would build for REPO (its default prompts unless ``--prompts``; ids and pixels from the
reference's tokenizer and preprocessing, not timed): the reference of the original is loaded and run once on every
prompt, then dropped; then the converted model (``from_pretrained``, as verify loads it) is loaded and run once on
every prompt. Loads and forwards are timed separately; the floor is the sum of the forward passes, each in the
arithmetic verify uses for the same ``--dtype`` (default: verify's default for the repo), with the page cache
managed as verify manages it (``Context.weight_stream``: a model larger than the page cache keeps a head of its
blocks resident and streams the rest). ``bench.run`` runs it beside verify, in the same session, so
``verify wall / floor`` compares like with like.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", type=Path)
    ap.add_argument("--dtype", default=None, help="as verify's --dtype (default: verify's default for the repo)")
    ap.add_argument("--prompts", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from verify.cli import _load_prompts
    from verify.context import Context

    torch.set_grad_enabled(False)
    ctx = Context(args.repo, prompts=_load_prompts(str(args.prompts)) if args.prompts else None, dtype=args.dtype)
    out: dict = {"repo": str(args.repo), "dtype": ctx.dtype_name, "prompts": [p["name"] for p in ctx.prompts]}

    t = time.perf_counter()
    ref = ctx.reference
    out["reference_load_s"] = round(time.perf_counter() - t, 2)
    inputs = ctx.parity_inputs  # tokenization and preprocessing (not timed as forward)
    out["tokens"] = [len(x["expanded"]) for x in inputs]
    times = []
    with ctx.weight_stream("reference", ref.vision, ref.llm), ctx.arithmetic_context(ref.llm, ref.vision):
        for x in inputs:
            t = time.perf_counter()
            ref.forward(x["ids"], x["images"] or None)
            times.append(round(time.perf_counter() - t, 2))
            print(f"reference {x['name']}: {times[-1]:.1f} s", flush=True)
    out["reference_forward_s"] = times
    del ref
    ctx.__dict__.pop("reference", None)
    gc.collect()

    t = time.perf_counter()
    model = ctx.model
    out["converted_load_s"] = round(time.perf_counter() - t, 2)
    times = []
    with ctx.weight_stream("converted", model), ctx.arithmetic_context(model):
        for x in inputs:
            kw = {"pixel_values": x["pixels"]} if x["pixels"] is not None else {}
            t = time.perf_counter()
            model(input_ids=torch.tensor([x["expanded"]]), **kw)
            times.append(round(time.perf_counter() - t, 2))
            print(f"converted {x['name']}: {times[-1]:.1f} s", flush=True)
    out["converted_forward_s"] = times
    out["page_cache"] = ctx.page_cache
    out["floor_s"] = round(sum(out["reference_forward_s"]) + sum(out["converted_forward_s"]), 2)
    print(
        f"floor: {out['floor_s']:.1f} s of forward passes ({len(inputs)} prompts x 2 models); loads "
        f"{out['reference_load_s']:.1f} + {out['converted_load_s']:.1f} s",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
