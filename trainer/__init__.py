"""megamoe's training engine: config, model, data, parallel layouts, training loop.

Importable without the control plane (``service``). ``trainer.config`` and
``trainer.errors`` import no torch, so the control plane can validate job specs
without building a model.
"""

__version__ = "0.1.0"
