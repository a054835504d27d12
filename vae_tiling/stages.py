"""How one tile is decoded: the decode methods, each a class that carries its own facts.

The method is chosen from the VAE's modules, not its name (``method_for``), once per decode:

* ``KLStages`` ("kl-staged") — SD/SDXL ``AutoencoderKL`` and SD3/Flux ``AutoencodingEngine`` with
  ComfyUI's 2-D ``Decoder``: all that runs at latent resolution (post-quant conv, conv_in, the
  middle block with its full-image attention, the first level of up blocks) runs once over the
  whole latent; only the stages after the first upsample run per tile. Measured on a 640x640 SD
  decode with 256-px tiles against tiling the whole model: better PSNR (the attention sees the
  whole image) and less time (the latent-resolution part is not recomputed in the overlaps).
* ``WanStages`` ("wan-staged") — the Wan 2.1 VAE, split the same way, frame by frame.
* ``FrameCausal`` ("frame-causal") — other frame-causal video VAEs (Wan 2.2): the whole model per
  spatial tile, over every frame, so the causal cache stays continuous through the clip (no
  temporal chunks, no flicker).
* ``Volume`` ("volume") — other video VAEs, which decode a whole clip at once: the whole model on
  a latent crop, cut in time too.
* ``WholeModel`` ("whole-model") — other image VAEs: the whole model's ``decode`` on a latent crop.

The names are what plans and logs print (BENCHMARKS.md quotes them): keep them as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from .comfy_models import wan_cache_layers, wan_vae_module

TileDecoder = Callable[[tuple], torch.Tensor]
"""Decodes the tile at a window (an index into the latent) of the latent it was made for."""

FRAME_CAUSAL_MODULE_PREFIXES = ("comfy.ldm.wan.",)

LATENT_STAGE_BYTES_PER_ELEMENT = 10
"""Working memory of a split decoder's latent-resolution stage, per element of its widest
activation (the middle block's ResNet temporaries and attention output, in the VAE's dtype)."""


def is_frame_causal(model: torch.nn.Module) -> bool:
    """True for video VAEs that decode one latent frame at a time with a causal feature cache."""
    return type(model).__module__.startswith(FRAME_CAUSAL_MODULE_PREFIXES)


ATTENTION_SCORE_BYTES = 32 * 2**20
"""Most bytes of attention scores the latent stage holds at once where ComfyUI's VAE attention is
its split attention (``normal_attention``: the whole score matrix when memory allows, as on a CPU
or an AMD GPU): the queries go in chunks, so that stage's memory grows with the latent, not with
its square (640x640 SD: 328 MB of scores at once, measured as most of the latent stage's 387 MB)."""

SPLIT_ATTENTION = ("comfy.ldm.modules.diffusionmodules.model", "normal_attention")


def split_attention(block: torch.nn.Module) -> bool:
    """True where ComfyUI runs this attention block with its split attention (``normal_attention``)."""
    attention = getattr(block, "optimized_attention", None)
    return ((getattr(attention, "__module__", None), getattr(attention, "__name__", None)) == SPLIT_ATTENTION
            and all(hasattr(block, name) for name in ("norm", "q", "k", "v", "proj_out")))


def chunked_attention_block(block: torch.nn.Module, x: torch.Tensor, score_bytes: int) -> torch.Tensor:
    """ComfyUI's ``AttnBlock.forward`` with its split attention (``slice_attention``'s arithmetic:
    scores, softmax, values, per chunk of queries), the chunks sized to ``score_bytes``."""
    h = block.norm(x)
    q, k, v = block.q(h), block.k(h), block.v(h)
    del h
    b, c, height, width = q.shape
    q = q.reshape(b, c, -1).permute(0, 2, 1)  # b, hw, c
    k, v = k.reshape(b, c, -1), v.reshape(b, c, -1)
    positions = q.shape[1]
    chunk = max(1, score_bytes // (2 * b * positions * q.element_size()))  # scores and their softmax
    out = torch.empty_like(v)
    scale = c ** -0.5
    for start in range(0, positions, chunk):
        scores = torch.bmm(q[:, start:start + chunk], k) * scale
        weights = torch.nn.functional.softmax(scores, dim=2).permute(0, 2, 1)
        del scores
        out[:, :, start:start + chunk] = torch.bmm(v, weights)
        del weights
    return x + block.proj_out(out.reshape(b, c, height, width))


class Method:
    """One way to decode a tile, with the facts the planner needs. This base is the plain way:
    each tile is its latent crop through the whole model's ``decode``."""

    name: ClassVar[str]
    """As plans and logs spell it."""
    ndim: ClassVar[int]
    """The latents it decodes: 4 (images) or 5 (videos)."""
    unsplit: ClassVar[type[Method] | None] = None
    """None for a whole-model method; for a split one (``Stages``), the whole-model method that decodes
    the same tiles without the split (used when the split's latent stage does not fit the free
    memory, when it no longer matches ComfyUI's decode, or to retry after running out of memory)."""
    frame_by_frame: ClassVar[bool] = False
    """Decodes one latent frame at a time, so a clip's length barely adds to its working memory."""
    tiles_time: ClassVar[bool] = False
    """Decodes a whole clip at once, so long clips are cut into chunks in time as well."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        """Whether this method can decode ``model``'s latents (the whole model decodes any)."""
        return True

    def tile_decoder(self, latent: torch.Tensor) -> TileDecoder:
        """A decoder of ``latent``'s tiles; a split method runs its latent stage here, once."""
        return lambda window: self.model.decode(latent[window])

    def latent_stage_memory(self, shape: tuple[int, ...], dtype_size: int) -> float:
        """Bytes of the part run once over the whole latent, before any tile: none here."""
        return 0.0


class WholeModel(Method):
    """Image VAEs that are not split: the whole model per tile."""

    name = "whole-model"
    ndim = 4


class FrameCausal(Method):
    """Frame-causal video VAEs that are not split (Wan 2.2): the whole model per spatial tile, over
    every frame, so each tile's causal cache runs through the whole clip."""

    name = "frame-causal"
    ndim = 5
    frame_by_frame = True

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return is_frame_causal(model)


class Volume(Method):
    """Video VAEs that decode a whole clip at once: the whole model per tile, chunked in time too."""

    name = "volume"
    ndim = 5
    tiles_time = True


class Stages(Method):
    """A split method: ``latent_stage`` runs once over the whole latent, ``upsampling_stage`` on each
    tile's crop of its output (so the latent-resolution part is not recomputed in the overlaps)."""

    unsplit: ClassVar[type[Method]]  # every split method has one
    check_size: ClassVar[tuple[int, ...]]
    """The size (after batch and channels) of the tiny latent the first-use check decodes both ways."""

    def latent_stage(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def upsampling_stage(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_channels(self) -> int:
        """Channels of the latent stage's widest activation."""
        raise NotImplementedError

    def held_attention_bytes(self) -> int:
        """Most bytes of attention scores the latent stage holds at once, beyond its activations."""
        return 0

    def variants(self) -> list[Stages]:
        """These stages as their latent stage runs on large latents, where that differs from a tiny
        latent's run: the first-use check compares them too, as its tiny latent never runs that way."""
        return []

    def tile_decoder(self, latent: torch.Tensor) -> TileDecoder:
        features = self.latent_stage(latent)
        return lambda window: self.upsampling_stage(features[window])

    def latent_stage_memory(self, shape: tuple[int, ...], dtype_size: int) -> float:
        """Its widest activation times ``LATENT_STAGE_BYTES_PER_ELEMENT`` (frame by frame: one frame
        at a time, but the features of every frame are kept for the tiles), plus the attention
        scores it holds at once."""
        frame = shape[-1] * shape[-2] * self.latent_channels() * dtype_size
        frames = shape[2] if self.frame_by_frame else 1
        return float(frame * (LATENT_STAGE_BYTES_PER_ELEMENT + frames) + self.held_attention_bytes())


class KLStages(Stages):
    """Split decode of an ``AutoencoderKL`` whose decoder is ComfyUI's 2-D ``Decoder``."""

    name = "kl-staged"
    ndim = 4
    unsplit = WholeModel
    check_size = (8, 8)

    def __init__(self, model: torch.nn.Module, attention_score_bytes: int = ATTENTION_SCORE_BYTES) -> None:
        super().__init__(model)
        self.decoder = model.decoder
        self.attention_score_bytes = attention_score_bytes

    def _attention(self, block: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """An attention block over the whole latent: ComfyUI's own, except that its split attention
        runs in chunks of queries bounded by ``attention_score_bytes`` (see ``ATTENTION_SCORE_BYTES``)."""
        positions = h.shape[-2] * h.shape[-1]
        scores = 2 * h.shape[0] * positions * positions * h.element_size()  # the scores and their softmax
        if split_attention(block) and scores > self.attention_score_bytes:
            return chunked_attention_block(block, h, self.attention_score_bytes)
        return block(h)

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        decoder = getattr(model, "decoder", None)
        post_quant = getattr(model, "post_quant_conv", None)
        return (
            getattr(model, "bn", None) is None
            # SD/SDXL: AutoencoderKL with a post-quant conv; SD3/Flux: AutoencodingEngine, decoder(z) only
            and (isinstance(post_quant, torch.nn.Conv2d)
                 or (post_quant is None and type(model).__name__ == "AutoencodingEngine"))
            and type(decoder).__name__ == "Decoder"
            and all(hasattr(decoder, name) for name in ("conv_in", "mid", "up", "norm_out", "conv_out"))
            and isinstance(decoder.conv_in, torch.nn.Conv2d)
        )

    def latent_channels(self) -> int:
        return self.decoder.conv_in.out_channels

    def held_attention_bytes(self) -> int:
        return self.attention_score_bytes  # at most, where it is split attention

    def variants(self) -> list[Stages]:
        """The chunked split attention (large latents only): here a chunk per query."""
        if split_attention(self.decoder.mid.attn_1):
            return [KLStages(self.model, attention_score_bytes=1)]
        return []

    def latent_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Everything that runs at latent resolution, over the whole latent."""
        d, mid = self.decoder, self.decoder.mid
        post_quant = getattr(self.model, "post_quant_conv", None)
        h = d.conv_in(post_quant(z) if post_quant is not None else z)
        h = mid.block_1(h, None)
        h = self._attention(mid.attn_1, h)
        h = mid.block_2(h, None)
        return self._level_blocks(d.num_resolutions - 1, h)

    def upsampling_stage(self, h: torch.Tensor) -> torch.Tensor:
        """The rest of the decoder, on a crop of ``latent_stage``'s output.

        Mirrors ``Decoder.forward`` (tested for parity against it).
        """
        d = self.decoder
        top = d.num_resolutions - 1
        for i_level in reversed(range(top + 1)):
            if i_level != top:
                h = self._level_blocks(i_level, h)
            if i_level != 0:
                h = d.up[i_level].upsample(h)
        if getattr(d, "give_pre_end", False):  # gone in ComfyUI 0.38 (never set by its VAEs)
            return h
        h = d.conv_out(torch.nn.functional.silu(d.norm_out(h)))
        return torch.tanh(h) if d.tanh_out else h

    def _level_blocks(self, i_level: int, h: torch.Tensor) -> torch.Tensor:
        level = self.decoder.up[i_level]
        for i_block in range(self.decoder.num_res_blocks + 1):
            h = level.block[i_block](h, None)
            if len(level.attn) > 0:
                h = self._attention(level.attn[i_block], h)
        return h


class WanStages(Stages):
    """Split decode of the Wan 2.1 VAE (``comfy.ldm.wan.vae.WanVAE``), frame by frame with causal caches.

    The latent-resolution part (conv2, conv1, the middle block with its per-frame full-image
    attention) runs once over the whole latent; the upsampling stages and head run per spatial
    tile over every frame, each tile with its own causal cache carried through the whole clip.
    Mirrors ``WanVAE.decode`` / ``Decoder3d.forward`` (tested for parity against them).
    """

    name = "wan-staged"
    ndim = 5
    unsplit = FrameCausal
    frame_by_frame = True
    check_size = (2, 4, 4)

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.decoder = model.decoder

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return (type(model).__module__ == "comfy.ldm.wan.vae" and type(model).__name__ == "WanVAE"
                and all(hasattr(model.decoder, name) for name in ("conv1", "middle", "upsamples", "head")))

    def latent_channels(self) -> int:
        return self.decoder.conv1.out_channels

    def _cache(self) -> list:
        return [None] * wan_cache_layers(self.decoder)

    @staticmethod
    def _causal(conv: torch.nn.Module, x: torch.Tensor, cache: list, index: list[int]) -> torch.Tensor:
        """A CausalConv3d called the way Decoder3d.forward calls conv1 and the head's conv."""
        slot = index[0]
        cache_x = x[:, :, -wan_vae_module().CACHE_T:, :, :].clone()
        if cache_x.shape[2] < 2 and cache[slot] is not None:
            cache_x = torch.cat([cache[slot][:, :, -1, :, :].unsqueeze(2).to(cache_x.device), cache_x], dim=2)
        x = conv(x, cache[slot])
        cache[slot] = cache_x
        index[0] += 1
        return x

    def latent_stage(self, z: torch.Tensor) -> torch.Tensor:
        residual_block = wan_vae_module().ResidualBlock
        d = self.decoder
        x = self.model.conv2(z)
        cache, frames = self._cache(), []
        for i in range(x.shape[2]):
            index = [0]
            h = self._causal(d.conv1, x[:, :, i:i + 1], cache, index)
            for layer in d.middle:
                h = layer(h, cache, index) if isinstance(layer, residual_block) else layer(h)
            frames.append(h)
        return torch.cat(frames, 2)

    def upsampling_stage(self, h: torch.Tensor) -> torch.Tensor:
        causal_conv = wan_vae_module().CausalConv3d
        d = self.decoder
        cache, frames = self._cache(), []
        for i in range(h.shape[2]):
            index = [0]
            x = h[:, :, i:i + 1]
            for layer in d.upsamples:
                x = layer(x, cache, index)
            for layer in d.head:
                x = self._causal(layer, x, cache, index) if isinstance(layer, causal_conv) else layer(x)
            frames.append(x)
        return torch.cat(frames, 2)


METHODS: tuple[type[Method], ...] = (KLStages, WholeModel, WanStages, FrameCausal, Volume)
"""In order of preference: a latent gets the first method for its dimensions that supports the VAE."""


def method_for(model: torch.nn.Module, ndim: int) -> type[Method]:
    """The method for ``model``'s latents of ``ndim`` dimensions."""
    for method in METHODS:
        if method.ndim == ndim and method.supports(model):
            return method
    raise ValueError(f"samples must be a 4-D image latent or a 5-D video latent, got {ndim}-D")
