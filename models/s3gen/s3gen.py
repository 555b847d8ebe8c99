"""S3Gen (upstream `S3Token2Wav`): speech tokens -> 24 kHz waveform.

The composition of the parts stored in s3gen.safetensors: `tokenizer.` (S3Tokenizer v2),
`speaker_encoder.` (CAMPPlus), `flow.` (encoder + CFM estimator) and `mel2wav.` (HiFT).
Only the flow and HiFT run per utterance; the tokenizer and CAMPPlus run when a new voice
is computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import mlx.nn as nn
import numpy as np

from .. import campplus, s3tokenizer
from ..config import Config
from . import flow as flow_mod
from . import hifigan, meanflow

# (attribute / key prefix, component module)
PARTS = (
    ("tokenizer", s3tokenizer),
    ("speaker_encoder", campplus),
    ("flow", flow_mod),
    ("mel2wav", hifigan),
)
CONFIG_NAMES = {"tokenizer": "tokenizer", "speaker_encoder": "campplus", "flow": "flow", "mel2wav": "hift"}
# S3GenConfig field -> its config class
PART_CONFIGS = {
    "tokenizer": s3tokenizer.S3TokenizerConfig,
    "campplus": campplus.CAMPPlusConfig,
    "flow": flow_mod.FlowConfig,
    "hift": hifigan.HiFTConfig,
}


@dataclass
class S3GenConfig(Config):
    tokenizer: s3tokenizer.S3TokenizerConfig = field(default_factory=s3tokenizer.S3TokenizerConfig.full)
    campplus: campplus.CAMPPlusConfig = field(default_factory=campplus.CAMPPlusConfig.full)
    flow: flow_mod.FlowConfig = field(default_factory=flow_mod.FlowConfig.full)
    hift: hifigan.HiFTConfig = field(default_factory=hifigan.HiFTConfig.full)
    meanflow: bool = False  # Turbo's decoder (s3gen_meanflow.safetensors; models/s3gen/meanflow.py)

    @classmethod
    def full(cls) -> "S3GenConfig":
        return cls()

    def with_meanflow(self) -> "S3GenConfig":
        """The same dimensions as a MeanFlow S3Gen (2 Euler steps, no CFG, the time mixer)."""
        return S3GenConfig(self.tokenizer, self.campplus, meanflow.meanflow_config(self.flow), self.hift, True)

    @classmethod
    def tiny(cls) -> "S3GenConfig":
        return cls(
            s3tokenizer.S3TokenizerConfig.tiny(),
            campplus.CAMPPlusConfig.tiny(),
            flow_mod.FlowConfig.tiny(),
            hifigan.HiFTConfig.tiny(),
        )

    @classmethod
    def from_dict(cls, d: Mapping | None) -> "S3GenConfig":
        """Strict at both levels: each part's mapping goes to that part's `from_dict`, and an
        unknown top-level key is an error too. A part left out is the full model's."""
        d = {} if d is None else d
        if isinstance(d, Mapping):
            d = {k: PART_CONFIGS[k].from_dict(v) if k in PART_CONFIGS else v for k, v in d.items()}
        return super().from_dict(d)

    def part(self, prefix: str):
        return getattr(self, CONFIG_NAMES[prefix])


def parts(cfg: S3GenConfig) -> tuple:
    """(prefix, component module) of this config: the flow is MeanFlow's when cfg.meanflow."""
    if not cfg.meanflow:
        return PARTS
    return tuple((prefix, meanflow if prefix == "flow" else module) for prefix, module in PARTS)


def upstream_shapes(cfg: S3GenConfig) -> dict[str, tuple[int, ...]]:
    """Every key S3Gen().state_dict() saves to s3gen.safetensors (S3Gen(meanflow=True) to
    s3gen_meanflow.safetensors), in torch layout."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, module in parts(cfg):
        for key, shape in module.upstream_shapes(cfg.part(prefix)).items():
            shapes[f"{prefix}.{key}"] = tuple(shape)
    return shapes


def optional_shapes(cfg: S3GenConfig) -> dict[str, tuple[int, ...]]:
    """The two S3Tokenizer buffers the reference tolerates missing (recomputed when absent)."""
    return {f"tokenizer.{k}": tuple(v) for k, v in s3tokenizer.optional_shapes(cfg.tokenizer).items()}


class S3Gen(nn.Module):
    """Tokens -> mel (flow) -> waveform (HiFT), plus the voice front-end networks."""

    def __init__(self, cfg: S3GenConfig):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = s3tokenizer.S3Tokenizer(cfg.tokenizer)
        self.speaker_encoder = campplus.CAMPPlus(cfg.campplus)
        self.flow = meanflow.MeanFlow(cfg.flow) if cfg.meanflow else flow_mod.Flow(cfg.flow)
        self.mel2wav = hifigan.HiFTGenerator(cfg.hift)

    def load_upstream(self, weights: dict[str, np.ndarray]) -> None:
        """Load s3gen.safetensors tensors (already checked against upstream_shapes)."""
        for prefix, module in parts(self.cfg):
            part = {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}
            converted = module.convert_weights(part, self.cfg.part(prefix))
            getattr(self, prefix).load_weights(list(converted.items()), strict=True)
