"""The output-length predictor: labelling the served model, training a quantile head, evaluating it.

`label` runs the served model over ShareGPT prompts and writes output lengths to a JSON-lines file; `train`
fits a small head on sentence embeddings or hashed n-grams to predict the p50 and p90 of the output length;
`evaluate` scores heads on the held-out split against a prompt-length-only baseline. `metrics`, `labels`,
`refine_eval` and `calibration` are pure; the rest are I/O shells. The router's online object is
`router.predictor.learned`.
"""
