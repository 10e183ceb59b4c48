"""The baseline users have today: the upstream one-shot script (transformers'
``models/vipllava/convert_vipllava_weights_to_hf.py``) restated step for step, so its cost can be measured on the
same files as ``python -m convert``.

    python -m bench.baseline --original DIR --text-model DIR --vision-model DIR --output DIR [--json FILE]

What it does, as upstream did:
1. ``torch.set_default_dtype(torch.float16)``; text config, tokenizer (+ ``<image>``, ``<pad>``) and CLIP image
   processor from the base models; ``VipLlavaConfig(text_config=...)``, ``pad_token_id`` = vocab + 1.
2. The model built on the meta device (``with torch.device("meta"): VipLlavaForConditionalGeneration(config)``).
3. EVERY shard loaded fully into memory with ``torch.load`` (here ``weights_only=True``; no mmap), merged into one
   dict (upstream loaded one consolidated ``model_state_dict_7b.bin``: the same bytes in memory).
4. Keys renamed by chained ``str.replace`` over a dict of substrings (order-dependent), ``inv_freq`` skipped.
5. ``load_state_dict(strict=True, assign=True)``.
6. mu and Sigma of the original embedding rows, Sigma formed explicitly (``(E - mu)^T (E - mu) / n``: ~1 TFLOP at
   32000 x 4096), ``MultivariateNormal(mu, covariance_matrix=1e-5 * Sigma)``.
7. ``resize_token_embeddings(vocab + 2, pad_to_multiple_of=64)``, then the new rows of embed_tokens and lm_head
   drawn ONE ROW AT A TIME with ``dist.sample()`` (unseeded upstream; seeded here so runs are comparable).
8. ``save_pretrained`` (safetensors) of model and processor (upstream pushed them to the Hub).

Adapted only where transformers 5.24 would otherwise refuse to run it at all, none of which changes its cost:
the rename table targets 5.x module names (``model.language_model.*``, ``model.vision_tower.*``,
``model.multi_modal_projector.*``; upstream's 4.x names fail the strict load); the CLIP
``position_ids`` buffer is skipped like ``inv_freq`` (non-persistent since 4.31); the vision config is read from
``--vision-model`` (upstream always used the default CLIP-L/336, which equals it for 7B/13B, but not for the
``mini`` benchmark shape); the row count comes from the checkpoint instead of a hard-coded 32000;
``resize_token_embeddings(mean_resizing=False)``: the 4.36 behaviour the script was written for (5.x would
otherwise form Sigma a second time inside ``resize_token_embeddings``).

Prints one JSON line with the wall time of each phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# upstream's table, retargeted to transformers 5.x names; applied by chained replacement, in dict order
KEYS_TO_MODIFY_MAPPING = {
    "model.vision_tower.vision_tower.vision_model.": "model.vision_tower.",
    "model.mm_projector.": "model.multi_modal_projector.",
    "clip_layernorm": "projector_layernorm",
    "final_linear.0": "linear_1",
    "final_linear.2": "linear_2",
    "model.layers.": "model.language_model.layers.",
    "model.embed_tokens.": "model.language_model.embed_tokens.",
    "model.norm.": "model.language_model.norm.",
}


def convert_state_dict_to_hf(state_dict: dict) -> dict:
    new_state_dict = {}
    for key, value in state_dict.items():
        if key.endswith(".inv_freq") or key.endswith(".position_ids"):
            continue
        for key_to_modify, new_key in KEYS_TO_MODIFY_MAPPING.items():
            if key_to_modify in key:
                key = key.replace(key_to_modify, new_key)
        new_state_dict[key] = value
    return new_state_dict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--original", required=True, type=Path)
    ap.add_argument("--text-model", required=True)
    ap.add_argument("--vision-model", required=True)
    ap.add_argument("--output", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from tokenizers import AddedToken
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaProcessor,
        VipLlavaConfig,
        VipLlavaForConditionalGeneration,
    )

    phases: dict[str, float] = {}
    t = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = round(now - t, 3)
        t = now

    torch.set_default_dtype(torch.float16)
    torch.manual_seed(args.seed)
    text_config = AutoConfig.from_pretrained(args.text_model)
    tokenizer = AutoTokenizer.from_pretrained(args.text_model)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_processor = CLIPImageProcessor.from_pretrained(args.vision_model)
    processor = LlavaProcessor(tokenizer=tokenizer, image_processor=image_processor)
    vision_config = CLIPVisionConfig.from_pretrained(args.vision_model)
    config = VipLlavaConfig(text_config=text_config, vision_config=vision_config)
    vocab = text_config.vocab_size
    config.pad_token_id = vocab + 1
    with torch.device("meta"):
        model = VipLlavaForConditionalGeneration(config)
    phase("setup")

    index = json.loads((args.original / "pytorch_model.bin.index.json").read_text())
    state_dict = {}
    for name in sorted(set(index["weight_map"].values())):
        state_dict.update(torch.load(args.original / name, map_location="cpu", weights_only=True))
    phase("torch_load")

    state_dict = convert_state_dict_to_hf(state_dict)
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    phase("rename_load_state_dict")

    pre_expansion_embeddings = model.model.language_model.embed_tokens.weight.data
    mu = torch.mean(pre_expansion_embeddings, dim=0).float()
    n = pre_expansion_embeddings.size()[0]
    sigma = ((pre_expansion_embeddings - mu).T @ (pre_expansion_embeddings - mu)) / n
    phase("sigma")
    dist = torch.distributions.multivariate_normal.MultivariateNormal(mu, covariance_matrix=1e-5 * sigma)
    phase("mvn_cholesky")

    pad_shape = 64
    model.resize_token_embeddings(vocab + 2, pad_shape, mean_resizing=False)
    embed = model.model.language_model.embed_tokens.weight.data
    head = model.lm_head.weight.data
    embed[vocab:] = torch.stack(tuple(dist.sample() for _ in range(embed[vocab:].shape[0])), dim=0)
    head[vocab:] = torch.stack(tuple(dist.sample() for _ in range(head[vocab:].shape[0])), dim=0)
    phase("resize_sample")

    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    phase("save_pretrained")

    out = {"phases": phases, "rows": int(embed.shape[0]), "dtype": str(embed.dtype)}
    print(json.dumps(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
