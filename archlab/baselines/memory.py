"""Memory slot ``none``: no memory sublayer (the default).

A memory plugin adds a sublayer before the attention of the layers listed in its config:
    h ← residual.write(h, m(norm(residual.read(h)), ctx))     at each layer l in ``layers``
The core reads only ``Config.layers`` (distinct indices in [0, n_layers)); ``none`` lists none,
so the student is exactly the attention/ffn stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from archlab.context import ModelDims
from archlab.errors import ConfigError


class NoMemory(nn.Module):
    @dataclass
    class Config:
        layers: list[int] = field(default_factory=list)

        def validate(self, dims: ModelDims) -> None:
            if self.layers:
                raise ConfigError("memory.layers", self.layers, "[] for memory=none (choose a memory plugin)")
