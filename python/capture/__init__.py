"""The capture layer: what every LoRA layer saw in forward and backward, held for the step.

An oplora optimizer steps from each LoRA layer's captured X (the branch input) and sD (the
gradient at the branch output), never from the factors' ``.grad``. This package owns that:

* :mod:`~oplora.capture.sites` -- finding the LoRA layers of a model (PEFT, ``oplora.LoRALinear``,
  torchtune; linear, conv, embedding) as :class:`LoRASite` objects, or saying why not
  (:class:`Unsupported`);
* :mod:`~oplora.capture.capture` -- :class:`Capture`, the forward and tensor hooks that record
  ``(X, sD, s)`` during backward with no host synchronisation;
* :mod:`~oplora.capture.holding` -- what is held between backward and step and how it stays
  bounded (``capture=``, ``capture_budget=``), rows without gradient dropped at the step;
* :mod:`~oplora.capture.folded`, :mod:`~oplora.capture.sketch` -- a layer's rows folded into its
  dense gradient, or sketched in memory that does not grow with tokens;
* :mod:`~oplora.capture.lifetime` -- what is held lives exactly as long as the factors' ``.grad``
  (``zero_grad``, ``clip_grad_norm_``, GradScaler);
* :mod:`~oplora.capture.rows` (dense or token-id rows), :mod:`~oplora.capture.patches` (Conv
  patches), :mod:`~oplora.capture.hooks` (hooks that survive copies and torch.compile).

It depends on the package's top level only (``oplora.layers``, ``oplora._checks``,
``oplora._dtensor``); the optimizers (``oplora.optim``) build on it.
"""

from .capture import CAPTURE_MODES, Capture
from .folded import Folded
from .holding import check_budget
from .patches import PATCH_BLOCK, conv_patches
from .sites import KINDS, LoRASite, Unsupported, find_lora_sites
from .sketch import Sketch, sketch_numbers

__all__ = ["Capture", "CAPTURE_MODES", "LoRASite", "Folded", "Unsupported", "find_lora_sites", "KINDS",
           "PATCH_BLOCK", "conv_patches", "check_budget", "Sketch", "sketch_numbers"]
