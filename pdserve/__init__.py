"""pdserve: serve large language models with prefill and decode disaggregated across a Ray cluster."""

__version__ = "0.1.0"
