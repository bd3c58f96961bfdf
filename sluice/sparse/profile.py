"""`sparsity.json`: what calibration found per MLP layer, and where its predictors are.

Thresholds, sparsity and predictor quality are JSON; the predictors' weights go beside it in a
safetensors file (`<name>.predictors.safetensors`), named in the JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file

from sluice.sparse.predictor import LowRankPredictor, PredictorQuality

FORMAT_VERSION = 1


@dataclass
class LayerSparsity:
    threshold: float  # |silu(gate) * up| at or below this is dropped
    sparsity: float  # share of neurons dropped on the calibration tokens
    cett: float  # the CETT those thresholds give there
    predictor: PredictorQuality | None = None


@dataclass
class SparsityProfile:
    target_cett: float
    calibration_tokens: int
    layers: list[LayerSparsity]
    predictor_rank: int = 0  # 0: no predictors
    predictors: list[LowRankPredictor] = field(default_factory=list)

    @property
    def mean_sparsity(self) -> float:
        return sum(layer.sparsity for layer in self.layers) / len(self.layers)

    def save(self, path: Path) -> None:
        path = Path(path)
        body = {
            "version": FORMAT_VERSION,
            "target_cett": self.target_cett,
            "calibration_tokens": self.calibration_tokens,
            "mean_sparsity": self.mean_sparsity,
            "predictor_rank": self.predictor_rank,
            "layers": [asdict(layer) for layer in self.layers],
        }
        if self.predictors:
            weights = _predictor_path(path)
            body["predictors"] = weights.name
            save_file(_predictor_tensors(self.predictors), weights)
        path.write_text(json.dumps(body, indent=1) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> SparsityProfile:
        path = Path(path)
        try:
            body = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read sparsity profile {path}: {error}") from None
        if body.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{path}: sparsity profile version {body.get('version')!r}, expected "
                f"{FORMAT_VERSION} (recalibrate with `sluice calibrate-sparsity`)"
            )
        layers = [
            LayerSparsity(
                **{k: v for k, v in layer.items() if k != "predictor"},
                predictor=PredictorQuality(**layer["predictor"]) if layer["predictor"] else None,
            )
            for layer in body["layers"]
        ]
        predictors = []
        if body.get("predictors"):
            predictors = _predictors_from(load_file(path.parent / body["predictors"]), len(layers))
        return cls(
            body["target_cett"],
            body["calibration_tokens"],
            layers,
            body["predictor_rank"],
            predictors,
        )


def _predictor_path(path: Path) -> Path:
    return path.with_name(path.stem + ".predictors.safetensors")


def _predictor_tensors(predictors: list[LowRankPredictor]) -> dict:
    return {
        f"{i}.{name}": getattr(p, name).contiguous()
        for i, p in enumerate(predictors)
        for name in ("down", "up", "bias")
    }


def _predictors_from(tensors: dict, num_layers: int) -> list[LowRankPredictor]:
    return [
        LowRankPredictor(tensors[f"{i}.down"], tensors[f"{i}.up"], tensors[f"{i}.bias"])
        for i in range(num_layers)
    ]
