"""Training methods the engine runs, registered by name (``method`` in the config, ``--method``).

A method declares the views it needs, builds its models, computes its step's losses and names
what is evaluated (`trainer.methods.base.Method`); the engine owns the loop, EMA, checkpoints,
DDP, logging and evaluation. Registered here:

* ``rs-mtdf`` (default): FixMatch with an EMA teacher plus feature distillation from the
  run's target source; with no teachers (``--no-distill``) it is plain FixMatch.
* ``supervised``: the official supervised-only baseline: labeled views, cross-entropy, the
  same student.
* ``co2s``: Co2S, a CLIP and a DINOv3 student with UniMatch streams and the stability loss
  (no EMA, two optimisers).
"""

from __future__ import annotations  # noqa: I001 - co2s last: registry order = METHOD_NAMES

from trainer.methods.base import METHODS, Method, method_class, register_method
from trainer.methods.rs_mtdf import RSMTDF
from trainer.methods.supervised import Supervised
from trainer.methods.co2s import Co2S

__all__ = [
    "METHODS",
    "Co2S",
    "Method",
    "RSMTDF",
    "Supervised",
    "method_class",
    "register_method",
]
