"""Our own Llama-family forward pass over Hugging Face weights, reading K/V from the paged pool.

One forward pass runs a *packed* batch: the tokens of every scheduled sequence laid end to end
(single-token sequences — decodes — first, then prefill chunks). Everything except attention is
batched over all tokens; attention runs batched for the single-token sequences (padded gather of
their context from the pool) and per sequence for prefill chunks (scaled_dot_product_attention
with a causal mask offset by the tokens already in the pool).

Numerics follow transformers' Llama: RMSNorm in float32, RoPE tables computed in float32 and cast,
softmax scale head_dim ** -0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backends.engines.native.kv_cache import KVPool

# Llama-family decoders this forward pass reproduces exactly (Qwen2 adds QKV biases).
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass
class PrefillSeq:
    """One prefill chunk inside the packed batch."""

    q_start: int  # offset of its first token in the packed batch
    q_len: int
    ctx_len: int  # context length once this chunk is written (= last position + 1)
    ctx_slots: torch.Tensor | None = None  # [ctx_len] pool slots; None for a fresh prompt
    mask: torch.Tensor | None = None  # [q_len, ctx_len] bool, True = attend


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T] where each token's K/V goes
    num_single: int = 0  # tokens [0, num_single) are single-token sequences
    single_slots: torch.Tensor | None = None  # [B, max_ctx] context slots (padded)
    single_mask: torch.Tensor | None = None  # [B, 1, 1, max_ctx] bool or None (no padding)
    prefill: list[PrefillSeq] = field(default_factory=list)
    sample_idx: torch.Tensor | None = None  # [S] packed offsets whose logits we need


class _Layer:
    __slots__ = ("ln1", "ln2", "wqkv", "bqkv", "wo", "bo", "wgu", "wdown")


class NativeLlama:
    """Weights (fused QKV and gate/up projections) plus the forward pass."""

    def __init__(self, hf_model, dtype: torch.dtype, device: torch.device | str) -> None:
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model type {cfg.model_type!r} is not supported by the native engine "
                f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
            )
        if getattr(cfg, "sliding_window", None) and cfg.sliding_window < cfg.max_position_embeddings:
            raise ValueError("sliding-window attention is not supported by the native engine")
        self.config = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.hidden = cfg.hidden_size
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.num_heads
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {cfg.hidden_act!r} (Llama family uses silu)")

        def w(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=self.device, dtype=dtype)

        base = hf_model.model
        self.embed = w(base.embed_tokens.weight)
        self.norm = w(base.norm.weight)
        tied = hf_model.lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr()
        self.lm_head = self.embed if tied else w(hf_model.lm_head.weight)
        self.layers: list[_Layer] = []
        for hl in base.layers:
            a, m = hl.self_attn, hl.mlp
            layer = _Layer()
            layer.ln1 = w(hl.input_layernorm.weight)
            layer.ln2 = w(hl.post_attention_layernorm.weight)
            layer.wqkv = w(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0))
            layer.bqkv = (
                w(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], 0)) if a.q_proj.bias is not None else None
            )
            layer.wo = w(a.o_proj.weight)
            layer.bo = w(a.o_proj.bias) if a.o_proj.bias is not None else None
            if getattr(m.gate_proj, "bias", None) is not None:
                raise ValueError("MLP biases are not supported")
            layer.wgu = w(torch.cat([m.gate_proj.weight, m.up_proj.weight], 0))
            layer.wdown = w(m.down_proj.weight)
            self.layers.append(layer)
        self.intermediate = self.layers[0].wgu.shape[0] // 2

        # RoPE: inv_freq and attention scaling as transformers computed them from the config
        # (rope_theta and any rope scaling: linear, llama3, yarn, ...), tables in float32.
        rotary = base.rotary_emb
        inv_freq = rotary.inv_freq.detach().float().cpu()
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        pos = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos = (emb.cos() * scaling).to(device=self.device, dtype=dtype)
        self.sin = (emb.sin() * scaling).to(device=self.device, dtype=dtype)
        self.scale = self.head_dim**-0.5

    # ---- pieces -------------------------------------------------------------------------
    def _rmsnorm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # as transformers does, whatever the model dtype
        var = xf.pow(2).mean(-1, keepdim=True)
        xf = xf * torch.rsqrt(var + self.eps)
        return weight * xf.to(x.dtype)

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + self._rotate_half(x) * sin

    # ---- forward ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: KVPool) -> torch.Tensor:
        """Run the packed batch, write its K/V into the pool, return logits [S, vocab]."""
        H, KVH, D = self.num_heads, self.num_kv_heads, self.head_dim
        T = batch.input_ids.shape[0]
        x = F.embedding(batch.input_ids, self.embed)
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, D]
        sin = self.sin[batch.positions].unsqueeze(1)
        nb = batch.num_single
        for li, layer in enumerate(self.layers):
            h = self._rmsnorm(x, layer.ln1)
            qkv = F.linear(h, layer.wqkv, layer.bqkv)
            q, k, v = qkv.split([H * D, KVH * D, KVH * D], dim=-1)
            q = self._rope(q.view(T, H, D), cos, sin)
            k = self._rope(k.view(T, KVH, D), cos, sin)
            v = v.view(T, KVH, D)
            kc, vc = pool.k[li], pool.v[li]
            kc.index_copy_(0, batch.write_slots, k)
            vc.index_copy_(0, batch.write_slots, v)

            out = torch.empty_like(q)
            if nb:
                # Single-token sequences: one padded, batched attention over their contexts.
                ks = kc[batch.single_slots].transpose(1, 2)  # [B, KVH, ctx, D]
                vs = vc[batch.single_slots].transpose(1, 2)
                qs = q[:nb].unsqueeze(2)  # [B, H, 1, D]
                o = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=batch.single_mask, scale=self.scale, enable_gqa=KVH != H
                )
                out[:nb] = o.squeeze(2)
            for seq in batch.prefill:
                s, e = seq.q_start, seq.q_start + seq.q_len
                qs = q[s:e].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
                if seq.ctx_slots is None:  # fresh prompt: its own K/V, causal
                    ks = k[s:e].transpose(0, 1).unsqueeze(0)
                    vs = v[s:e].transpose(0, 1).unsqueeze(0)
                    o = F.scaled_dot_product_attention(
                        qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=KVH != H
                    )
                else:  # a later chunk: earlier positions come from the pool
                    ks = kc[seq.ctx_slots].transpose(0, 1).unsqueeze(0)
                    vs = vc[seq.ctx_slots].transpose(0, 1).unsqueeze(0)
                    o = F.scaled_dot_product_attention(
                        qs, ks, vs, attn_mask=seq.mask, scale=self.scale, enable_gqa=KVH != H
                    )
                out[s:e] = o[0].transpose(0, 1)
            x = x + F.linear(out.view(T, H * D), layer.wo, layer.bo)

            h = self._rmsnorm(x, layer.ln2)
            gate, up = F.linear(h, layer.wgu).split(self.intermediate, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.wdown)

        if batch.sample_idx is not None:
            x = x[batch.sample_idx]
        x = self._rmsnorm(x, self.norm)
        return F.linear(x, self.lm_head)
