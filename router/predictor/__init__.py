"""The serving half of the output-length predictor: predictions, features, the quantile head, calibration."""
