"""What an initializer did, layer by layer: the record saved beside every run."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class LayerReport:
    name: str
    filters: int
    objective_before: float = math.nan
    objective_after: float = math.nan
    cosine_after: float = math.nan
    steps: int = 0
    seconds: float = 0.0


@dataclass
class InitReport:
    """Per-layer record of an init: objective (eq. 3) before/after, cosine penalty (eq. 4) after, steps, time.

    ``options`` holds the resolved settings; ``joint_before``/``joint_after`` the whole joint loss
    (sum of objectives minus ``cosine_weight`` times the penalties, the quantity joint init maximizes).
    """

    method: str
    layers: list[LayerReport] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    seconds: float = 0.0
    joint_before: float = math.nan
    joint_after: float = math.nan
    history: list = field(default_factory=list)  # [gradient step, joint objective on that step's batch]
    skipped: dict = field(default_factory=dict)  # layer name -> why the init left it as it was

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InitReport":
        d = dict(d)
        d["layers"] = [LayerReport(**x) for x in d.get("layers", [])]
        return cls(**d)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))

    @classmethod
    def load(cls, path) -> "InitReport":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __str__(self) -> str:
        head = f"init {self.method}: {self.seconds:.2f}s"
        if not math.isnan(self.joint_after):
            head += f", joint objective {self.joint_before:.4g} -> {self.joint_after:.4g}"
        lines = [head]
        lines.append(f"{'layer':<24}{'filters':>8}{'obj before':>12}{'obj after':>12}{'cos pen':>10}{'steps':>7}{'sec':>8}")
        for r in self.layers:
            lines.append(
                f"{r.name:<24}{r.filters:>8}{r.objective_before:>12.4g}{r.objective_after:>12.4g}"
                f"{r.cosine_after:>10.3g}{r.steps:>7}{r.seconds:>8.2f}"
            )
        for name, why in self.skipped.items():
            lines.append(f"{name:<24} left as it was: {why}")
        return "\n".join(lines)
