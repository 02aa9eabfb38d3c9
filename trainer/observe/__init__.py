"""Observability: MFU and peak FLOP/s, the progress display and run summary.

Prometheus metrics, heartbeats and straggler statistics land here too.
"""
