"""The bottom layer: what the router and the workers share (roles, sampling, engine results, errors, the
request channel's wire format)."""
