"""Image preprocessing: ``llava/mm_utils.py`` ``process_images`` and transformers 4.31's ``CLIPImageProcessor``,
restated by hand with PIL + numpy.

:func:`process_image` is ``process_images`` for one image (``image_aspect_ratio`` "pad": ``expand2square`` with
``tuple(int(x * 255) for x in image_mean)``; "resize"), followed by :func:`clip_preprocess`, transformers 4.31's
``CLIPImageProcessor.preprocess`` (``image_processing_clip.py`` and ``image_transforms.py``:
``get_resize_output_image_size(default_to_square=False)``, PIL resize, ``center_crop``, ``rescale``,
``normalize``).  Cross-checked during development against transformers 4.31.0: bitwise equal to 4.31's
``CLIPImageProcessor`` after ``expand2square``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .errors import OriginalLoadError


@dataclass
class ClipPreprocessSettings:
    shortest_edge: int
    crop_height: int
    crop_width: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: int = 3
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_file(cls, path: Path) -> "ClipPreprocessSettings":
        d = json.loads(Path(path).read_text())
        size = d.get("size", 224)
        if isinstance(size, int):
            shortest = size  # get_size_dict(int, default_to_square=False)
        elif isinstance(size, dict) and "shortest_edge" in size:
            shortest = int(size["shortest_edge"])
        else:
            raise OriginalLoadError(f"CLIP resize needs size['shortest_edge'], got {size!r}")
        crop = d.get("crop_size", 224)
        if isinstance(crop, int):
            ch = cw = crop  # get_size_dict(int, default_to_square=True)
        elif isinstance(crop, dict) and "height" in crop and "width" in crop:
            ch, cw = int(crop["height"]), int(crop["width"])
        elif isinstance(crop, dict) and "shortest_edge" in crop:
            ch = cw = int(crop["shortest_edge"])
        else:
            raise OriginalLoadError(f"unsupported crop_size {crop!r}")
        mean = d.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
        std = d.get("image_std", [0.26862954, 0.26130258, 0.27577711])
        return cls(
            shortest_edge=shortest,
            crop_height=ch,
            crop_width=cw,
            image_mean=tuple(float(m) for m in mean),
            image_std=tuple(float(s) for s in std),
            resample=int(d.get("resample", 3)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
            do_convert_rgb=bool(d.get("do_convert_rgb", True)),
        )

    @property
    def pad_color(self) -> tuple[int, ...]:
        return tuple(int(x * 255) for x in self.image_mean)


def expand_to_square(img: PIL.Image.Image, color: tuple[int, ...]) -> PIL.Image.Image:
    """llava/mm_utils.py expand2square: centre on a max(w, h) square, offsets floored."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = PIL.Image.new(img.mode, (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def clip_preprocess(img: PIL.Image.Image, s: ClipPreprocessSettings) -> np.ndarray:
    """transformers 4.31 CLIPImageProcessor.preprocess for one image, returning CHW."""
    if s.do_convert_rgb:
        img = img.convert("RGB")
    arr = np.array(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if s.do_resize:
        h, w = arr.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = s.shortest_edge, int(s.shortest_edge * long / short)
        out_h, out_w = (new_long, new_short) if w <= h else (new_short, new_long)
        pil = PIL.Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        arr = np.array(pil.resize((out_w, out_h), resample=PIL.Image.Resampling(s.resample), reducing_gap=None))
        if arr.ndim == 2:
            arr = arr[:, :, None]
    if s.do_center_crop:
        h, w = arr.shape[:2]
        ch, cw = s.crop_height, s.crop_width
        top, left = (h - ch) // 2, (w - cw) // 2
        if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
            arr = arr[top : top + ch, left : left + cw]
        else:  # smaller than the crop: zero-pad around it, then crop (4.31 center_crop)
            nh, nw = max(ch, h), max(cw, w)
            padded = np.zeros((nh, nw) + arr.shape[2:], dtype=arr.dtype)
            tp, lp = (nh - h) // 2, (nw - w) // 2
            padded[tp : tp + h, lp : lp + w] = arr
            top, left = top + tp, left + lp
            arr = padded[max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]
    if s.do_rescale:
        arr = (arr * s.rescale_factor).astype(np.float32)  # float64 product, then float32
    if s.do_normalize:
        mean = np.array(s.image_mean, dtype=arr.dtype)
        std = np.array(s.image_std, dtype=arr.dtype)
        arr = (arr - mean) / std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def process_image(image: PIL.Image.Image, s: ClipPreprocessSettings, image_aspect_ratio: str) -> torch.Tensor:
    """llava/mm_utils.py process_images for one image -> [3, crop_h, crop_w] float32."""
    img = image.convert("RGB")
    if image_aspect_ratio == "pad":
        img = expand_to_square(img, s.pad_color)
    elif image_aspect_ratio == "resize":
        img = img.resize((s.crop_height, s.crop_height))
    arr = clip_preprocess(img, s)
    return torch.from_numpy(arr).to(torch.float32)
