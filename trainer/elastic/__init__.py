"""Elastic runs over etcd: the key schema, the etcd client, and torchrun's etcd-v3 rendezvous."""
