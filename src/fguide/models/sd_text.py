"""Stable Diffusion's text conditioning, computed as ``StableDiffusionPipeline.encode_prompt`` and
``StableDiffusionXLPipeline.encode_prompt`` compute it (no LoRA, no textual inversion, no
``clip_skip``).

- Tokens: each prompt padded to the tokenizer's ``model_max_length`` (77) and truncated to it;
  a prompt that loses tokens raises a :class:`PromptTruncationWarning` naming the lost text, as
  the pipelines log it.
- **SD 1.x/2.x**: the text encoder's last hidden state [N, 77, D] (with the attention mask
  only when the encoder's config sets ``use_attention_mask``).
- **SDXL**: both encoders' penultimate hidden states (``hidden_states[-2]``) concatenated on
  the feature axis, the pooled embedding ``text_embeds`` of ``text_encoder_2`` (a
  ``CLIPTextModelWithProjection``) and the added time ids
  (original height, width, crop top, left, target height, width).
- **Negative prompt**: the negative prompt's embedding ("" when none is given); for SDXL with
  ``force_zeros_for_empty_prompt`` (its model_index.json) and no negative prompt, zeros for the
  hidden states and the pooled embedding.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["PromptEmbeds", "PromptEncoder", "PromptTruncationWarning", "check_prompts"]


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than the text encoder's context (77 tokens) and was truncated."""


def check_prompts(prompts: Sequence[str] | str, what: str = "--prompt") -> list[str]:
    """The prompts as a list; a ValueError naming ``what`` when there are none or one is not a
    string. (An empty string is a valid prompt: the unconditional one.)"""
    if isinstance(prompts, str):
        return [prompts]
    out = list(prompts)
    if not out:
        raise ValueError(f"{what}: no prompts given (at least one is needed)")
    bad = [i for i, p in enumerate(out) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{what}: prompt {bad[0]} is not a string")
    return out


@dataclass(frozen=True)
class PromptEmbeds:
    """The UNet's text conditioning for N rows (prompts or samples)."""

    hidden: Tensor
    """[N, L, D]: ``encoder_hidden_states``."""
    pooled: Tensor | None = None
    """[N, P] (SDXL): ``added_cond_kwargs["text_embeds"]``."""
    time_ids: Tensor | None = None
    """[N, 6] (SDXL): ``added_cond_kwargs["time_ids"]``."""

    def __len__(self) -> int:
        return int(self.hidden.shape[0])

    def rows(self, index: Tensor | Sequence[int]) -> PromptEmbeds:
        """The rows ``index`` (e.g. the prompt of each sample, i mod n)."""
        i = torch.as_tensor(index, dtype=torch.long, device=self.hidden.device)
        return PromptEmbeds(
            self.hidden[i],
            None if self.pooled is None else self.pooled[i],
            None if self.time_ids is None else self.time_ids[i],
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeds:
        def move(v: Tensor | None) -> Tensor | None:
            return None if v is None else v.to(device=device, dtype=dtype or v.dtype)

        hidden = move(self.hidden)
        assert hidden is not None
        return PromptEmbeds(hidden, move(self.pooled), move(self.time_ids))

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Rows of several embeddings stacked in order."""
        first = parts[0]
        return PromptEmbeds(
            torch.cat([p.hidden for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),  # type: ignore[misc]
            None if first.time_ids is None else torch.cat([p.time_ids for p in parts]),  # type: ignore[misc]
        )

    def unet_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``UNet2DConditionModel.forward`` for these rows."""
        kw: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw


def _tokenize(tokenizer: Any, prompts: list[str], max_length: int, which: str) -> Any:
    """Padded/truncated tokens; warns for each prompt that lost tokens (the lost text named:
    the tokens between the kept 76 and the end-of-text token, as the pipelines report them)."""
    for i, ids in enumerate(tokenizer(prompts).input_ids):
        if len(ids) > max_length:
            warnings.warn(
                f"prompt {i} is longer than the {which}'s {max_length} tokens and was "
                f"truncated, as Stable Diffusion does; the lost part: "
                f"{tokenizer.decode(ids[max_length - 1 : -1])!r}",
                PromptTruncationWarning,
                stacklevel=4,
            )
    return tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )


class PromptEncoder:
    """Tokenizers and text encoders of a pipeline folder, encoding as its pipeline does.

    ``kind`` ``"sd"``: one tokenizer and ``CLIPTextModel``; ``"sdxl"``: two tokenizers, a
    ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``, and the time ids
    ``(h, w, 0, 0, h, w)`` of the image size (``time_ids``).
    """

    def __init__(
        self,
        kind: Literal["sd", "sdxl"],
        tokenizers: Sequence[Any],
        encoders: Sequence[nn.Module],
        *,
        force_zeros_for_empty_prompt: bool = False,
        time_ids: Sequence[int] | None = None,
    ):
        want = 1 if kind == "sd" else 2
        if len(tokenizers) != want or len(encoders) != want:
            raise ValueError(f"{kind} needs {want} tokenizer(s) and text encoder(s)")
        if kind == "sdxl" and (time_ids is None or len(time_ids) != 6):
            raise ValueError("sdxl needs the 6 added time ids")
        self.kind, self.tokenizers, self.encoders = kind, list(tokenizers), list(encoders)
        self.force_zeros = bool(force_zeros_for_empty_prompt) and kind == "sdxl"
        self.time_ids = None if time_ids is None else tuple(int(v) for v in time_ids)

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embeddings: the (last) text encoder's, as the pipelines cast."""
        return next(self.encoders[-1].parameters()).dtype

    def _max_length(self, i: int) -> int:
        return int(self.tokenizers[i].model_max_length)

    @torch.no_grad()
    def _hidden(self, i: int, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """(hidden states, pooled) of encoder i: SD the last, SDXL the penultimate layer."""
        tok, enc = self.tokenizers[i], self.encoders[i]
        which = "text encoder" if i == 0 else "second text encoder"
        ids = _tokenize(tok, prompts, self._max_length(i), which)
        dev = self.device
        if self.kind == "sd":
            cfg: Any = enc.config
            mask = ids.attention_mask.to(dev) if getattr(cfg, "use_attention_mask", False) else None
            out = enc(ids.input_ids.to(dev), attention_mask=mask)
            return out[0], None
        out = enc(ids.input_ids.to(dev), output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None  # CLIPTextModelWithProjection's text_embeds
        return out.hidden_states[-2], pooled

    def encode(self, prompts: Sequence[str] | str, what: str = "--prompt") -> PromptEmbeds:
        """The conditioning of each prompt, one row per prompt."""
        texts = check_prompts(prompts, what)
        parts = [self._hidden(i, texts) for i in range(len(self.encoders))]
        hidden = torch.cat([h for h, _ in parts], dim=-1).to(self.dtype)
        if self.kind == "sd":
            return PromptEmbeds(hidden)
        pooled = parts[-1][1]
        if pooled is None:
            raise ValueError("the SDXL text_encoder_2 must be a CLIPTextModelWithProjection")
        assert self.time_ids is not None
        ids = torch.tensor([self.time_ids] * len(texts), dtype=self.dtype, device=self.device)
        return PromptEmbeds(hidden, pooled.to(self.dtype), ids)

    def encode_negative(self, negative: str | None, like: PromptEmbeds) -> PromptEmbeds:
        """The unconditional row for classifier-free guidance: ``negative`` ("" when None)
        encoded, or zeros (SDXL, ``force_zeros_for_empty_prompt``, no negative prompt)."""
        if negative is None and self.force_zeros:
            pooled = like.pooled
            return PromptEmbeds(
                torch.zeros_like(like.hidden[:1]),
                None if pooled is None else torch.zeros_like(pooled[:1]),
                None if like.time_ids is None else like.time_ids[:1].clone(),
            )
        return self.encode([negative or ""], "--negative-prompt")
