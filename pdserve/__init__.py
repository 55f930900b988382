"""pdserve: serve large language models with prefill and decode disaggregated across a Ray cluster."""

from common.version import VERSION as __version__

__all__ = ["__version__"]
