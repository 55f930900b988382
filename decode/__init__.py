"""The decode pool: Ray actors hosting vLLM engines that continue (or, colocated, run whole) requests."""
