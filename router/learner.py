"""`Learner`: the router's use of the output-length predictor. Before placement, `predict` gives the request's
output-length quantiles (p50, p90) from its prompt, once per request and off the event loop; None without a
predictor, or when the predictor fails (placement then takes the request to run to max_tokens: a predictor
fault never fails a request). Once the request finishes, `learn` scores the prediction against the length it
had (Prometheus) and feeds that back to the predictor's calibration."""

from __future__ import annotations

import asyncio
import logging

from router.metrics import RouterMetrics
from router.predictor.prediction import LengthPrediction, TextPredictor
from router.request import Request
from router.tokenizer import PromptTokenizer

log = logging.getLogger(__name__)


class Learner:
    def __init__(self, predictor: TextPredictor | None, tokenizer: PromptTokenizer, metrics: RouterMetrics) -> None:
        self.predictor = predictor  # None: no prediction; may be replaced between requests
        self.tokenizer = tokenizer
        self.metrics = metrics

    async def predict(self, request: Request, prompt_ids: list[int]) -> LengthPrediction | None:
        """The predictor's quantiles of the request's output length; None without one or when it fails."""
        predictor = self.predictor
        if predictor is None:
            return None
        text = prompt_text(request)
        if text is None:
            text = self.tokenizer.decode(prompt_ids)
        try:
            return await asyncio.to_thread(predictor.predict_text, text, len(prompt_ids), request.sampling.max_tokens)
        except Exception:
            log.exception("output-length prediction failed for request %s", request.request_id)
            return None

    def learn(self, prediction: LengthPrediction | None, generated: int) -> None:
        """A request predicted as `prediction` (None: not predicted, nothing to learn) generated `generated`."""
        if prediction is None:
            return
        self.metrics.predicted(prediction.p50, prediction.p90, generated)
        if self.predictor is not None:
            self.predictor.observe(prediction, generated)


def prompt_text(request: Request) -> str | None:
    """The text a length predictor reads: the prompt, or a chat's last user message; None for token ids."""
    if request.prompt is not None:
        return request.prompt
    if request.chat is not None:
        return next((m.content for m in reversed(request.chat) if m.role == "user"), request.chat[-1].content)
    return None
