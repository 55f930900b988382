"""The output-length predictor: labelling the served model, training a quantile head, evaluating it.

`label` runs the served model over ShareGPT prompts and writes output lengths to a JSON-lines file; `train`
fits a small head on sentence embeddings to predict the p50 and p90 of the output length; `evaluate` scores a
head on the held-out split against a prompt-length-only baseline. `metrics`, `labels` and `calibration` are
pure; the rest are I/O shells. The router's online object is `router.predictor.learned`.
"""
