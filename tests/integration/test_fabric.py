"""The emulated cluster fabric: real namespaces, veth links, tc, gloo over TCP; torn down after."""

import subprocess

import pytest
import torch
import torch.distributed as dist

from bench.fabric import PREFIX, Fabric


def sum_of_ranks(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return {"sum": t.item(), "backend": dist.get_backend()}


def _namespaces():
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


@pytest.mark.timeout(180)
def test_ranks_in_separate_namespaces_talk_over_the_fabric_and_it_is_torn_down():
    with Fabric(nodes=2, ranks_per_node=1, intra_mbit=1000, inter_mbit=200) as fab:
        assert len(_namespaces()) == 3  # two ranks and the switch
        results = fab.run("tests.integration.test_fabric:sum_of_ranks", world=2, kwargs={})
    assert [r["sum"] for r in results] == [3.0, 3.0]
    assert results[0]["backend"] == "gloo"
    assert _namespaces() == []


@pytest.mark.timeout(120)
def test_a_failing_rank_is_reported_and_the_fabric_still_goes_away():
    with pytest.raises(Exception, match="rank"), Fabric(1, 2, 1000, 1000) as fab:
        fab.run("tests.integration.test_fabric:no_such_function", world=2, kwargs={}, timeout=60)
    assert _namespaces() == []
