"""The image placeholder in token ids: ``llava/mm_utils.py`` ``tokenizer_image_token``, restated.

``IMAGE_SENTINEL`` is ``llava/constants.py`` ``IMAGE_TOKEN_INDEX`` (-200): the id the original put where the prompt
says ``<image>``; the model replaces it by the image's projected features (:mod:`verify.original.model`).
"""

from __future__ import annotations

from typing import Callable

IMAGE_SENTINEL = -200


def tokenizer_image_token(
    prompt: str, encode: Callable[[str], list[int]], bos_id: int | None, image_token: str = "<image>"
) -> list[int]:
    """llava/mm_utils.py ``tokenizer_image_token``: ids with ``IMAGE_SENTINEL`` for each ``<image>``.

    Every chunk between ``<image>`` markers is tokenized on its own (``tokenizer(chunk).input_ids``,
    special tokens added).  When the first chunk starts with the BOS, that BOS is kept once and
    the first id of EVERY chunk (its own BOS) is dropped; otherwise nothing is dropped.
    """
    chunks = [encode(c) for c in prompt.split(image_token)]
    out: list[int] = []
    offset = 0
    if chunks and chunks[0] and bos_id is not None and chunks[0][0] == bos_id:
        offset = 1
        out.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            out.append(IMAGE_SENTINEL)
        out.extend(chunk[offset:])
    return out
