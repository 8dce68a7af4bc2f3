"""Modelplane operator: the control plane.

It compiles custom resources into the sidecar's RouterConfig, distributes it to sidecars and
serves the injection webhook.
"""
