"""The router: frontends, request lifecycle, instance registry, placement policies."""
