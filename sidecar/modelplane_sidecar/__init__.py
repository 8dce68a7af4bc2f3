"""Modelplane sidecar: the per-pod data plane that classifies, routes and forwards LLM calls."""
