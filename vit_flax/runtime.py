"""Process-wide settings of a training process. Nothing here runs at import: the entry
point that trains (`vit_flax.run`, and so train.py) applies them, and each can be declined.
"""

from __future__ import annotations

import os
from pathlib import Path


def unroll_threefry_on_cpu() -> bool:
    """Lower JAX's threefry2x32 hash with its rounds unrolled on CPU too, as JAX does on GPU.

    On CPU JAX lowers threefry as a 5-iteration loop (smaller programs), which XLA cannot
    fuse: every iteration copies the whole state of every draw. The seed's train step draws
    ~230M dropout bits; measured on a 2-core CPU, 170M Bernoulli draws take 2.2 s rolled and
    0.6 s unrolled. The bits are the same (the same function, written out), so results do not
    change. This replaces a JAX-internal lowering rule for the whole process (programs
    compiled afterwards use it): where this JAX version has none under that name, nothing
    changes and False is returned.
    """
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32
        rule = threefry2x32._threefry2x32_lowering_rule
        primitive = threefry2x32.threefry2x32_p
    except (ImportError, AttributeError):
        return False
    mlir.register_lowering(primitive, rule, platform="cpu", inline=False)
    return True


DEFAULT = "default"  # run(compilation_cache=DEFAULT): default_compilation_cache().


def default_compilation_cache() -> Path:
    """$VIT_FLAX_CACHE, else $XDG_CACHE_HOME/vit_flax/jax, else ~/.cache/vit_flax/jax."""
    if os.environ.get("VIT_FLAX_CACHE"):
        return Path(os.environ["VIT_FLAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "vit_flax" / "jax"


def use_compilation_cache(directory: str | os.PathLike) -> None:
    """JAX's persistent compilation cache in `directory`, for every program this process
    compiles from now on: a second run of the same configuration loads its train step
    instead of compiling it again."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
