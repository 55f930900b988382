"""The learned output-length predictor the router asks for every request, calibrated online.

`LearnedLengthPredictor.predict_text` turns the prompt text into the features its head was trained on (the
head file's kind: a MiniLM embedding, see `router.predictor.features`; hashed n-grams, see
`router.predictor.hashed`; or the prompt's length alone), runs the trained quantile head and returns a
`LengthPrediction` capped by the request's `max_tokens`; its p90 is scaled by a `P90Calibrator`. The router
reports each finished request with `observe(prediction, generated)`, which moves the calibration so that about
90% of requests finish at or below their p90. The p50 is left as the head predicts it: ranking and placement
use it, and its median property does not drift the way tail coverage does. Unlike the baselines'
`predict(prompt_tokens, max_tokens)`, this predictor needs the prompt's text.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from router.predictor.calibration import P90Calibrator
from router.predictor.features import Embedder, length_feature, prompt_features
from router.predictor.hashed import feature_matrix
from router.predictor.head import QuantileHead, load_head, to_tokens
from router.predictor.prediction import LengthPrediction


class LearnedLengthPredictor:
    def __init__(self, head: QuantileHead, embedder: Embedder | None = None,
                 calibrator: P90Calibrator | None = None) -> None:
        self._head = head.eval()
        self._uses_embedding = head.config.features not in ("length", "hashed")
        if self._uses_embedding and embedder is None:
            embedder = Embedder()
        self._embedder = embedder
        self.calibrator = calibrator or P90Calibrator()

    @classmethod
    def load(cls, head_file: str | Path, calibrator: P90Calibrator | None = None) -> LearnedLengthPredictor:
        return cls(load_head(head_file), calibrator=calibrator)

    @torch.inference_mode()
    def raw(self, prompts: list[str], prompt_tokens: list[int]) -> torch.Tensor:
        """[n, 2] uncalibrated log(1 + length) at the p50 and p90."""
        config = self._head.config
        if self._uses_embedding:
            assert self._embedder is not None
            x = prompt_features(self._embedder.embed(prompts), prompt_tokens)
        elif config.features == "hashed":
            x = feature_matrix(prompts, prompt_tokens, config.buckets)
        else:
            x = length_feature(prompt_tokens)
        out: Any = self._head(x)
        return out

    def predict_text(self, prompt: str, prompt_tokens: int, max_tokens: int) -> LengthPrediction:
        log_p50, log_p90 = (float(v) for v in self.raw([prompt], [prompt_tokens])[0])
        p50 = to_tokens(log_p50, max_tokens)
        p90 = to_tokens(math.log1p(self.calibrator.apply(math.expm1(log_p90))), max_tokens)
        return LengthPrediction(p50, max(p90, p50))

    def observe(self, prediction: LengthPrediction, generated: int) -> None:
        """A finished request: the prediction it was given and the tokens it generated."""
        self.calibrator.observe(prediction.p90, generated)
