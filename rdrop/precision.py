"""Mixed precision: `train.amp` -> the autocast context and the loss scaler.

Weights stay float32 (they are the master weights: `auto_cast` level O1 casts inputs of matmuls and
convolutions per op), so the optimizer update and the checkpoints are float32 whatever `amp` says.
fp16 needs dynamic loss scaling, bf16 does not. On CPU, Paddle's auto_cast and GradScaler do nothing,
so the same code runs everywhere.
"""

import contextlib

import paddle

AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def autocast(amp):
    if amp == "none":
        return contextlib.nullcontext()
    return paddle.amp.auto_cast(enable=True, level="O1", dtype=AMP_DTYPES[amp])


def loss_scaler(amp):
    """Dynamic loss scaling for fp16; a disabled scaler (a plain pass-through) otherwise."""
    return paddle.amp.GradScaler(enable=amp == "fp16", init_loss_scaling=2.0**15)
