"""The performance model and planner: predict an iteration before renting the cluster.

An analytical model of one training iteration of an MoE config on a cluster
(``hardware``: GPU type, GPUs per node, NVLink and NIC bandwidth, kernel and
collective efficiencies) in a layout (``layout``: n, pp, virtual stages, dp,
micro-batch, attention and FFN modes, overlap, chunks, gradient sync, FP8,
activation policy; two presets and the config as written). ``layer`` times
one MoE layer (compute from FLOPs and shape-dependent efficiencies,
collectives from ``trainer.parallel.volumes``, what the overlap schedule
leaves exposed); ``model`` assembles the iteration (1F1B pipeline slots and
bubbles, interleaved or not, DP synchronisation, optimizer) into seconds,
tokens/s and MFU; ``memory`` counts bytes per GPU; ``search`` ranks the
layouts the trainer accepts; ``command`` is ``megamoe plan``. The equations, every
parameter's source and the comparison with the paper: docs/PLANNER.md.

Pure arithmetic: nothing here starts a process, touches a device or times
this machine; the ``cpu`` profile reads the probes bench/probes.py recorded.
"""

from trainer.plan.hardware import GPUS, Hardware, hardware_profile
from trainer.plan.layout import (
    Layout,
    baseline_like,
    from_config,
    megamoe,
    megatron,
    trainer_layout,
)
from trainer.plan.model import Prediction, ablation_ladder, predict
from trainer.plan.search import search

__all__ = [
    "GPUS",
    "Hardware",
    "Layout",
    "Prediction",
    "ablation_ladder",
    "baseline_like",
    "from_config",
    "hardware_profile",
    "megamoe",
    "megatron",
    "predict",
    "search",
    "trainer_layout",
]
