"""One micro-batch's loss: the batch drawn, noised at its timesteps, and the denoising MSE, DCO and prior terms.

Part of the Trainer (trainer/loop.py), split out by topic: `Losses` is one of its bases and works on
the Trainer's state (settings, schedule, data, modules, device).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import captions
from .data import Cond, Example, collate_conds, draw_batch
from .sampling import autocast


class Losses:
    """The Trainer's micro-batch: draws, noise, the model's prediction and the loss."""

    def _conds(self, batch: list[Example], picks: list[int] | None = None) -> Cond:
        """The batch's conditioning: each caption's drawn variant (or the empty one) when picks are given."""
        if self.binding.encode is not None:
            if picks is None:
                return self.binding.encode([ex.caption for ex in batch])
            return self.binding.encode([captions.caption_of(ex, i) for ex, i in zip(batch, picks)])
        conds = [ex.cond for ex in batch] if picks is None else \
            [captions.cond_of(ex, i) for ex, i in zip(batch, picks)]
        return {k: v.to(self.device) for k, v in collate_conds(conds).items()}

    def _caption_picks(self, batch: list[Example], generator: torch.Generator) -> list[int] | None:
        """Variant and dropout draws for a batch (none at all when neither is on: the draws stay as they were)."""
        cfg = self.settings
        if not cfg.shuffle_tags and cfg.caption_dropout <= 0:
            return None
        return captions.draw([max(len(ex.variants), 1) for ex in batch], cfg.caption_dropout, generator)

    def _noised(self, batch: list[Example], generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x0 = torch.stack([ex.latent for ex in batch]).to(self.device, torch.float32)
        # Noise and timesteps come from the run's own CPU generator: identical on any device,
        # and its state is all that resume needs to replay the same draws.
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        idx = self.schedule.draw(x0.shape[0], generator)
        return x0, noise, idx, self.schedule.add_noise(x0, noise, idx)

    def _set_strength(self, strength: float) -> None:
        for module in self.modules.values():
            module.strength = strength

    def _per_sample_mse(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)

    def _draw(self, examples: list[Example], generator: torch.Generator, with_captions: bool = False
              ) -> tuple[list[Example], tuple[Tensor, Tensor, Tensor, Tensor], list[int] | None]:
        """This process's slice of the global batch (batch_size x world), with its noise and timesteps."""
        size, rank = self.settings.batch_size, self.dist.rank
        batch = draw_batch(examples, size * self.dist.world, generator)
        noised = self._noised(batch, generator)
        picks = self._caption_picks(batch, generator) if with_captions else None
        if self.dist.world == 1:
            return batch, noised, picks
        part = slice(rank * size, (rank + 1) * size)
        return (batch[part], tuple(t[part] for t in noised),  # type: ignore[return-value]
                picks[part] if picks is not None else None)

    def _micro_step(self, generator: torch.Generator, prior: list[Example],
                    amp_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """(loss, mean MSE) of one micro-batch; through the host's data-parallel wrapper when it has one."""
        if self._wrapped is None:
            return self._micro_loss(generator, prior, amp_dtype)
        mse_out: list[Tensor] = []

        def compute() -> Tensor:
            loss, mse = self._micro_loss(generator, prior, amp_dtype)
            mse_out.append(mse)
            return loss

        return self._wrapped(compute), mse_out[0]

    def _micro_loss(self, generator: torch.Generator, prior: list[Example],
                    amp_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        cfg = self.settings
        batch, (x0, noise, idx, x_t), picks = self._draw(self.data.instance, generator, with_captions=True)
        t = self.schedule.timesteps[idx].to(self.device)
        target = self.schedule.target(x0, noise, idx)
        prior_parts = None
        if prior:
            prior_batch, prior_noised, _ = self._draw(prior, generator)
            prior_parts = prior_noised, prior_batch
        ref_mse = None
        if cfg.loss == "dco":
            # The reference is this very model with every adapter at strength 0 (= the base).
            with torch.no_grad():
                self._set_strength(0.0)
                try:
                    with autocast(self.device.type, amp_dtype):
                        ref = self.denoiser(x_t, t, self._conds(batch, picks))
                finally:
                    self._set_strength(1.0)
                ref_mse = self._per_sample_mse(ref, target)
        with autocast(self.device.type, amp_dtype):
            pred = self.denoiser(x_t, t, self._conds(batch, picks))
        mse = self._per_sample_mse(pred, target)
        if ref_mse is not None:
            loss = -F.logsigmoid(-cfg.dco_beta * (mse - ref_mse)).mean()
        else:
            loss = mse.mean()
        if prior_parts is not None:
            (p_x0, p_noise, p_idx, p_xt), p_batch = prior_parts
            with autocast(self.device.type, amp_dtype):
                p_pred = self.denoiser(p_xt, self.schedule.timesteps[p_idx].to(self.device), self._conds(p_batch))
            # DreamBooth's prior term: plain denoising MSE on the class images.
            loss = loss + cfg.prior_loss_weight * self._per_sample_mse(
                p_pred, self.schedule.target(p_x0, p_noise, p_idx)).mean()
        return loss, mse.mean().detach()

