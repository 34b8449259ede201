"""Shared models for the parity tests.

The seed-config Keras model (21.7M parameters) takes ~10 s to build on this CPU, so one is
built per session and shared by the tests that only read it. Tests that train or write
weights build their own, at the small config.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import parity
from parity import keras_reference
from parity.harness import random_images
from vit_flax import ViT, ViTConfig

# Each `record` call is kept in its test's report (user_properties), so the table printed
# after the run has every test's figures, also when pytest-xdist ran them in other processes.
MEASURED = "parity-measured"


@pytest.fixture
def record(request):
    def record(what: str, worst: float, tolerance: float | str) -> None:
        request.node.user_properties.append((MEASURED, (what, float(worst), tolerance)))

    return record


def pytest_collection_modifyitems(config, items):
    """Every parity test builds or trains a Keras model: all are `slow`, left out of the
    quick tier (pytest -m "not slow"); CI runs them."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter):
    """After the run, the figures each `pytest parity` judges its tolerances against."""
    rows = [(report.head_line, *value)
            for outcome in ("passed", "failed")
            for report in terminalreporter.stats.get(outcome, [])
            if getattr(report, "when", None) == "call"
            for key, value in getattr(report, "user_properties", ()) if key == MEASURED]
    if not rows:
        return
    terminalreporter.section("parity: worst differences measured")
    for test, what, worst, tolerance in rows:
        bound = tolerance if isinstance(tolerance, str) else f"{tolerance:.1e}"
        terminalreporter.write_line(f"{worst:10.3g}  (tolerance {bound})  {what}  [{test}]")


@pytest.fixture(scope="session")
def seed_models():
    """(Keras model, vit_flax model) of the seed config with the same weights.

    Normalization is adapted on random uint8 images (mean ~127.5, variance ~5,460), so the
    statistics are not the identity and the forward pass sees CIFAR-like ranges.
    """
    config = ViTConfig()
    keras_model = keras_reference.build_keras_vit(config, adapt_images=random_images(256, seed=7))
    flax_model: ViT = parity.keras_to_flax(keras_model, config)
    return keras_model, flax_model
