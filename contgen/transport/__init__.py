"""Transport family (UCGM and friends): transports (α, γ, α̂, γ̂), objectives and solvers over image-level
denoisers or per-token heads. Plain PyTorch, importable without Hydra or Lightning."""

from contgen.transport.transports import (
    EDM,
    TRANSPORTS,
    Linear,
    ReLinear,
    ShortcutLinear,
    Transport,
    TrigFlow,
    TrigLinear,
    build_transport,
    expand_time,
)
from contgen.transport.solvers import CFGDenoiser, EulerSampler, HeunSampler, UCGMSampler, time_grid

__all__ = [
    "EDM", "TRANSPORTS", "Linear", "ReLinear", "ShortcutLinear", "Transport", "TrigFlow", "TrigLinear", "build_transport",
    "expand_time", "CFGDenoiser", "EulerSampler", "HeunSampler", "UCGMSampler", "time_grid",
]
