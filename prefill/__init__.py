"""The prefill pool: Ray actors hosting vLLM engines that run prompts and hand their KV cache on."""
