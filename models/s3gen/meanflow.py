"""Turbo's MeanFlow S3Gen flow: the same encoder and U-Net, 2 plain Euler steps, no CFG.

Port of the `meanflow=True` paths of chatterbox-tts 0.1.7 (s3gen.py, flow.py,
flow_matching.py `basic_euler`, decoder.py, utils/intmeanflow.py):

- The estimator takes a second time input r (the end of the step): t and r are embedded by
  the same sinusoid + `time_mlp`, concatenated and mixed back to one embedding by
  `time_embed_mixer` (Linear 2*4C -> 4C, no bias). Everything else is the original
  estimator (models/s3gen/estimator.py, `meanflow=True`).
- The solver is `basic_euler`: a linear schedule t = linspace(0, 1, n + 1) (no cosine),
  n = 2 steps, batch 1, no classifier-free guidance (the model was distilled with it).
- The checkpoint (`s3gen_meanflow.safetensors`) holds the original S3Gen keys plus
  `flow.decoder.estimator.time_embed_mixer.weight`, loaded strictly by the reference.

`MeanFlow` keeps `Flow.inference`'s signature, so anything that renders with a flow
(one-shot or streamed, models/streaming.py) renders with this one unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import flow as flow_mod
from .flow import EulerSolver, Flow, FlowConfig, build_estimator

MEANFLOW_STEPS = 2  # tts_turbo.generate: n_cfm_timesteps=2
MIXER_KEY = "decoder.estimator.time_embed_mixer.weight"


def meanflow_config(base: FlowConfig) -> FlowConfig:
    """The flow config of a MeanFlow S3Gen: the base dimensions with 2 steps and no CFG."""
    d = base.to_dict()
    d.update(n_timesteps=MEANFLOW_STEPS, inference_cfg_rate=0.0)
    return FlowConfig.from_dict(d)


def upstream_shapes(cfg: FlowConfig) -> dict[str, tuple[int, ...]]:
    """Every key under `flow.` in s3gen_meanflow.safetensors (relative), torch layout."""
    (c,) = cfg.decoder_channels
    return {**flow_mod.upstream_shapes(cfg), MIXER_KEY: (4 * c, 8 * c)}


def convert_weights(weights: dict[str, np.ndarray], cfg: FlowConfig) -> dict[str, mx.array]:
    """Upstream keys -> MeanFlow parameters: the original conversion plus the mixer (a
    Linear, same layout in both)."""
    rest = {k: v for k, v in weights.items() if k != MIXER_KEY}
    if MIXER_KEY not in weights:
        raise ValueError(f"MeanFlow weights lack {MIXER_KEY}")
    mixer = np.asarray(weights[MIXER_KEY], dtype=np.float32)
    if tuple(mixer.shape) != upstream_shapes(cfg)[MIXER_KEY]:
        raise ValueError(f"{MIXER_KEY}: shape {tuple(mixer.shape)}, expected {upstream_shapes(cfg)[MIXER_KEY]}")
    return {**flow_mod.convert_weights(rest, cfg), MIXER_KEY: mx.array(mixer)}


def linear_t_span(n_timesteps: int) -> np.ndarray:
    """(n+1,) float32 linspace(0, 1, n+1), as torch.linspace computes it in float32."""
    return np.linspace(0.0, 1.0, n_timesteps + 1, dtype=np.float32)


class MeanFlowCFM(EulerSolver):
    """`flow.decoder` of a MeanFlow S3Gen: the linear schedule, no guidance, and the step's
    end time r as the estimator's second time input."""

    def t_span(self, n_timesteps: int) -> np.ndarray:
        return linear_t_span(n_timesteps)

    def velocity(self, x: mx.array, t: mx.array, r: mx.array, mu: mx.array, spks: mx.array, cond: mx.array,
                 mask: mx.array | None = None) -> mx.array:
        """The average velocity from t to r, batch as given."""
        b = x.shape[0]
        t_in = mx.full((b,), t, dtype=mx.float32)
        r_in = mx.full((b,), r, dtype=mx.float32)
        return self.estimator(x, mask, mu, t_in, spks, cond, r=r_in).astype(mx.float32)


class MeanFlow(Flow):
    """CausalMaskedDiffWithXvec with the MeanFlow estimator and solver (same `inference`)."""

    @staticmethod
    def build_decoder(cfg: FlowConfig) -> EulerSolver:
        return MeanFlowCFM(build_estimator(cfg, meanflow=True))
