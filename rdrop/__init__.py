"""R-Drop for Vision Transformers: the loss, and the library code `train.py` and `eval.py` share."""

import os
import warnings

# Paddle's import-time chatter: C++ info lines (glog), and a warning that no compiler cache exists,
# which only its C++-extension builder would use. Entry points import rdrop before paddle for this.
os.environ.setdefault("GLOG_minloglevel", "2")
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

__all__ = ["RDropLoss", "rdrop_logits", "symmetric_kl"]


def __getattr__(name):
    """The loss on first use: importing `rdrop` (or rdrop.preemption) must not import Paddle, so that
    train.py can hold the stop signals before Paddle installs its handler (rdrop/preemption.py)."""
    if name in __all__:
        from rdrop import loss

        return getattr(loss, name)
    raise AttributeError(f"module 'rdrop' has no attribute {name!r}")
