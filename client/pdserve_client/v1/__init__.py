"""Generated from proto/pdserve/v1/*.proto by proto/generate.py."""
