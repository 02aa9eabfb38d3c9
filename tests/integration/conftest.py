"""One real etcd per test module, on a free loopback port, stopped by PID afterwards."""

import pytest

from trainer.elastic.server import start_etcd


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory):
    with start_etcd(tmp_path_factory.mktemp("etcd")) as running:
        yield running
