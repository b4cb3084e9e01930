"""R-Drop for Vision Transformers: the loss, and the library code `train.py` and `eval.py` share."""
from rdrop.loss import RDropLoss, rdrop_logits, symmetric_kl

__all__ = ["RDropLoss", "rdrop_logits", "symmetric_kl"]
