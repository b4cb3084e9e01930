"""R-Drop for Vision Transformers: the loss, and the library code `train.py` and `eval.py` share."""

import os
import warnings

# Paddle's import-time chatter: C++ info lines (glog), and a warning that no compiler cache exists,
# which only its C++-extension builder would use. Entry points import rdrop before paddle for this.
os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

from rdrop.loss import RDropLoss, rdrop_logits, symmetric_kl  # noqa: E402

__all__ = ["RDropLoss", "rdrop_logits", "symmetric_kl"]
