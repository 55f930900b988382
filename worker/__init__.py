"""The shared worker base: the Ray actor host, the vLLM engine glue, the request-channel server, core binding."""
