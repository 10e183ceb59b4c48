"""The model card (``README.md``) of a published repo, as a pure function of the conversion manifest and the
verification report: nothing is read from disk or the network here, so the card says exactly what the two JSON
documents uploaded beside it (``conversion.json``, ``verification.json``) say."""

from __future__ import annotations

import json

from .backbones import BACKBONES, Backbone

VIP_LLAVA_GITHUB = "https://github.com/WisconsinAIVision/ViP-LLaVA"

_ROLES = (
    ("original", "the original ViP-LLaVA checkpoint"),
    ("text_model", "the base text model, for the tokenizer"),
    ("vision_model", "the CLIP vision model: config and image preprocessing"),
)

# What each verify check establishes (qualitative; the thresholds are in each measured line and in verify's docs).
_CHECK_MEANING = {
    "files": "every file's sha256 matches conversion.json; the index covers every tensor once",
    "mapping": "every original tensor present once under its canonical name, bit-identical",
    "strict_load": "loads with 0 missing / unexpected / mismatched keys; special ids agree",
    "resize": "new embedding rows drawn as documented (statistical bound)",
    "processor": "token ids and pixel values equal the original preprocessing",
    "logits": "logits equal the original model's within tolerance",
    "generation": "greedy generation identical to the original model's",
}


def _ref(rec: dict) -> str:
    """The repo id and resolved commit of a Hub input, the local path otherwise."""
    if rec.get("repo_id"):
        return f"`{rec['repo_id']}` at commit `{rec.get('revision') or 'unknown'}`"
    return f"the local path `{rec.get('path') or rec.get('source')}`, no Hub revision"


def _cell(text: object) -> str:
    """Plain table-cell text: pipes escaped, one line."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _code_cell(text: object) -> str:
    """A measured line as a code span (so ``<image>`` and ``*`` show as written); GFM tables still need ``\\|``."""
    return "`" + _cell(str(text).replace("`", "'")) + "`"


def _size(n: object) -> str:
    if isinstance(n, int):
        return f"{n} bytes ({n / 1e9:g} GB)"
    return str(n)


def _backbone(manifest: dict) -> Backbone:
    return BACKBONES.get(manifest.get("settings", {}).get("backbone", "vicuna"), BACKBONES["vicuna"])


def license_of(manifest: dict) -> tuple[str, str]:
    """(Hub license id, sentence) inherited from the base text model. The Vicuna checkpoints are fine-tuned from
    Vicuna v1.5, itself fine-tuned from Llama 2; the Llama-3 and Phi-3 ones carry their base model's terms."""
    backbone = _backbone(manifest)
    if backbone.name != "vicuna":
        return backbone.license_id, f"The base text model is {backbone.title}: the {backbone.license_name} applies."
    text = manifest.get("inputs", {}).get("text_model", {})
    repo_id = text.get("repo_id") or ""
    low = repo_id.lower()
    if not repo_id:
        return "llama2", (
            "The base text model was given as a local path; ViP-LLaVA's released checkpoints are "
            "Vicuna v1.5 (Llama 2) based, so the Llama 2 Community License is assumed: check the base "
            "model you converted from."
        )
    if "vicuna" in low or "llama-2" in low or "llama2" in low:
        return "llama2", f"The base text model `{repo_id}` is Llama 2 based: the Llama 2 Community License applies."
    return (
        "other",
        f"The base text model `{repo_id}` is not a known Llama 2 derivative: its own license applies; check it.",
    )


def _front_matter(manifest: dict, license_id: str) -> str:
    original = manifest.get("inputs", {}).get("original", {})
    lines = ["---", f"license: {license_id}"]
    if original.get("repo_id"):
        lines += ["base_model:", f"- {json.dumps(original['repo_id'])}"]
    lines += [
        "pipeline_tag: image-text-to-text",
        "library_name: transformers",
        "tags:",
        "- vipllava",
        "- vip-llava",
        "---",
    ]
    return "\n".join(lines)


def _prompt_sentence(backbone: Backbone) -> str:
    if backbone.name == "vicuna":
        return (
            "The prompt format is the original ViP-LLaVA one (llava_v1): a system sentence, then `USER: <image>\\n"
            "{question} ASSISTANT:`. The visual prompt (a box, arrow or scribble) is drawn on the image itself."
        )
    return (
        f"The prompt format is the original ViP-LLaVA {backbone.title} one ({backbone.conv_mode}), as the chat "
        "template "
        "in this repo writes it. The visual prompt (a box, arrow or scribble) is drawn on the image itself."
    )


def _usage(repo_id: str | None, dtype: str, backbone: Backbone) -> str:
    torch_dtype = {"bfloat16": "torch.bfloat16", "float16": "torch.float16", "float32": "torch.float32"}.get(
        dtype, "torch.float16"
    )
    repo = json.dumps(repo_id or "path/to/this/repo")
    prompt = json.dumps(backbone.prompt_for("{question}"))
    return f"""```python
import torch
from PIL import Image
from transformers import AutoProcessor, VipLlavaForConditionalGeneration

repo = {repo}
device = "cuda" if torch.cuda.is_available() else "cpu"
model = VipLlavaForConditionalGeneration.from_pretrained(repo, torch_dtype={torch_dtype}).to(device)
processor = AutoProcessor.from_pretrained(repo)

image = Image.open("image.png")  # draw your visual prompt (box, arrow, scribble) on the image itself
question = "What is inside the red box?"

# The original {backbone.conv_mode} prompt format, written out:
prompt = {prompt}.format(question=question)
# ... or, equivalently, through the chat template stored in this repo (same text):
conversation = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": question}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)

inputs = processor(images=image, text=prompt, return_tensors="pt").to(device, {torch_dtype})
output = model.generate(**inputs, max_new_tokens=200, do_sample=False)
print(processor.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


# Measured by the harness's version matrix (``python -m verify.compat``, 2026-11-29, tiny conversions of every
# backbone); verify/compat/releases.py holds the same thresholds for the matrix's verdicts (kept apart on purpose:
# the card is built from data, the matrix measures).
PROCESSOR_FROM = "4.49"  # LlavaImageProcessor (do_pad): AutoProcessor pads to square
EXPANDED_FROM = (4, 48)  # before: one <image> per image, the model expands it
RECIPE_VERSIONS = ("4.37.2", "4.41.2", "4.44.2", "4.45.2", "4.48.3")
EAGER_VERSIONS = {"phi3": "4.41 to 4.44"}  # their VipLlava asks the text model for sdpa, which Phi3 refuses there
FIRST_VERSION = {"phi3": "4.41"}
IGNORE_MERGES = {"llama3": "4.40"}  # transformers 4.37-4.39 require tokenizers < 0.19, which drops BPE ignore_merges


def _recipe(repo_id: str | None, dtype: str, backbone: Backbone) -> str:
    """The usage snippet for releases without a pad-to-square processor; verify.compat runs the same recipe."""
    torch_dtype = {"bfloat16": "torch.bfloat16", "float16": "torch.float16", "float32": "torch.float32"}.get(
        dtype, "torch.float16"
    )
    repo = json.dumps(repo_id or "path/to/this/repo")
    prompt = json.dumps(backbone.prompt_for("{question}"))
    eager = ', attn_implementation="eager"' if backbone.name in EAGER_VERSIONS else ""
    eager_note = f"  # eager: needed on transformers {EAGER_VERSIONS[backbone.name]}" if eager else ""
    major, minor = EXPANDED_FROM
    version_check = (  # one line of the snippet, built here to keep this source file's lines short
        'if tuple(int(x) for x in transformers.__version__.split(".")[:2]) '
        f">= ({major}, {minor}):  # {major}.{minor}+: the expanded run"
    )
    return f"""```python
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessor, VipLlavaForConditionalGeneration

repo = {repo}
model = VipLlavaForConditionalGeneration.from_pretrained(repo, torch_dtype={torch_dtype}{eager}){eager_note}
tokenizer = AutoTokenizer.from_pretrained(repo)
image_processor = CLIPImageProcessor.from_pretrained(repo)


def pad_to_square(image, mean):
    w, h = image.size  # the original preprocessing: centred on a square of the mean colour
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


image = pad_to_square(Image.open("image.png").convert("RGB"), image_processor.image_mean)
pixel_values = image_processor(image, return_tensors="pt")["pixel_values"].to({torch_dtype})
prompt = {prompt}.format(question="What is inside the red box?")
{version_check}
    prompt = prompt.replace("<image>", "<image>" * model.config.image_seq_length)  # (before: the model expands one)
inputs = tokenizer(prompt, return_tensors="pt")
output = model.generate(**inputs, pixel_values=pixel_values, max_new_tokens=200, do_sample=False)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def _from(versions, first: str) -> list[str]:
    key = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    return [v for v in versions if key(v) >= key(first)]


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _older_versions(backbone: Backbone) -> list[str]:
    """What the matrix measured on releases before the newest, for this backbone."""
    first = FIRST_VERSION.get(backbone.name, "4.37")
    out = [
        f"On transformers {first} to 4.48 the model and tokenizer work, but no `AutoProcessor` pads the image to a "
        f"square (`LlavaImageProcessor`, with `do_pad`, arrives in {PROCESSOR_FROM}; a plain CLIP processor "
        "centre-crops instead, and the answers change): use the recipe under Usage, which gives the processor's "
        f"`input_ids`, `pixel_values` and logits (measured on {_and(_from(RECIPE_VERSIONS, first))})."
    ]
    if backbone.name in FIRST_VERSION:
        out.append(
            f"{backbone.title} needs transformers {FIRST_VERSION[backbone.name]} or later (older releases do not "
            "know its text model)."
        )
    if backbone.name in EAGER_VERSIONS:
        out.append(
            f'On transformers {EAGER_VERSIONS[backbone.name]}, load with `attn_implementation="eager"`: there '
            f"VipLlava asks {backbone.title} for sdpa attention, which it refuses."
        )
    if backbone.name in IGNORE_MERGES:
        out.append(
            f"For exact {backbone.title} tokenization use transformers {IGNORE_MERGES[backbone.name]} or later: "
            "older releases require tokenizers < 0.19, which drops the tokenizer's `ignore_merges` option, so "
            "some words are split differently (588 of the 128000 in the Llama-3 vocabulary, measured with "
            "tokenizers 0.15.1)."
        )
    return out


def model_card(
    manifest: dict, report_json: dict, proven_versions: list[str] | None = None, *, repo_id: str | None = None
) -> str:
    """The card for a converted repo: YAML front matter, then inputs, conversion settings, the verification table
    (the report's own status and measured line per check), the proven transformers versions (``None``: say which
    version verified it), usage with the exact prompt format, and the license note. ``repo_id`` only fills the
    usage snippet."""
    inputs = manifest.get("inputs", {})
    settings = manifest.get("settings", {})
    tool = manifest.get("tool", {})
    env = manifest.get("environment", {})
    original = inputs.get("original", {})
    license_id, license_sentence = license_of(manifest)
    backbone = _backbone(manifest)
    name = (original.get("repo_id") or "ViP-LLaVA").split("/")[-1]
    tool_line = f"{tool.get('name', 'vipllava-harness')} {tool.get('version', '?')}"
    checks = report_json.get("checks", [])
    n_ok = sum(1 for c in checks if c.get("status") != "FAIL")
    out: list[str] = [_front_matter(manifest, license_id), ""]

    out += [
        f"# {name} (Hugging Face transformers format)",
        "",
        f"ViP-LLaVA from {_ref(original)}, converted to transformers' `VipLlavaForConditionalGeneration` by "
        f"{tool_line}, "
        "and verified against an independent re-implementation of the original model before upload: "
        f"**{n_ok}/{len(checks)} checks passed**. `conversion.json` is the conversion manifest (inputs, settings, "
        "sha256 of every file), `verification.json` the full verification report.",
        "",
        "## Inputs",
        "",
    ]
    for role, what in _ROLES:
        rec = inputs.get(role)
        if not rec:
            continue
        out += [f"**{role}**, {what}: {_ref(rec)}", "", "| file | sha256 |", "| --- | --- |"]
        out += [f"| `{_cell(f)}` | `{digest}` |" for f, digest in sorted(rec.get("files", {}).items())]
        out.append("")

    mapping = manifest.get("mapping", {})
    resize = manifest.get("resize", {})
    dropped = mapping.get("dropped", {})
    out += [
        "## Conversion",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| tool | {_cell(tool_line)} |",
        f"| transformers | {env.get('transformers', '?')} |",
        f"| torch | {env.get('torch', '?')} |",
        f"| python | {env.get('python', '?')} |",
        f"| seed (new embedding rows) | {settings.get('seed', '?')} |",
        f"| dtype | requested `{settings.get('dtype', '?')}`; source `{settings.get('source_dtype', '?')}`; written "
        f"`{settings.get('output_dtype', '?')}` |",
        f"| max shard size | {_size(settings.get('max_shard_size', '?'))} |",
        f"| source format | {_cell(settings.get('format', '?'))} |",
        f"| tensors mapped | {mapping.get('mapped', '?')} |",
        f"| keys dropped | {len(dropped)} ({_cell(', '.join(sorted(set(map(str, dropped.values())))) or 'none')}) |",
        f"| embedding rows | {resize.get('original_rows', '?')} -> {resize.get('rows', '?')}; `<image>` = "
        f"{resize.get('image_token_index', '?')}, pad = {resize.get('pad_token_id', '?')} |",
        f"| new rows | {_cell(resize.get('method', '?'))} (scale {resize.get('scale', '?')}) |",
        "",
        "Output files and their sha256:",
        "",
        "| file | sha256 |",
        "| --- | --- |",
    ]
    out += [f"| `{_cell(f)}` | `{d}` |" for f, d in sorted(manifest.get("outputs", {}).items())]
    out.append("")

    vset = report_json.get("settings", {})
    venv = report_json.get("environment", {})
    verdict = (
        "all checks passed"
        if report_json.get("passed")
        else f"FAILED: {', '.join(report_json.get('failed_checks', []))}"
    )
    out += [
        "## Verification",
        "",
        f"`python -m verify` ({verdict}): dtype {vset.get('dtype', '?')}, {len(vset.get('prompts', []))} prompts "
        f"({_cell(', '.join(vset.get('prompts', [])))}), {vset.get('max_new_tokens', '?')} greedy tokens each.",
        "",
        "| check | result | measured | what it establishes |",
        "| --- | --- | --- | --- |",
    ]
    out += [
        f"| {_cell(c.get('name'))} | {_cell(c.get('status'))} | {_code_cell(c.get('summary', ''))} | "
        f"{_cell(_CHECK_MEANING.get(c.get('name'), ''))} |"
        for c in checks
    ]
    out.append("")

    out += ["## Proven transformers versions", ""]
    if proven_versions:
        out.append(
            f"Proven to load and compute the same on transformers {', '.join(proven_versions)} "
            "(vipllava-harness's version matrix, `python -m verify.compat`)."
        )
    elif venv.get("transformers"):
        out.append(
            f"Verified with transformers {venv['transformers']} (torch {venv.get('torch', '?')}); "
            "no other transformers version was checked for this upload."
        )
    else:
        out.append(
            f"Converted with transformers {env.get('transformers', '?')}; the verification report does not "
            "record its environment, and no other version was checked for this upload."
        )
    out.append("")
    out += [" ".join(_older_versions(backbone)), ""]

    out += [
        "## Usage",
        "",
        _prompt_sentence(backbone),
        "",
        _usage(repo_id, settings.get("output_dtype", "float16"), backbone),
        "",
        "### transformers 4.37 to 4.48: the recipe",
        "",
        "Without a pad-to-square `AutoProcessor` (before 4.49), the same inputs by hand: pad to a square with the mean "
        "colour, then `CLIPImageProcessor`; the prompt keeps one `<image>` before 4.48 (the model expands it) and "
        "carries `image_seq_length` of them from 4.48.",
        "",
        _recipe(repo_id, settings.get("output_dtype", "float16"), backbone),
        "",
        "## License",
        "",
        f"{license_sentence} See the [{backbone.license_name}]({backbone.license_url}). The conversion does not "
        "change the weights' terms.",
        "",
    ]
    orig_link = (
        f"[`{original['repo_id']}`](https://huggingface.co/{original['repo_id']}) and "
        if original.get("repo_id")
        else ""
    )
    out += [
        f"ViP-LLaVA's own terms of use: see the original release, {orig_link}[ViP-LLaVA on "
        f"GitHub]({VIP_LLAVA_GITHUB}).",
        "",
    ]
    return "\n".join(out)
