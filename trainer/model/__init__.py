"""Architecture only: norms, RoPE, attention, router, experts, the reference model, FLOPs.

Nothing here creates process groups; parallel layouts are applied to these
modules from ``trainer.parallel``.
"""

from trainer.model.flops import flops_per_token, total_params
from trainer.model.transformer import MoEStats, MoETransformer, lm_loss

__all__ = ["MoEStats", "MoETransformer", "flops_per_token", "lm_loss", "total_params"]
