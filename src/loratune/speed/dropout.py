"""Counter-based dropout: the keep mask is a hash of (step seed, site, element index), not a draw from the RNG.

Why our own: with activation recomputation inside a compiled layer (speed.compile), every random op must be
replayed identically in the backward graph. torch 2.11's partitioner fails on the Phi-2 layer's random ops
("Node ... was invalid, but is output", measured on an H100), and `functionalize_rng_ops` works but then saves
instead of recomputing (18.2 GiB peak instead of 3.4). A mask that is a pure function of its inputs needs no RNG
state at all: the recomputation yields the same mask by construction, and Inductor fuses the hash into the kernel
that applies it (no mask tensor is ever stored).

Each dropout site (a LoRA projection's input dropout, the model's own residual dropout) has a fixed salt; the seed
is one int64 tensor shared by all sites and refilled from torch's generator at every micro-batch (`next_seed`), so
runs are reproducible under `training.seed` and masks differ between steps, layers and sites. The hash is murmur3's
32-bit finalizer (in int32 arithmetic), whose output bits are uniform; keep probability is exact to 2^-24. Used only inside compiled
layers; eager code keeps torch's dropout.
"""

from __future__ import annotations

import torch

SEED = "_loratune_dropout_seed"
SALT = "_loratune_dropout_salt"
RATES = "_loratune_dropout_ppm"  # on fused LoRA projections: {adapter: drop probability in parts per million}
PPM = 1_000_000


def _i32(c: int) -> int:
    """A 32-bit constant as the int32 with the same bits (Triton types literals of 2^31 and above as uint32,
    which does not mix with int tensors: the kernel failed to compile with them)."""
    return c - (1 << 32) if c >= 1 << 31 else c


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer on int32 (multiplication wraps; the masks turn arithmetic shifts into logical ones)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _i32(0x85EBCA6B)
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _i32(0xC2B2AE35)
    return h ^ ((h >> 16) & 0xFFFF)


def to_ppm(p: float) -> int:
    return round(p * PPM)


def hashed_dropout(x: torch.Tensor, ppm: int, seed: torch.Tensor, salt: torch.Tensor, col0: int = 0) -> torch.Tensor:
    """Inverted dropout of `x` with drop probability ppm / 10^6; the mask depends only on (seed, salt, index).

    The probability is an int on purpose: a float module attribute is traced as a symbolic value, the arithmetic
    on it lands outside the recomputed region, and the partitioner then saved `x * scale` of every dropout site
    for backward (measured: 7.33 GiB peak on Phi-2 instead of 3.4; tests/test_compiled_layers.py checks the saved
    bytes). Ints on modules are constants to torch.compile.

    The element index enters as (row, column) through additions and xors only: Inductor folds index
    arithmetic, and a flat index times a 32-bit constant became a literal too large for int32 in the kernel.
    `col0`: the first column's index, when x is a column slice of a wider tensor (speed.chunked_mlp): the slice
    gets the very mask the whole tensor would."""
    x2 = x.reshape(-1, x.shape[-1])
    rows = torch.arange(x2.shape[0], device=x.device, dtype=torch.int32)[:, None]
    cols = torch.arange(col0, col0 + x2.shape[1], device=x.device, dtype=torch.int32)[None, :]
    key = _fmix32(seed.to(torch.int32) * 0x632BE5AB + salt.to(torch.int32))
    bits = (_fmix32(_fmix32(rows + key) ^ cols) >> 8) & 0xFFFFFF  # the top 24 bits, uniform in [0, 2^24)
    keep = bits >= (ppm << 24) // PPM
    out = torch.where(keep, x2 * (PPM / (PPM - ppm)), torch.zeros((), dtype=x.dtype, device=x.device))
    return out.view(x.shape)


class HashedDropout(torch.nn.Module):
    """Drop-in for nn.Dropout inside compiled layers (same p, same train/eval behaviour)."""

    def __init__(self, p: float, seed: torch.Tensor, salt: int):
        super().__init__()
        self.p = p
        self.ppm = to_ppm(p)
        self.register_buffer(SEED, seed, persistent=False)
        self.register_buffer(SALT, torch.tensor(salt, dtype=torch.int64, device=seed.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.ppm == 0:
            return x
        return hashed_dropout(x, self.ppm, getattr(self, SEED), getattr(self, SALT))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def install(layers: list[torch.nn.Module], device: torch.device | str) -> torch.Tensor | None:
    """Give every dropout site in `layers` a salt and the shared seed: nn.Dropout children become HashedDropout,
    fused LoRA projections (speed.lora) get the two buffers. Returns the seed tensor (None if no site)."""
    seed = torch.zeros((), dtype=torch.int64, device=device)
    sites = 0
    for layer in layers:
        for parent in list(layer.modules()):
            if hasattr(parent, "_loratune_peft_forward"):
                sites += 1
                parent.register_buffer(SEED, seed, persistent=False)
                parent.register_buffer(SALT, torch.tensor(sites, dtype=torch.int64, device=device), persistent=False)
                parent.__dict__[RATES] = {name: to_ppm(d.p) if isinstance(d, torch.nn.Dropout) else 0
                                          for name, d in parent.lora_dropout.items()}
                continue
            if isinstance(parent, torch.nn.ModuleDict):
                continue  # peft's lora_dropout dict: the fused projection applies that dropout itself
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Dropout and child.p > 0:
                    sites += 1
                    hashed = HashedDropout(child.p, seed, sites)
                    hashed.train(child.training)
                    setattr(parent, name, hashed)
    return seed if sites else None


def next_seed(seed: torch.Tensor) -> None:
    """A fresh seed for the next micro-batch, drawn from torch's (seeded) CPU generator."""
    seed.fill_(int(torch.randint(0, 2**31 - 1, (1,))))
