"""Config distribution, modelled on Envoy's xDS: the operator's side of the config stream.

`hub` tracks which sidecar runs which version and enforces one push in flight per sidecar;
`auth` turns a sidecar's ServiceAccount token into an identity with the TokenReview API;
`server` is the aiohttp WebSocket endpoint (TLS) that ties the two together.
"""
