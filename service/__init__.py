"""megamoe's control plane and command line.

``service.cli`` is the ``megamoe`` command. The control plane (gRPC server,
etcd store, reconciler, executors) lands here; it imports only torch-free
trainer modules.
"""
