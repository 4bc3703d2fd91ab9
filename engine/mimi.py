"""Mimi, the neural audio codec CSM speaks in: our own PyTorch module, no transformers at run time.

Loading transformers' MimiModel cost every process that speaks ~4.4 s of imports on a 2-core
machine (its modeling code pulls in torch.distributed.tensor and torch._dynamo), more than the
rest of `load("tiny")` together. This module computes the same codec (tests/engine/test_mimi.py
checks it against transformers' MimiModel on the same weights: equal codes, equal audio) and
keeps the flat parameter names of Sesame's checkpoints (`codec_model.encoder.layers.0.conv...`),
so their tensors load without renaming; transformers' nested names are mapped (`flat_key`).

Layout (Kyutai's Mimi, causal throughout):
- SEANet encoder `encoder.layers` (convolutions, residual blocks, ELU; strides 4, 5, 6, 8) ->
  `encoder_transformer` (pre-norm layers, RoPE, sliding-window causal attention, layer scale) ->
  `downsample` (stride-2 convolution, 25 -> 12.5 Hz) -> split residual VQ (`quantizer`: one
  semantic codebook, then the acoustic ones) -> codes;
- codes -> `quantizer` sums -> `upsample` (grouped transposed convolution) -> `decoder_transformer`
  -> SEANet decoder `decoder.layers` -> 24 kHz audio. engine/mimi_stream.py runs this half frame
  by frame on the same modules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import checked

ACTIVATIONS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}
PAD_MODES = ("constant", "replicate")


@dataclasses.dataclass(frozen=True)
class MimiSpec:
    """The codec's shape; the defaults are Mimi's (sesame/csm-1b's codec_config)."""

    sampling_rate: int = 24_000
    audio_channels: int = 1
    hidden_size: int = 512
    num_filters: int = 64
    num_residual_layers: int = 1
    upsampling_ratios: tuple[int, ...] = (8, 6, 5, 4)
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    pad_mode: str = "constant"
    compress: int = 2
    codebook_size: int = 2048
    codebook_dim: int = 256
    num_quantizers: int = 32
    num_semantic_quantizers: int = 1
    vector_quantization_hidden_dimension: int = 256
    upsample_groups: int = 512
    num_hidden_layers: int = 8
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_key_value_heads: int = 8
    head_dim: int = 64
    hidden_act: str = "gelu"
    norm_eps: float = 1e-5
    rope_theta: float = 10_000.0
    sliding_window: int = 250
    layer_scale_initial_scale: float = 0.01
    attention_bias: bool = False
    frame_rate: float = 12.5

    @property
    def hop(self) -> int:
        """Audio samples per encoder step (SEANet's strides multiplied: 960)."""
        return math.prod(self.upsampling_ratios)

    @property
    def latent_stride(self) -> int:
        """Encoder steps per codec frame (Mimi: 25 Hz / 12.5 Hz = 2); 1: no down/upsampling."""
        return int(math.ceil(self.sampling_rate / self.hop) / self.frame_rate)

    @property
    def samples_per_frame(self) -> int:
        return self.hop * self.latent_stride

    @classmethod
    def from_config(cls, cfg: Any, where: str = "codec_config") -> MimiSpec:
        """From a transformers MimiConfig (or anything with its attribute names) or a dict of them
        (config.json's codec_config). Settings this causal codec does not have are refused by name."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        for key, want in (("use_causal_conv", True), ("trim_right_ratio", 1.0), ("use_conv_shortcut", False)):
            if get(key, want) != want:
                raise ValueError(f"{where}: {key}={get(key)!r} is not supported (Mimi's is {want!r})")
        rope = get("rope_parameters") or get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{where}: rope_parameters must be an object, got {rope!r:.60}")
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"{where}: rope type {rope.get('rope_type', rope.get('type'))!r} is not supported; "
                             "Mimi uses the default rotary embedding")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            value = get(f.name)
            if value is not None:
                kw[f.name] = _typed(f.name, value, f.default, where)
        theta = rope.get("rope_theta", get("rope_theta"))
        if theta is not None:
            kw["rope_theta"] = _typed("rope_theta", theta, cls.rope_theta, where)
        hidden, heads = kw.get("hidden_size", cls.hidden_size), kw.get("num_attention_heads", cls.num_attention_heads)
        if get("codebook_dim", 0) is None:  # stated as null: the width, as transformers takes it
            kw["codebook_dim"] = hidden
        kw["head_dim"] = get("head_dim") or hidden // heads
        if "frame_rate" not in kw:  # transformers derives it (a dict may not say): SEANet's hop, then 2
            ratios = kw.get("upsampling_ratios", cls.upsampling_ratios)
            kw["frame_rate"] = kw.get("sampling_rate", cls.sampling_rate) / (math.prod(ratios) * 2)
        try:
            spec = cls(**kw)
        except TypeError as e:
            raise ValueError(f"{where}: {e}") from None
        spec.check(where)
        return spec

    def check(self, where: str = "codec_config") -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"{where}: hidden_act {self.hidden_act!r} is not supported; one of {sorted(ACTIVATIONS)}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"{where}: pad_mode {self.pad_mode!r} is not supported; one of {PAD_MODES}")
        if not 0 < self.num_semantic_quantizers < self.num_quantizers:
            raise ValueError(f"{where}: num_semantic_quantizers must be in 1..num_quantizers - 1 "
                             f"({self.num_quantizers - 1}), got {self.num_semantic_quantizers}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{where}: num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


def _typed(name: str, value: Any, default: Any, where: str) -> Any:
    """A codec_config value checked against the kind of MimiSpec's default for it (config.json
    may say anything)."""
    kind = ("flag" if isinstance(default, bool) else "text" if isinstance(default, str) else
            "finite" if isinstance(default, float) else "size" if isinstance(default, int) else "sizes")
    return checked(name, value, kind, f"{where}: ")


# -- convolutions ----------------------------------------------------------------------------------
class CausalConv1d(nn.Module):
    """Left-padded convolution; the right is padded just enough that every input sample is read
    (the last window completed). `pad_mode` as Mimi's: zeros, or the edge sample repeated."""

    def __init__(self, spec: MimiSpec, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, bias: bool = True, pad_mode: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride, dilation=dilation, groups=groups, bias=bias)
        self.causal, self.pad_mode = True, pad_mode or spec.pad_mode
        self.pad = (kernel - 1) * dilation + 1 - stride  # left: the receptive field less one stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.conv.stride[0]
        extra = -x.shape[-1] % s  # to a whole number of strides
        return self.conv(F.pad(x, (self.pad, extra), mode=self.pad_mode))


class CausalConvTranspose1d(nn.Module):
    """Transposed convolution with its (kernel - stride) overhang trimmed on the right: output
    sample t depends on inputs up to t // stride only."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias)
        self.padding_left, self.padding_right = 0, kernel - stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., : y.shape[-1] - self.padding_right]


class ResidualBlock(nn.Module):
    """SEANet's: x + conv1(elu(conv_k(elu(x)))), the inner width dim // compress."""

    def __init__(self, spec: MimiSpec, dim: int, dilation: int) -> None:
        super().__init__()
        hidden = dim // spec.compress
        wide = CausalConv1d(spec, dim, hidden, spec.residual_kernel_size, dilation=dilation)
        self.block = nn.ModuleList([nn.ELU(), wide, nn.ELU(), CausalConv1d(spec, hidden, dim, 1)])
        self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for m in self.block:
            y = m(y)
        return x + y


def _run(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for m in layers:
        x = m(x)
    return x


def seanet_encoder(spec: MimiSpec) -> nn.ModuleList:
    layers: list[nn.Module] = [CausalConv1d(spec, spec.audio_channels, spec.num_filters, spec.kernel_size)]
    width = spec.num_filters
    for ratio in reversed(spec.upsampling_ratios):
        layers += [ResidualBlock(spec, width, spec.dilation_growth_rate**j) for j in range(spec.num_residual_layers)]
        layers += [nn.ELU(), CausalConv1d(spec, width, width * 2, ratio * 2, stride=ratio)]
        width *= 2
    return nn.ModuleList(layers + [nn.ELU(), CausalConv1d(spec, width, spec.hidden_size, spec.last_kernel_size)])


def seanet_decoder(spec: MimiSpec) -> nn.ModuleList:
    width = spec.num_filters * 2 ** len(spec.upsampling_ratios)
    layers: list[nn.Module] = [CausalConv1d(spec, spec.hidden_size, width, spec.kernel_size)]
    for ratio in spec.upsampling_ratios:
        layers += [nn.ELU(), CausalConvTranspose1d(width, width // 2, ratio * 2, ratio)]
        width //= 2
        layers += [ResidualBlock(spec, width, spec.dilation_growth_rate**j) for j in range(spec.num_residual_layers)]
    return nn.ModuleList(layers + [nn.ELU(), CausalConv1d(spec, spec.num_filters, spec.audio_channels,
                                                          spec.last_kernel_size)])


# -- transformer -----------------------------------------------------------------------------------
def rope_cos_sin(inv_freq: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim] at integer positions `pos` (the halves-rotated RoPE layout)."""
    ang = pos[..., None].float() * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, hd]; cos/sin [B, T, hd]: each half-pair (i, i + hd/2) rotated by its angle."""
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + turned * sin[:, None]


class LayerScale(nn.Module):
    def __init__(self, spec: MimiSpec) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((spec.hidden_size,), spec.layer_scale_initial_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class Attention(nn.Module):
    def __init__(self, spec: MimiSpec) -> None:
        super().__init__()
        d, hd, bias = spec.hidden_size, spec.head_dim, spec.attention_bias
        self.heads, self.kv_heads, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, hd
        self.scaling = hd**-0.5
        self.q_proj = nn.Linear(d, self.heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=bias)


class MLP(nn.Module):
    def __init__(self, spec: MimiSpec) -> None:
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.fc2 = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)
        self.act = ACTIVATIONS[spec.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    def __init__(self, spec: MimiSpec) -> None:
        super().__init__()
        self.self_attn, self.mlp = Attention(spec), MLP(spec)
        self.input_layernorm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps)
        self.self_attn_layer_scale, self.mlp_layer_scale = LayerScale(spec), LayerScale(spec)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, D] -> q [B, H, T, hd], k and v [B, KV, T, hd], q and k rotated."""
        a, (B, T, _) = self.self_attn, x.shape
        h = self.input_layernorm(x)
        q = apply_rope(a.q_proj(h).view(B, T, a.heads, a.head_dim).transpose(1, 2), cos, sin)
        k = apply_rope(a.k_proj(h).view(B, T, a.kv_heads, a.head_dim).transpose(1, 2), cos, sin)
        return q, k, a.v_proj(h).view(B, T, a.kv_heads, a.head_dim).transpose(1, 2)

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input x and the attention's o [B, H, T, hd]."""
        B, T, _ = x.shape
        x = x + self.self_attn_layer_scale(self.self_attn.o_proj(o.transpose(1, 2).reshape(B, T, -1)))
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


class Transformer(nn.Module):
    """Pre-norm layers over a whole sequence from position 0: causal attention to the last
    `sliding_window` steps (engine/mimi_stream.py keeps the same window frame by frame)."""

    def __init__(self, spec: MimiSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList([Layer(spec) for _ in range(spec.num_hidden_layers)])
        hd = spec.head_dim  # RoPE's frequencies, moved with the module and kept out of its state
        inv = 1.0 / spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        cos, sin = rope_cos_sin(self.inv_freq, pos[None].expand(B, T), x.dtype)
        back = pos[:, None] - pos[None, :]  # query minus key position
        mask = (back >= 0) & (back < self.spec.sliding_window)
        for layer in self.layers:
            a = layer.self_attn
            q, k, v = layer.qkv(x, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scaling,
                                               enable_gqa=a.heads != a.kv_heads)
            x = layer.finish(x, o)
        return x


# -- residual vector quantizer -------------------------------------------------------------------
class Codebook(nn.Module):
    """Centroids kept as running sums and usage counts (Mimi's checkpoint buffers); a code's
    vector is embed_sum / usage."""

    def __init__(self, spec: MimiSpec, eps: float = 1e-5) -> None:
        super().__init__()
        self.register_buffer("initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(spec.codebook_size))
        self.register_buffer("embed_sum", torch.zeros(spec.codebook_size, spec.codebook_dim))
        self.eps = eps
        self._embed: torch.Tensor | None = None
        self._made_from: tuple | None = None

    @property
    def embed(self) -> torch.Tensor:
        """[codebook_size, dim], computed once; again after a move to another device or dtype, and
        after a load (`_load_from_state_dict`) or `init_random`, which drop it."""
        key = (self.embed_sum.data_ptr(), self.cluster_usage.data_ptr(), self.embed_sum.dtype)
        if self._embed is None or self._made_from != key:
            self._embed = self.embed_sum / self.cluster_usage.clamp(min=self.eps)[:, None]
            self._made_from = key
        return self._embed

    def _load_from_state_dict(self, *args, **kwargs):
        self._embed = None
        super()._load_from_state_dict(*args, **kwargs)


class ResidualVQ(nn.Module):
    def __init__(self, spec: MimiSpec, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module() for _ in range(n)])
        for m in self.layers:
            m.codebook = Codebook(spec)
        dim, vq = spec.hidden_size, spec.vector_quantization_hidden_dimension
        self.input_proj = nn.Conv1d(dim, vq, 1, bias=False) if vq != dim else None
        self.output_proj = nn.Conv1d(vq, dim, 1, bias=False) if vq != dim else None

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [B, D, T] -> codes [n, B, T]: each codebook quantizes what the ones before left."""
        if self.input_proj is not None:
            x = self.input_proj(x)
        residual, codes = x.transpose(1, 2), []  # [B, T, vq]
        for m in self.layers[:n]:
            embed = m.codebook.embed
            flat = residual.reshape(-1, residual.shape[-1])
            idx = torch.cdist(flat[None].float(), embed[None].float())[0].argmin(dim=-1).view(residual.shape[:-1])
            residual = residual - F.embedding(idx, embed)
            codes.append(idx)
        return torch.stack(codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, T] -> [B, D, T], the sum of the codebooks' vectors (projected)."""
        out = sum(F.embedding(codes[:, i], m.codebook.embed) for i, m in enumerate(self.layers[: codes.shape[1]]))
        out = out.transpose(1, 2)
        return self.output_proj(out) if self.output_proj is not None else out


class SplitResidualVQ(nn.Module):
    """The first `num_semantic_quantizers` codes from one RVQ, the rest from another (both over
    the same latents)."""

    def __init__(self, spec: MimiSpec) -> None:
        super().__init__()
        self.n_sem, self.n_max = spec.num_semantic_quantizers, spec.num_quantizers
        self.semantic_residual_vector_quantizer = ResidualVQ(spec, self.n_sem)
        self.acoustic_residual_vector_quantizer = ResidualVQ(spec, self.n_max - self.n_sem)

    def encode(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if not self.n_sem <= n <= self.n_max:
            raise ValueError(f"num_quantizers must be in {self.n_sem}..{self.n_max}, got {n}")
        codes = self.semantic_residual_vector_quantizer.encode(x, self.n_sem)
        if n > self.n_sem:
            codes = torch.cat([codes, self.acoustic_residual_vector_quantizer.encode(x, n - self.n_sem)])
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.semantic_residual_vector_quantizer.decode(codes[:, : self.n_sem])
        if codes.shape[1] > self.n_sem:
            out = out + self.acoustic_residual_vector_quantizer.decode(codes[:, self.n_sem :])
        return out


# -- the codec -----------------------------------------------------------------------------------
class Mimi(nn.Module):
    def __init__(self, spec: MimiSpec) -> None:
        super().__init__()
        spec.check()
        self.spec = spec
        self.encoder = nn.Module()
        self.encoder.layers = seanet_encoder(spec)
        self.encoder_transformer = Transformer(spec)
        self.decoder_transformer = Transformer(spec)
        self.decoder = nn.Module()
        self.decoder.layers = seanet_decoder(spec)
        self.quantizer = SplitResidualVQ(spec)
        s, d = spec.latent_stride, spec.hidden_size
        self.downsample = self.upsample = None
        if s > 1:
            self.downsample = CausalConv1d(spec, d, d, 2 * s, stride=s, bias=False, pad_mode="replicate")
            self.upsample = CausalConvTranspose1d(d, d, 2 * s, s, groups=spec.upsample_groups, bias=False)

    def encode(self, audio: torch.Tensor, num_quantizers: int | None = None) -> torch.Tensor:
        """audio [B, 1, samples] -> codes [B, n, frames] (frames = ceil(samples / 1920))."""
        h = _run(self.encoder.layers, audio)
        h = self.encoder_transformer(h.transpose(1, 2)).transpose(1, 2)
        if self.downsample is not None:
            h = self.downsample(h)
        return self.quantizer.encode(h, num_quantizers or self.spec.num_quantizers).transpose(0, 1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n, frames] -> audio [B, 1, frames * 1920]."""
        h = self.quantizer.decode(codes)
        if self.upsample is not None:
            h = self.upsample(h)
        h = self.decoder_transformer(h.transpose(1, 2)).transpose(1, 2)
        return _run(self.decoder.layers, h)


# transformers >= 5.2x nests Mimi's halves (MimiModel.encoder.encoder_seanet...); checkpoints and
# this module keep the flat names
_NESTED_TO_FLAT = (
    ("encoder.encoder_seanet.layers.", "encoder.layers."),
    ("encoder.encoder_transformer.", "encoder_transformer."),
    ("encoder.downsample.", "downsample."),
    ("decoder.upsample.", "upsample."),
    ("decoder.decoder_transformer.", "decoder_transformer."),
    ("decoder.decoder_seanet.layers.", "decoder.layers."),
)


def flat_key(key: str) -> str:
    for nested, flat in _NESTED_TO_FLAT:
        if key.startswith(nested):
            return flat + key[len(nested) :]
    return key


def load_state(mimi: Mimi, state: dict[str, torch.Tensor]) -> None:
    """Strict load of flat or nested (transformers') names; ValueError naming what does not fit."""
    state = {flat_key(k): v for k, v in state.items()}
    own = mimi.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = sorted(f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items()
                   if k in own and v.shape != own[k].shape)
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)) if keys]
    if problems:
        raise ValueError("; ".join(problems))
    mimi.load_state_dict(state, strict=True)


@torch.no_grad()
def init_random(mimi: Mimi, seed: int, codebook_std: float = 0.05) -> Mimi:
    """Seeded random weights in the usual style (Kaiming convolutions, N(0, 0.02) projections, unit
    norms, Mimi's layer scale), and random codebook centroids, so that audio depends on the codes."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std):
        t.copy_(torch.randn(t.shape, generator=g) * std)

    for _, m in sorted(mimi.named_modules(), key=lambda named: named[0]):  # a fixed order: by name
        if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d)):
            fan_in = m.weight.shape[1] * m.weight.shape[2]
            normal(m.weight, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                bound = math.sqrt(m.groups / (m.in_channels * m.kernel_size[0]))
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * bound)
        elif isinstance(m, nn.Linear):
            normal(m.weight, 0.02)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
        elif isinstance(m, LayerScale):
            m.scale.fill_(mimi.spec.layer_scale_initial_scale)
        elif isinstance(m, Codebook):
            normal(m.embed_sum, codebook_std)
            m.cluster_usage.fill_(1.0)
            m._embed = None
    return mimi
