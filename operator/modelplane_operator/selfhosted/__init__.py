"""Self-hosted models in the cluster: EndpointSlice discovery (`discovery.py`), the vLLM server
the operator runs for a template (`workload.py`), and the shared load scrape (`loadshare.py`).
See docs/self-hosted.md."""
