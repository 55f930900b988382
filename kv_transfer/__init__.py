"""KV-cache movement between prefill and decode workers: connector, transports, transfer protocol."""
