"""``python -m verify.compat REPO``: does a converted repo load and compute the same on every transformers release
since VipLlava exists (4.37.2, the original ViP-LLaVA code's pin) up to 5.x?

For every transformers version in :data:`VERSIONS` an isolated virtual environment is created (or reused) and
:mod:`verify.compat.probe` runs INSIDE it: it loads the repo with ``VipLlavaForConditionalGeneration``,
``AutoTokenizer`` and ``AutoProcessor``, records what that version actually read, runs its processor and the
no-processor recipe on the sample prompts and images, and runs the model (logits and greedy tokens) on the CURRENT
environment's processor output. The current environment runs the same probe first and is the reference. A row
passes when:

- the model loads with 0 missing / 0 unexpected / 0 mismatched keys;
- every setting that version read equals the repo's files (``vision_feature_layers``, ``image_seq_length``, the pad
  and ``<image>`` ids, the processor's ``patch_size`` / ``num_additional_image_tokens`` /
  ``vision_feature_select_strategy``, the image processor's ``do_pad``, sizes, mean and std, ...) and the
  reference's reading of everything else: nothing silently ignored;
- its tokenizer (``AutoTokenizer``, and ``use_fast=False`` where that is a different implementation) gives the
  reference's ids, pieces and decoded text on the probe strings and prompts, with sentencepiece's ``▁`` piece
  right after ``<image>`` (``<image>\\nWhat`` -> ``▁`` ``<0x0A>`` ...; ``<image> What`` -> ``▁`` ``▁What``), and the
  same chat-template text;
- from 4.49 (:data:`PROCESSOR_FROM`): its ``AutoProcessor`` gives the reference's ``input_ids`` and ``pixel_values``
  (max |diff| <= 1e-5) and each ``<image>`` expands to ``image_seq_length`` tokens. Before 4.49 no processor pads
  to square; the row lists why under "cannot" (not a failure) and the recipe carries it;
- the recipe (pad to square with the mean colour, ``CLIPImageProcessor``, one ``<image>`` per image before 4.48, the
  expanded run from 4.48) gives the reference's ``pixel_values`` (<= 1e-5), ``input_ids`` (each ``<image>``
  counted as ``image_seq_length`` where the model expands it) and logits (<= 1e-5). Required before 4.49; from
  4.49 it still runs, and a difference is a note (the processor is the way there);
- max |logits - reference logits| <= 1e-5 (fp32) on every prompt, same inputs (one ``<image>`` per run before
  4.48), and the same :data:`NEW_TOKENS` greedy tokens.

Each row also says what that release cannot do, measured: no pad-to-square processor; its default attention
failing (Phi-3 on 4.41-4.44: load with ``attn_implementation="eager"``); a tokenizer option it drops (Llama-3's
``ignore_merges`` on tokenizers < 0.19). A release that does not know the backbone (Phi-3 before 4.41) gives an
N/A row naming the error, not a failure.

Environments: one virtual environment per version, made once and cached (:mod:`~verify.compat.envs` says how).

The package, one reason to change per module:

- :mod:`~verify.compat.releases`: the versions and what each is expected to do (the thresholds above);
- :mod:`~verify.compat.envs`: the per-version virtual environments, created once and cached (``--setup-only``);
- :mod:`~verify.compat.probe`: what runs INSIDE an environment (standalone: never imports this project);
- :mod:`~verify.compat.probing`: the probe's job file, its subprocess, and what it left;
- :mod:`~verify.compat.judges`: the verdict, one function per aspect judged;
- :mod:`~verify.compat.matrix`: the reference, every version's row, the table and the JSON;
- :mod:`~verify.compat.cli` (and ``__main__``): the command line.

Exit 0 when every row passes (N/A rows included), 1 when any fails (an environment that cannot be created fails
its row), 2 for bad usage. ``--setup-only`` creates or reuses the environments (``--jobs`` at once) and runs
nothing else (CI does this before pytest).
"""

from .cli import main
from .envs import EnvError, EnvInfo, default_envs_dir, ensure_env, env_path, env_python, env_status, setup_envs
from .judges import LOGITS_TOL, PIXEL_TOL, Row, expected_settings, judge, same
from .matrix import DEFAULT_JOBS, Matrix, run_matrix
from .probing import NEW_TOKENS, TOKEN_PROBES, Probe, probe_env, run_probe
from .releases import VERSIONS, Capabilities, CompatUsageError, capabilities, check_version, version_tuple

__all__ = [
    "DEFAULT_JOBS",
    "LOGITS_TOL",
    "NEW_TOKENS",
    "PIXEL_TOL",
    "TOKEN_PROBES",
    "VERSIONS",
    "Capabilities",
    "CompatUsageError",
    "EnvError",
    "EnvInfo",
    "Matrix",
    "Probe",
    "Row",
    "capabilities",
    "check_version",
    "default_envs_dir",
    "ensure_env",
    "env_path",
    "env_python",
    "env_status",
    "expected_settings",
    "judge",
    "main",
    "probe_env",
    "run_matrix",
    "run_probe",
    "same",
    "setup_envs",
    "version_tuple",
]
