"""R-Drop for Vision Transformers: the loss, and the library code `train.py` and `eval.py` share."""
import warnings

# Paddle warns at import that no compiler cache exists; only its C++-extension builder would use one.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)

from rdrop.loss import RDropLoss, rdrop_logits, symmetric_kl  # noqa: E402

__all__ = ["RDropLoss", "rdrop_logits", "symmetric_kl"]
