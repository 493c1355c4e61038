"""One row of a model family's parameter table (`models/<family>/params.py`): all we know about a tensor."""
from __future__ import annotations

import dataclasses
import functools
import re

from kimina_jax.parallel.rules import LogicalDim


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """A tensor's HF name, its dotted path in our model, the logical axes of our layout, and whether HF stores
    it transposed (torch Linear weights are [out, in], our kernels [in, out]).

    In a table, `{layer}` in the names stands for a decoder layer's index (`at_layer` fills it in).
    """

    hf_name: str
    name: str
    axes: tuple[LogicalDim, ...]
    transpose: bool = False

    @property
    def path(self) -> tuple[str | int, ...]:
        """The parameter's key in `nnx.to_flat_state` (layer indices as ints)."""
        return tuple(int(part) if part.isdigit() else part for part in self.name.split("."))

    def at_layer(self, layer: int) -> ParamSpec:
        return dataclasses.replace(
            self, hf_name=self.hf_name.format(layer=layer), name=self.name.format(layer=layer)
        )

    def matches(self, path: str) -> bool:
        """Whether the dotted `path` is this parameter, alone or nested in a bigger tree (optimizer moments)."""
        return _pattern(self.name).search(path) is not None


@functools.cache
def _pattern(name: str) -> re.Pattern:
    return re.compile(r"(?:^|\.)" + re.escape(name).replace(re.escape("{layer}"), r"\d+") + "$")
