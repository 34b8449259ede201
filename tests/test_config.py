"""ViTConfig's own checks: every float field finite (NaN passes no range check by itself), the
LayerNorm epsilon positive, and the block MLP width (mlp_dim) without changing the seed."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from vit_flax.config import ConfigError, ViTConfig

FLOAT_FIELDS = [f.name for f in dataclasses.fields(ViTConfig) if isinstance(f.default, float)]


def test_the_float_fields_are_all_checked():
    assert {"layer_norm_epsilon", "learning_rate", "dropout", "mixup_alpha",
            "randaugment_magnitude"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_float_is_a_one_line_error_naming_the_field(name, value):
    with pytest.raises(ConfigError, match=f"^{name} must be finite, got {value!r}$"):
        ViTConfig(**{name: value})


@pytest.mark.parametrize("value", [0.0, -1e-6])
def test_the_layer_norm_epsilon_must_be_positive(value):
    with pytest.raises(ConfigError, match=f"^layer_norm_epsilon must be > 0, got {value}$"):
        ViTConfig(layer_norm_epsilon=value)


def test_a_string_or_a_boolean_is_not_a_float():
    with pytest.raises(ConfigError, match="^dropout must be finite, got '0.1'$"):
        ViTConfig(dropout="0.1")
    with pytest.raises(ConfigError, match="^zoom_factor must be finite, got True$"):
        ViTConfig(zoom_factor=True)


def test_mlp_dim_is_the_block_mlps_width():
    assert ViTConfig().transformer_units == (128, 64)  # The seed's: 2 x projection_dim.
    assert ViTConfig(mlp_dim=100).transformer_units == (100, 64)
    standard = ViTConfig.recipe("keras", model="vit-ti16")
    assert standard.transformer_units == (768, 192)  # 4 x for the standard ViT.
    assert standard.replace(mlp_dim=500).transformer_units == (500, 192)
    # One spelling per model: the architecture's own width is stored as 0.
    assert ViTConfig(mlp_dim=128) == ViTConfig() and ViTConfig(mlp_dim=128).mlp_dim == 0
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match=f"^mlp_dim must be an integer >= 0 .*{bad!r}$"):
            ViTConfig(mlp_dim=bad)


def test_a_config_json_written_before_mlp_dim_still_loads():
    old = json.loads(ViTConfig.recipe("strong").to_json())
    del old["mlp_dim"]
    assert ViTConfig.from_json(json.dumps(old)) == ViTConfig.recipe("strong")
    # What a run writes: the seed's fields as before, and mlp_dim 0.
    written = json.loads(ViTConfig().to_json())
    assert written["mlp_dim"] == 0 and written["layer_norm_epsilon"] == 1e-6
