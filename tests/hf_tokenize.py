"""Run by a Python that has some transformers release installed (e.g. 4.37.2 or 4.31.0 in a venv), never imported
by the test-suite itself: reads ``{"folder", "use_fast", "prompts"}`` as JSON on stdin, loads
``AutoTokenizer.from_pretrained(folder, use_fast=...)`` and writes ``{"version", "class", "len", "ids"}`` as the last
line on stdout,
where ``ids[i]`` is ``[tokenizer(chunk).input_ids for chunk in prompts[i].split("<image>")]``: the calls
``tokenizer_image_token`` (llava/mm_utils.py) makes."""

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main() -> None:
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    req = json.load(sys.stdin)
    tok = AutoTokenizer.from_pretrained(req["folder"], use_fast=req["use_fast"])
    ids = [[tok(chunk).input_ids for chunk in p.split("<image>")] for p in req["prompts"]]
    sys.stdout.write(
        "\n"
        + json.dumps({"version": transformers.__version__, "class": type(tok).__name__, "len": len(tok), "ids": ids})
        + "\n"
    )


if __name__ == "__main__":
    main()
