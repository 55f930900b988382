"""pdserve-tools: benchmarks, the simulator, predictor labelling and training, chaos runs."""
