"""Run by any Python with transformers (the suite's own, or e.g. a 4.37.2 venv), never imported by the test-suite:
``python tests/hf_generate_suppressed.py REPO`` loads the converted repo with ``VipLlavaForConditionalGeneration``,
makes every lm_head row at or above ``image_token_index`` (= T, the base tokenizer's length) outscore the real
vocabulary, and greedy-generates a few tokens twice: with ``suppress_tokens`` switched off, and as the repo's
``generation_config.json`` says. Writes ``{"version", "loaded_suppress", "T", "rows", "free", "configured"}`` as
the last stdout line."""

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main(repo: str) -> None:
    import torch
    import transformers
    from transformers import VipLlavaForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = json.load(open(f"{repo}/config.json"))
    T, rows = cfg["image_token_index"], cfg["text_config"]["vocab_size"]
    model = VipLlavaForConditionalGeneration.from_pretrained(repo).eval()
    head = model.get_output_embeddings()
    hidden = head.weight.shape[1]
    norm = next(
        m
        for n, m in model.named_modules()
        if n.endswith(".norm")
        and "layers" not in n
        and "vision" not in n
        and getattr(m, "weight", None) is not None
        and m.weight.shape == (hidden,)
    )
    with torch.no_grad():
        head.weight[T:] = 50 * norm.weight.sign()  # aligned with every final hidden state's sign pattern
    ids = torch.tensor([[cfg["text_config"]["bos_token_id"] or 1, 19, 33, 45]])
    gen = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": 4, "do_sample": False}
    free = model.generate(**gen, suppress_tokens=None)[0, ids.shape[1] :].tolist()
    configured = model.generate(**gen)[0, ids.shape[1] :].tolist()
    out = {
        "version": transformers.__version__,
        "loaded_suppress": list(model.generation_config.suppress_tokens or []),
        "T": T,
        "rows": rows,
        "free": free,
        "configured": configured,
    }
    sys.stdout.write("\n" + json.dumps(out) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
