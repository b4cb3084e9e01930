"""The R-Drop training step of configs/cpu_comparison.yaml in PyTorch, for the speed comparison.

    pip install torch==2.13.0      # a CPU build is enough; torch is not a dependency of this project
    python scripts/torch_reference.py --img-size=32 --patch=4 --dim=192 --depth=12 --heads=3 --mlp=768 \
        --classes=100 --batch=64 --steps=5 --warmup=2 --threads=2 --alpha=0.3

scripts/benchmark.py --torch-reference scripts/torch_reference.py runs it with the config's sizes
(once with --alpha=0 for the plain step). The step is the one train.py runs for that config:

- the model of models/vit.py: pre-norm blocks, one fused q/k/v projection, exact GELU, layer norm
  eps 1e-6, class token, learned position embedding, head on the class token; dropout (--dropout,
  0.1) after the position embedding and after the MLP's GELU and fc2, no attention dropout or drop path;
- R-Drop with concat_batch: one forward pass over the batch concatenated with itself, loss
  CE(a) + CE(b) + alpha * (KL(P_a||P_b) + KL(P_b||P_a)), the KL summed over the micro-batch
  (kl_reduction sum); alpha 0 is the plain step, one pass and one CE;
- SGD with momentum 0.9 and lr 0.01, no weight decay, gradients clipped to global norm 1.0.

Random images and labels: it measures the step only. Prints one JSON line: framework, version,
threads, img_per_s (distinct images per second: R-Drop sees each twice and it counts once),
step_time_s (the mean over --steps timed steps after --warmup untimed ones), batch, alpha.
"""

import argparse
import json
import sys
import time

try:
    import torch
except ImportError as error:
    # Not through rdrop.errors: importing rdrop imports Paddle, which this measurement of PyTorch must not load.
    print(f"error: scripts/torch_reference.py needs PyTorch ({error}): pip install torch==2.13.0", file=sys.stderr)
    sys.exit(2)
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPSILON = 1e-6
LEARNING_RATE, MOMENTUM, GRAD_CLIP = 0.01, 0.9, 1.0


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens):
        batch, length, width = tokens.shape
        query, key, value = self.qkv(tokens).reshape(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        context = F.scaled_dot_product_attention(query, key, value)
        return self.proj(context.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, dim, mlp, dropout):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(tokens)))))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp, dropout):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPSILON)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPSILON)
        self.mlp = Mlp(dim, mlp, dropout)

    def forward(self, tokens):
        tokens = tokens + self.attn(self.norm1(tokens))
        return tokens + self.mlp(self.norm2(tokens))


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """models/vit.py's VisionTransformer, parameters named alike (Paddle stores Linear weights [in, out])."""

    def __init__(self, img_size, patch, dim, depth, heads, mlp, classes, dropout):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (img_size // patch) ** 2 + 1, dim))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPSILON)
        self.head = nn.Linear(dim, classes)

    def forward(self, images):
        patches = self.patch_embed(images)
        tokens = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        tokens = self.pos_drop(tokens + self.pos_embed)
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(self.norm(tokens)[:, 0])


def rdrop_loss(model, images, labels, alpha):
    """The objective train.py minimises for one micro-batch (rdrop/loss.py, kl_reduction sum)."""
    if alpha == 0:
        return F.cross_entropy(model(images), labels)
    logits_a, logits_b = model(torch.cat([images, images])).chunk(2)
    log_p, log_q = F.log_softmax(logits_a, -1), F.log_softmax(logits_b, -1)
    symmetric_kl = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum()
    return F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels) + alpha * symmetric_kl


def make_step(model, alpha):
    """One optimizer step on (images, labels); returns the loss tensor."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    def step(images, labels):
        loss = rdrop_loss(model, images, labels, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        return loss

    return step


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = dict(img_size=32, patch=4, dim=192, depth=12, heads=3, mlp=768, classes=100, batch=64)
    for name, default in dict(sizes, steps=5, warmup=2, threads=0).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--alpha", type=float, default=0.3, help="R-Drop weight; 0 is the plain step")
    parser.add_argument("--dropout", type=float, default=0.1)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VisionTransformer(
        args.img_size, args.patch, args.dim, args.depth, args.heads, args.mlp, args.classes, args.dropout
    ).train()
    step = make_step(model, args.alpha)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size)
    labels = torch.randint(0, args.classes, (args.batch,))
    for _ in range(args.warmup):
        step(images, labels)
    start = time.perf_counter()
    for _ in range(args.steps):
        step(images, labels)
    step_time = (time.perf_counter() - start) / args.steps  # CPU ops are synchronous: the step is done
    result = dict(
        framework="torch",
        version=torch.__version__,
        threads=torch.get_num_threads(),
        img_per_s=args.batch / step_time,
        step_time_s=step_time,
        batch=args.batch,
        alpha=args.alpha,
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
