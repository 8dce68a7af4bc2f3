"""Several operator replicas at once: leader election and the fleet's sidecar counts.

Every replica serves the injection webhook and the config stream and compiles configs for the
sidecars connected to it. One of them, the leader elected with a coordination.k8s.io/v1 Lease
(`election`), writes status and Events and keeps the budget books; followers relay their
sidecars' spend messages to it (`distribution/relay.py`). Each replica publishes how many of its
sidecars run which version in a Lease of its own, and the leader sums the fresh ones (`fleet`).
`replica` ties these to the controller and the stream server; `cli` holds the flags.
docs/operator.md ("Several replicas") says why it is built this way.
"""
