"""The Chatterbox pipeline on MLX.

    from nightingale.models import load_model
    model = load_model("path/to/checkpoint")   # or None: NIGHTINGALE_MODEL / ResembleAI/chatterbox
    audio = model.synthesize("Hello there.")   # float32 samples at 24 kHz
"""

from __future__ import annotations

__all__ = ["load_model", "ChatterboxModel"]


def __getattr__(name: str):
    # Lazy, so importing a light submodule (e.g. for the CLI) does not load MLX.
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
