"""Llama in plain PyTorch (gpt-fast style): presets, seeded random weights, HF safetensors loading.

Decode runs layer by layer through :meth:`Transformer.pre_attention` (norm, fused QKV, RoPE, K/V write
into the pool) and :meth:`Transformer.post_attention` (output projection, SwiGLU MLP), so the engine
can put any tree-attention method between them, time it, or capture the dense parts in CUDA graphs.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deft.attention import DTYPES, AttentionShape


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 frequency-dependent RoPE scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    """Shape and numerics of one Llama model; ``conf/model/<name>.yaml`` holds the same fields."""

    name: str = "llama3_8b"
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_size: int = 4096
    intermediate_size: int = 14336
    vocab_size: int = 128256
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    rms_eps: float = 1e-5
    dtype: str = "bfloat16"
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model {self.name}: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model {self.name}: head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in DTYPES:
            raise ValueError(f"model {self.name}: dtype {self.dtype!r} unknown; use one of {sorted(DTYPES)}")

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> ModelArgs:
        """From a ``conf/model`` mapping (extra keys such as ``weights`` and ``seed`` are ignored)."""
        d = {k: v for k, v in dict(cfg).items() if k in {f.name for f in fields(cls)}}
        d.update({k: v for k, v in overrides.items() if v is not None})
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, RopeScaling):
            d["rope_scaling"] = RopeScaling(**{k: v for k, v in dict(rs).items() if k != "rope_type"})
        return cls(**d)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def attention_shape(self) -> AttentionShape:
        return AttentionShape(self.n_heads, self.n_kv_heads, self.head_dim, self.dtype, self.n_layers)

    @property
    def n_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = h * (self.n_heads + 2 * self.n_kv_heads) * d + self.n_heads * d * h + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + h


_LLAMA3 = dict(n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_size=4096, intermediate_size=14336,
               vocab_size=128256, rope_theta=500000.0)  # fmt: skip

#: presets keyed by the ``name`` of ``conf/model/<name>.yaml``
PRESETS: dict[str, ModelArgs] = {
    "llama3_8b": ModelArgs("llama3_8b", **_LLAMA3, dtype="bfloat16"),
    "llama3_1_8b": ModelArgs("llama3_1_8b", **_LLAMA3, rope_scaling=RopeScaling(), dtype="float16"),
    "llama2_7b": ModelArgs("llama2_7b", 32, 32, 32, 128, 4096, 11008, 32000, 10000.0, dtype="float16"),
    "tiny": ModelArgs("tiny", 2, 4, 2, 16, 64, 128, 256, 10000.0, dtype="float32"),
}


# ---------------------------------------------------------------------- layers
def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (fp32, ``head_dim / 2``), with Llama-3.1 scaling when the model has it."""
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        mid = (1 - smooth) * inv / s.factor + smooth * inv
        inv = torch.where(wavelen > low_wavelen, inv / s.factor, torch.where(wavelen < high_wavelen, inv, mid))
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [n, heads, head_dim]`` by position in HF's half-split layout, in three kernels.

    ``cos [n, 1, head_dim]`` is ``cat(cos, cos)`` and ``sin`` is ``cat(-sin, sin)`` (see :meth:`Transformer.rope`),
    so ``x * cos + cat(x2, x1) * sin`` is HF's ``x * cos + rotate_half(x) * sin``.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat((x2, x1), dim=-1), sin)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    """Fused QKV projection and output projection; the attention itself is the engine's method."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        d = args.head_dim
        self.wqkv = nn.Linear(args.hidden_size, (args.n_heads + 2 * args.n_kv_heads) * d, bias=False)
        self.wo = nn.Linear(args.n_heads * d, args.hidden_size, bias=False)


class FeedForward(nn.Module):
    """SwiGLU with the gate and up projections fused (``w13``)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.w13 = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_eps)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_eps)


class Transformer(nn.Module):
    """Llama: token embedding, ``n_layers`` blocks, final norm, LM head."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_eps)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.inv_freq: torch.Tensor | None = None

    # ------------------------------------------------------------------ pieces the engine calls
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cat(cos, cos)`` and ``cat(-sin, sin)``, ``[n, 1, head_dim]`` in the model dtype, for 0-based ``positions``
        (once per step, shared by every layer)."""
        if self.inv_freq is None or self.inv_freq.device != positions.device:
            self.inv_freq = rope_inv_freq(self.args).to(positions.device)
        ang = positions.float()[:, None, None] * self.inv_freq  # fp32 angles, as HF computes them
        cos, sin = ang.cos(), ang.sin()
        dtype = self.output.weight.dtype
        return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(tokens)

    def pre_attention(
        self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, k_pool, v_pool
    ) -> torch.Tensor:
        """Layer ``i`` up to attention: returns ``q [n, n_heads, head_dim]``; writes the tokens' K/V at ``slots``."""
        a = self.args
        n = x.shape[0]
        blk = self.layers[i]
        qkv = blk.attention.wqkv(blk.attention_norm(x))
        q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1)
        q = apply_rope(q.view(n, a.n_heads, a.head_dim), cos, sin)
        k = apply_rope(k.view(n, a.n_kv_heads, a.head_dim), cos, sin)
        k_pool.index_copy_(0, slots, k)
        v_pool.index_copy_(0, slots, v.view(n, a.n_kv_heads, a.head_dim))
        return q

    def post_attention(self, i: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Layer ``i`` after attention: output projection, residual, SwiGLU MLP, residual."""
        blk = self.layers[i]
        x = x + blk.attention.wo(o.reshape(x.shape[0], -1))
        return x + blk.feed_forward(blk.ffn_norm(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: logits ``[n, vocab]``."""
        return self.output(self.norm(x))

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, slots: torch.Tensor, k_pools: list, v_pools: list) -> torch.Tensor:
        """Causal forward over the prompt with PyTorch SDPA, writing its K/V at ``slots``; logits of the last token."""
        a = self.args
        n = tokens.shape[0]
        group = a.n_heads // a.n_kv_heads
        x = self.embed(tokens)
        cos, sin = self.rope(torch.arange(n, device=tokens.device))
        for i, blk in enumerate(self.layers):
            qkv = blk.attention.wqkv(blk.attention_norm(x))
            q, k, v = qkv.split([a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1)
            q = apply_rope(q.view(n, a.n_heads, a.head_dim), cos, sin)
            k = apply_rope(k.view(n, a.n_kv_heads, a.head_dim), cos, sin)
            v = v.view(n, a.n_kv_heads, a.head_dim)
            k_pools[i].index_copy_(0, slots, k)
            v_pools[i].index_copy_(0, slots, v)
            # [1, heads, n, head_dim], KV heads expanded (query head h reads KV head h // group) so the flash
            # backend takes it; 3-D inputs would fall back to the math backend and materialise n x n scores
            kh = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
            vh = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
            with _fused_sdpa(tokens.device):
                o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kh, vh, is_causal=True)
            x = self.post_attention(i, x, o[0].transpose(0, 1))
        return self.head(x[-1:])[0]


def _fused_sdpa(device: torch.device):
    """On a GPU, only fused SDPA backends: a prompt of 16k tokens must never reach the O(n^2)-memory math path."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


# ---------------------------------------------------------------------- construction
@torch.no_grad()
def init_random(model: Transformer, seed: int, std: float = 0.02) -> Transformer:
    """Seeded N(0, std) weights and unit norms, drawn in fp32 on the model's device (one tensor at a time)."""
    dev = model.output.weight.device
    g = torch.Generator(device=dev).manual_seed(int(seed))
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.empty(p.shape, dtype=torch.float32, device=dev).normal_(0.0, std, generator=g))
    return model


def build_model(
    args: ModelArgs, device: str | torch.device = "cpu", weights: str | Path | None = None, seed: int = 0
) -> Transformer:
    """The model on ``device`` in ``args.dtype``: seeded random weights, or a local HF safetensors checkpoint."""
    with torch.device("meta"):
        model = Transformer(args).to(args.torch_dtype)  # cast on meta: no fp32 copy of 8B weights on the device
    model = model.to_empty(device=device)
    if weights:
        load_hf_checkpoint(model, weights)
    else:
        init_random(model, seed)
    return model.eval().requires_grad_(False)


def _hf_layer_names(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {
        "q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight", "v": p + "self_attn.v_proj.weight",
        "o": p + "self_attn.o_proj.weight", "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight",
        "down": p + "mlp.down_proj.weight", "attn_norm": p + "input_layernorm.weight",
        "ffn_norm": p + "post_attention_layernorm.weight",
    }  # fmt: skip


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path} (model.weights must be a local HF checkpoint)")
    return files


def load_hf_checkpoint(model: Transformer, path: str | Path) -> Transformer:
    """Load HF Llama tensors (``model.layers.N.self_attn.q_proj.weight``...) from a file or a folder of shards."""
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise ImportError("model.weights needs the safetensors package (pip install safetensors)") from e
    path = Path(path)
    sd: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(path):
        sd.update(load_file(str(f)))
    a = model.args
    cfg_file = (path if path.is_dir() else path.parent) / "config.json"
    if cfg_file.exists():
        hf = json.loads(cfg_file.read_text())
        for ours, theirs in (("n_layers", "num_hidden_layers"), ("hidden_size", "hidden_size"), ("vocab_size", "vocab_size")):
            if theirs in hf and hf[theirs] != getattr(a, ours):
                raise ValueError(f"checkpoint {path}: {theirs}={hf[theirs]} but model {a.name} has {ours}={getattr(a, ours)}")

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise KeyError(f"checkpoint {path} has no tensor {name!r} (is it a Llama checkpoint in HF format?)")
        return sd.pop(name)

    def put(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"checkpoint {path}: {what} has shape {tuple(value.shape)}, model {a.name} expects {tuple(param.shape)}")
        param.copy_(value)

    with torch.no_grad():
        put(model.tok_embeddings.weight, take("model.embed_tokens.weight"), "model.embed_tokens.weight")
        put(model.norm.weight, take("model.norm.weight"), "model.norm.weight")
        head = sd.pop("lm_head.weight", None)
        put(model.output.weight, head if head is not None else model.tok_embeddings.weight, "lm_head.weight")
        for i, blk in enumerate(model.layers):
            n = _hf_layer_names(i)
            put(blk.attention.wqkv.weight, torch.cat([take(n["q"]), take(n["k"]), take(n["v"])]), f"layer {i} q/k/v_proj")
            put(blk.attention.wo.weight, take(n["o"]), n["o"])
            put(blk.feed_forward.w13.weight, torch.cat([take(n["gate"]), take(n["up"])]), f"layer {i} gate/up_proj")
            put(blk.feed_forward.w2.weight, take(n["down"]), n["down"])
            put(blk.attention_norm.weight, take(n["attn_norm"]), n["attn_norm"])
            put(blk.ffn_norm.weight, take(n["ffn_norm"]), n["ffn_norm"])
    leftover = [k for k in sd if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"checkpoint {path} has tensors the model does not use: {leftover[:5]}")
    return model


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under HF Llama names (what :func:`load_hf_checkpoint` reads)."""
    a = model.args
    qd, kd = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    sd = {
        "model.embed_tokens.weight": model.tok_embeddings.weight,
        "model.norm.weight": model.norm.weight,
        "lm_head.weight": model.output.weight,
    }
    for i, blk in enumerate(model.layers):
        n = _hf_layer_names(i)
        q, k, v = blk.attention.wqkv.weight.split([qd, kd, kd])
        gate, up = blk.feed_forward.w13.weight.chunk(2)
        sd.update({n["q"]: q, n["k"]: k, n["v"]: v, n["o"]: blk.attention.wo.weight, n["gate"]: gate, n["up"]: up,
                   n["down"]: blk.feed_forward.w2.weight, n["attn_norm"]: blk.attention_norm.weight,
                   n["ffn_norm"]: blk.ffn_norm.weight})  # fmt: skip
    return {k: t.detach().contiguous().cpu() for k, t in sd.items()}


def save_hf_checkpoint(model: Transformer, path: str | Path) -> Path:
    """Write the model as one HF-named safetensors file (tests and small models)."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(hf_state_dict(model), str(path))
    return path


def model_args(name_or_cfg: str | Any, **overrides: Any) -> ModelArgs:
    """A preset by name, or the args of a ``conf/model`` mapping, with overrides (e.g. ``dtype=``)."""
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in PRESETS:
            raise KeyError(f"unknown model preset {name_or_cfg!r}; presets: {sorted(PRESETS)}")
        return replace(PRESETS[name_or_cfg], **{k: v for k, v in overrides.items() if v is not None})
    return ModelArgs.from_config(name_or_cfg, **overrides)
