"""`imgtxt train`: staged dual-encoder training (heads on cached frozen features, then top backbone stages).

`imgtxt train [--recipe tiny|quick|default] [--config FILE.yaml] [--data PATH] [--out RUN_DIR] [--resume]
[--set key=value ...]` writes RUN_DIR/{config.yaml, checkpoints/last.pt, checkpoints/best.pt, metrics.jsonl,
curves.png (loss terms and val R@K per epoch)}.
Data parallel under `torchrun` (gloo on CPU, nccl on CUDA): N ranks x `batch_size` train as one process on the
global batch, since the losses see every rank's rows (`trainer.distributed`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from imgtxt.config import HelpFormatter, apply_env_defaults
from imgtxt.datasets import default_data_root, load_captioned_images
from imgtxt.errors import EXIT_OK, ConfigError, fail
from imgtxt.logs import add_logging_flags, setup_logging
from imgtxt.preprocess import ImagePreprocessConfig
from imgtxt.retrieval_metrics import retrieval_metrics
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.config import TrainConfig, load_config, save_config
from trainer.curves import plot_curves
from trainer.data import (
    CachedSource,
    CaptionTable,
    FeatureStore,
    PixelSource,
    Source,
    TowerInputs,
    cached_features,
    default_cache_dir,
    neighbour_batches,
    pack_batches,
)
from trainer.data.lexical import LexicalNeighbours
from trainer.distributed import gather_rows, rank_and_world, shard_batch
from trainer.encode import encode_images, encode_split, split_points
from trainer.labels import PairLabels, check_model_provides
from trainer.losses import CombinedLoss, LossInputs
from trainer.losses.base import FRAGMENT_FIELDS, needed_sampling
from trainer.model import DualEncoder
from trainer.optim import WeightAverage, build_param_groups, lr_factor, upgrade_optimizer_state

logger = logging.getLogger(__name__)


class TrainStep(nn.Module):
    """Trainable forward + loss in one module, so DistributedDataParallel can wrap it (it only hooks `forward`)."""

    def __init__(
        self, model: DualEncoder, loss: CombinedLoss, image_split: int, text_split: int, feature_drop: float = 0.0
    ) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.image_split, self.text_split, self.feature_drop = image_split, text_split, feature_drop
        # Projected fragments only for the losses that read them (HREM's fragment-level relations).
        self.fragments = bool(loss.requires & FRAGMENT_FIELDS)

    def forward(
        self, inputs: TowerInputs, pair_image: Tensor, image_ids: Tensor, epoch: int, labels: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Embeds this rank's rows, gathers every rank's rows, and returns the loss terms of the gathered batch.

        `inputs.image` holds each distinct image of this rank's rows once; `pair_image` maps every caption (row) to
        its image row; `image_ids` are the rows' global image ids. Under `torchrun` the per-row tensors (embeddings
        with their gradients, image ids) are gathered across ranks in rank order before the loss, so every in-batch
        loss sees the global batch exactly as one process would (`trainer.distributed` explains the gradients).
        The pairwise `labels` (LossInputs field -> (B, B) tensor: `text_sim`, `local_sim`) are not per row: the
        caller builds them for the gathered batch (rows in rank order), which every rank knows.
        """
        image_parts = self.model.image.encode_parts(inputs.image, self.image_split, self.feature_drop, self.fragments)
        image = image_parts.glob[pair_image]
        image_local = None if image_parts.local is None else image_parts.local[pair_image]
        image_fragments = None if image_parts.fragments is None else image_parts.fragments[pair_image]
        text_parts = self.model.text.encode_parts_bucketed(
            inputs.text, inputs.text_mask, self.text_split, self.feature_drop, fragments=self.fragments
        )
        text, text_local = text_parts.glob, text_parts.local
        text_fragments, text_fragment_mask = _tokens_for_gather(
            text_parts.fragments, text_parts.fragment_mask, self.model.spec.max_tokens
        )
        unit = self.model.unit(image, text) if self.model.unit is not None else None
        (
            every_image,
            every_text,
            every_id,
            unit,
            image_local,
            text_local,
            image_fragments,
            text_fragments,
            text_fragment_mask,
        ) = gather_rows(
            image, text, image_ids, unit, image_local, text_local, image_fragments, text_fragments, text_fragment_mask
        )
        assert every_image is not None and every_text is not None and every_id is not None
        batch = LossInputs(
            every_image,
            every_text,
            every_id,
            epoch=epoch,
            unit=unit,
            image_local=image_local,
            text_local=text_local,
            image_fragments=image_fragments,
            text_fragments=text_fragments,
            text_fragment_mask=text_fragment_mask,
            **labels,
        )
        return self.loss(batch)


def _tokens_for_gather(fragments: Tensor | None, mask: Tensor | None, max_tokens: int) -> tuple[Tensor | None, ...]:
    """Caption fragments (and mask) as `gather_rows` needs them: under several ranks, zero-padded to `max_tokens`
    so that every rank's rows have one shape (one process keeps its batch's length)."""
    if fragments is None or mask is None or rank_and_world()[1] == 1:
        return fragments, mask
    pad = max_tokens - fragments.shape[1]
    return F.pad(fragments, (0, 0, 0, pad)), F.pad(mask, (0, pad))


def resolve_sampling(cfg: TrainConfig) -> TrainConfig:
    """The config with `data.sampling` made concrete: `auto` follows what the losses declare (`EmbeddingLoss.batch`),
    image-major when none minds (one image-tower pass per image); an explicit choice against a loss's need is kept
    but logged, so choosing a loss never silently sabotages it."""
    needs = needed_sampling(cfg.loss.weights_for(cfg.model))
    wanted = set(needs.values())
    sampling = cfg.data.sampling
    if sampling == "auto":
        if cfg.data.neighbour_batches_from or cfg.data.lexical_neighbours:
            sampling = "image"  # neighbour batches (HREM's, lexical) are groups of images
        elif len(wanted) == 1:
            sampling = wanted.pop()
        elif not wanted:
            sampling = "image"
        else:
            raise ConfigError(f"the losses need different batches ({needs}): set data.sampling explicitly")
    others = {name: want for name, want in needs.items() if want != sampling}
    if others:
        logger.warning(
            "data.sampling=%s, but %s work best with %s batches",
            sampling,
            ", ".join(sorted(others)),
            "/".join(sorted(set(others.values()))),
        )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sampling=sampling))


class Trainer:
    """One training run: `setup()` builds everything, `fit()` trains, `evaluate()` measures validation R@K."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        self.cfg, self.run_dir, self.resume = resolve_sampling(cfg), run_dir, resume
        self.rank, self.world = 0, 1
        self.best_rsum = -math.inf
        self.start_epoch, self.step = 0, 0

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> Trainer:
        """Process group, seeds, data, model, cached features, loss, optimizer; resumes from last.pt if asked."""
        cfg = self.cfg
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self._want_cuda() else "gloo")
        if dist.is_initialized():
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = self._device()
        _seed_everything(cfg.run.seed)
        data = cfg.data
        root = Path(data.path) if data.path else default_data_root()
        # The full training split (its feature cache is shared by every run) and, with dev_images, its held-out
        # tail: the dev split the epoch is chosen on, never trained on.
        self.full_train_table = CaptionTable.from_images(
            load_captioned_images(root, data.train_split, data.train_limit or None)
        )
        self.train_table, self.dev_table = self.full_train_table, None
        if data.dev_images:
            n_train = len(self.full_train_table.images)
            if data.dev_images >= n_train:
                raise ConfigError(f"dev_images={data.dev_images} must be below the {n_train} training images")
            self.train_table, self.dev_table = self.full_train_table.split_last(data.dev_images)
        self.val_table = CaptionTable.from_images(load_captioned_images(root, data.val_split, data.val_limit or None))
        if not self.train_table.images or not self.val_table.images:
            raise ConfigError(f"{root}: splits {data.train_split!r} and {data.val_split!r} must both be non-empty")

        self.model = DualEncoder(cfg.model).to(self.device)
        optim = cfg.optim
        self.image_split, self.text_split = split_points(
            self.model, optim.image_trainable_stages, optim.text_trainable_layers
        )
        self.train_sentence: Tensor | None = None
        self.dev_source: Source | None = None
        self.train_source, self.val_source = self._sources()
        self.loss = CombinedLoss(cfg.loss.weights_for(cfg.model), cfg.loss.kwargs, model=cfg.model)
        # The losses say which optional inputs they read: the model must produce them, the data provide the labels.
        check_model_provides(self.loss, cfg.model)
        self.labels = PairLabels(self.loss, self.train_table, self.train_sentence)
        self.lexical = LexicalNeighbours(self.train_table, data.lexical_neighbours) if data.lexical_neighbours else None

        backbone, heads = self._freeze()
        self.step_module: nn.Module = TrainStep(
            self.model, self.loss, self.image_split, self.text_split, cfg.data.feature_drop
        ).to(self.device)
        if self.world > 1:
            # DDP averages the gradients; with the loss on the gathered batch that is the single-process gradient.
            self.step_module = nn.parallel.DistributedDataParallel(self.step_module)
        # Parts in the order the optimizer groups were made before the no-decay split (old checkpoints rely on it).
        self.parts: dict[str, tuple[list[nn.Parameter], float]] = {"heads": (heads, optim.lr)}
        if backbone:
            self.parts["backbone"] = (backbone, optim.backbone_lr)
        self.optimizer = torch.optim.AdamW(build_param_groups(self.parts, optim.weight_decay))
        self.average = WeightAverage([*heads, *backbone], optim.ema_decay) if optim.ema_decay > 0 else None
        self.steps_per_epoch = max(1, self._sampling_units() // (cfg.data.batch_size * self.world))
        total = self.steps_per_epoch * optim.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, optim.warmup_steps, total)
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        if self.resume and (self.run_dir / "checkpoints" / "last.pt").is_file():
            self._restore(self.run_dir / "checkpoints" / "last.pt")
        if self.rank == 0:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        splits_at = {"image_split": self.image_split, "text_split": self.text_split}
        logger.info(
            "setup done", extra={"config": cfg.to_dict(), "device": str(self.device), "world": self.world, **splits_at}
        )
        return self

    def _sources(self) -> tuple[Source, Source]:
        cfg = self.cfg
        served = self.model.image_preprocess
        train_pre = dataclasses.replace(served, image_size=cfg.resolved_train_image_size)
        seed = cfg.run.seed + self.rank
        if not cfg.cache.features:
            pixels = PixelSource(self.model, self.train_table, self.image_split, self.text_split, seed, train_pre)
            if self.dev_table is not None:
                self.dev_source = PixelSource(self.model, self.dev_table, self.image_split, self.text_split)
            return pixels, PixelSource(self.model, self.val_table, self.image_split, self.text_split)
        cache_dir = Path(cfg.cache.dir) if cfg.cache.dir else default_cache_dir()
        train = self._cached(self.full_train_table, "train", cfg.cache.views, train_pre, False, cache_dir)
        if self.dev_table is not None:  # the held-out tail of the full split's cache (views of it, no copy)
            n_images, n_captions = len(self.train_table.images), len(self.train_table.captions)
            self.dev_source = CachedSource(train.rows(slice(n_images, None), slice(n_captions, None)))
            train = train.rows(slice(0, n_images), slice(0, n_captions))
        # Flip-averaged validation needs the mirrored view.
        val = self._cached(self.val_table, "val", 1, served, cfg.model.flip_average, cache_dir)
        self.train_sentence = train.sentence
        return CachedSource(train, seed=seed), CachedSource(val)

    def _cached(
        self,
        table: CaptionTable,
        desc: str,
        views: int,
        preprocess: ImagePreprocessConfig,
        mirror: bool,
        cache_dir: Path,
    ) -> FeatureStore:
        """A split's cached activations: rank 0 computes a missing cache, the others wait at the barrier and then
        read the file it wrote."""

        def load(build: bool) -> FeatureStore | None:
            return cached_features(
                self.model,
                table,
                self.image_split,
                self.text_split,
                cache_dir,
                self.cfg.run.encode_batch_size,
                desc=desc,
                build=build,
                views=views,
                preprocess=preprocess,
                mirror=mirror,
            )

        store = load(build=self.rank == 0)
        if self.world > 1:
            dist.barrier()
        if store is None:
            store = load(build=False)
        assert store is not None
        return store

    def _freeze(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Freezes the backbone below the split points; returns (fine-tuned backbone params, head/loss params)."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        backbone = [*self.model.image.stages[self.image_split :], *self.model.text.layers[self.text_split - 1 :]]
        heads: list[nn.Module] = [
            self.model.image.pool,
            self.model.image.head,
            self.model.text.pool,
            self.model.text.head,
        ]
        if self.model.unit is not None:
            heads.append(self.model.unit)
        for module in (*backbone, *heads):
            module.requires_grad_(True)
        return [p for m in backbone for p in m.parameters()], [
            *(p for m in heads for p in m.parameters()),
            *self.loss.parameters(),
        ]

    # ------------------------------------------------------------------------------------------------ fit
    def fit(self) -> dict[str, float]:
        """Trains for the configured epochs; validates, logs and checkpoints after each. Returns the best metrics."""
        epochs = self.cfg.optim.epochs
        best: dict[str, float] = {}
        for epoch in range(self.start_epoch, epochs):
            self._train_mode()
            batches = self._epoch_batches(epoch)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", disable=self.rank != 0)
            t0, seen, terms = time.perf_counter(), 0, {}
            for batch in bar:
                # Every rank sees the same global batches and knows every rank's shard of each (it encodes its own;
                # the losses see them all, gathered). The strided split loses no remainder.
                shards = shard_batch(batch, self.world)
                if self.cfg.data.sampling == "image":
                    shards = [self.train_table.captions_of(s) for s in shards]
                terms = self._train_step(shards, epoch)
                seen += sum(len(s) for s in shards)
                rate = seen / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{terms['loss']:.4f}", pairs_s=f"{rate:.0f}")
                if self.step % self.cfg.run.log_every == 0:
                    lr = self.scheduler.get_last_lr()[0]
                    logger.info(
                        "train",
                        extra={"epoch": epoch, "step": self.step, "pairs_per_s": round(rate, 1), "lr": lr, **terms},
                    )
            if self.rank == 0:
                train_s = round(time.perf_counter() - t0, 2)
                with self._averaged():  # validate (and keep as best.pt) the averaged weights when ema_decay > 0
                    metrics = self.evaluate()
                    if self.dev_source is not None and self.dev_table is not None:
                        dev = self.evaluate(self.dev_source, self.dev_table)
                        metrics.update({f"dev_{k}": v for k, v in dev.items()})
                    # The checkpoint is selected by the dev split's rSum when there is one, else by validation's.
                    score = metrics.get("dev_rsum", metrics["rsum"])
                    if score > self.best_rsum:
                        self.best_rsum, best = score, metrics
                        self._save("best.pt", epoch, metrics)
                trained = {f"train_{k}": v for k, v in terms.items()}
                record = {"epoch": epoch + 1, "step": self.step, "train_s": train_s, **trained, **metrics}
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")  # redrawn every epoch
                logger.info("epoch done", extra=record)
                self._save("last.pt", epoch, metrics)
            if self.world > 1:
                self._check_ranks_agree()
        return best

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's `steps_per_epoch` global batches: image indices (sampling=image) or caption indices.

        Every unit appears exactly once per epoch: the units that do not fill a whole batch are spread over the
        batches (a few batches are one or a few units larger) instead of being dropped, so no image or caption is
        skipped, and the step count the LR schedule was built with stays fixed.
        """
        data, seed = self.cfg.data, self.cfg.run.seed
        global_batch = data.batch_size * self.world
        if data.neighbour_batches_from and epoch + 1 >= data.neighbour_batches_from:
            n_images, batch_size = len(self.train_table.images), self.cfg.run.encode_batch_size
            with self._autocast():
                emb = encode_images(self.model, self.train_source, n_images, self.image_split, batch_size, self.device)
            per_cluster = max(1, global_batch // data.neighbour_clusters)
            found = neighbour_batches(emb, data.neighbour_clusters, per_cluster, seed=seed + epoch)
            # More batches than steps (short tails where clusters run out): the tails are packed, whole, into the
            # steps instead of being dropped with their images.
            packed = pack_batches(found, self.steps_per_epoch)
            logger.info("neighbour batches", extra={"epoch": epoch, "batches": len(found), "steps": len(packed)})
            return [np.asarray(b, dtype=np.int64) for b in packed]
        if self.lexical is not None:
            return self.lexical.batches(self.steps_per_epoch, seed + epoch)
        perm = np.random.default_rng(seed + epoch).permutation(self._sampling_units())
        return np.array_split(perm, self.steps_per_epoch)

    def _sampling_units(self) -> int:
        """How many units an epoch draws batches from: training images (sampling=image) or captions."""
        return len(self.train_table.images) if self.cfg.data.sampling == "image" else len(self.train_table.captions)

    def _check_ranks_agree(self) -> None:
        """Data parallel sanity check: every rank must hold the same trained weights after each epoch."""
        trained = [p for g in self.optimizer.param_groups for p in g["params"]]
        local = torch.stack(
            [torch.stack([p.detach().double().sum(), p.detach().double().abs().sum()]) for p in trained]
        )
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        dist.all_gather(gathered, local)
        if not all(torch.allclose(g, gathered[0], rtol=1e-6, atol=1e-9) for g in gathered):
            raise RuntimeError("data-parallel ranks diverged: trained weights differ between ranks")
        logger.info("ranks agree", extra={"world": self.world, "checksum": float(local[:, 0].sum())})

    def _train_step(self, shards: Sequence[np.ndarray], epoch: int) -> dict[str, float]:
        """One optimizer step on a global batch given as every rank's caption indices (`shards[rank]` are this
        rank's, each of their images run through the image tower once); the losses see all shards' rows."""
        idx = shards[self.rank]
        every = np.concatenate(list(shards))  # the gathered batch's rows, in rank order (as `gather_rows` makes)
        image_ids = self.train_table.caption_image[idx]
        distinct, pair_image = np.unique(image_ids, return_inverse=True)
        inputs = self.train_source.batch(distinct, idx, augment=self.cfg.data.augment).to(self.device)
        labels = self.labels(every, self.device)  # the pairwise labels the losses require, for the gathered rows
        ids, rows = torch.from_numpy(image_ids).to(self.device), torch.from_numpy(pair_image).to(self.device)
        with self._autocast():
            out = self.step_module(inputs, rows, ids, epoch, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        clip = self.cfg.optim.grad_clip
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.average is not None:
            self.average.update()
        self.loss.after_step()  # e.g. InfoNCE clamps its logit scale back into [0, ln 100]
        self.step += 1
        return {k: float(v.detach()) for k, v in out.items()}

    def _train_mode(self) -> None:
        # Backbone stages stay in eval mode even when fine-tuned: frozen BatchNorm statistics and no dropout are
        # more stable with the small per-process batches a CPU can afford.
        self.model.eval()
        model = self.model
        for module in (model.image.pool, model.image.head, model.text.pool, model.text.head, model.unit, self.loss):
            if module is not None:
                module.train()

    # ------------------------------------------------------------------------------------------------ evaluate
    def evaluate(self, source: Source | None = None, table: CaptionTable | None = None) -> dict[str, float]:
        """R@1/5/10 both ways, rSum and ranks of a split (default: validation), positives found by image id."""
        source, table = source or self.val_source, table or self.val_table
        splits, batch_size = (self.image_split, self.text_split), self.cfg.run.encode_batch_size
        with self._autocast():
            img, txt = encode_split(self.model, source, table, *splits, batch_size, self.device)
        return retrieval_metrics(img @ txt.T, table.caption_image)

    # ------------------------------------------------------------------------------------------------ helpers
    def _save(self, name: str, epoch: int, metrics: dict[str, float]) -> None:
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        save_checkpoint(
            self.run_dir / "checkpoints" / name,
            self.model,
            self.cfg,
            metrics,
            epoch=epoch + 1,
            step=self.step,
            best_rsum=self.best_rsum,
            loss=self.loss.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(),
            rng=rng,
            average=self.average.state_dict() if self.average is not None else None,
        )

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path).state
        self.model.load_state_dict(ckpt["model"])
        try:
            self.loss.load_state_dict(ckpt["loss"])
        except RuntimeError as exc:  # e.g. a relation module of an older layout
            raise ConfigError(
                f"{path}: the loss state saved in this checkpoint does not fit the configured losses "
                f"({', '.join(self.cfg.loss.weights)}), so training cannot resume from it: {exc}"
            ) from exc
        # Checkpoints from before the no-decay groups hold one group per part: regroup their state.
        optimizer, scheduler = upgrade_optimizer_state(
            ckpt["optimizer"], ckpt["scheduler"], self.optimizer, {k: p for k, (p, _) in self.parts.items()}
        )
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(scheduler)
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        if self.average is not None and ckpt.get("average") is not None:
            self.average.load_state_dict(ckpt["average"])
        self.start_epoch, self.step, self.best_rsum = ckpt["epoch"], ckpt["step"], ckpt["best_rsum"]
        logger.info("resumed", extra={"path": str(path), "epoch": self.start_epoch, "step": self.step})

    def _averaged(self) -> contextlib.AbstractContextManager[Any]:
        return self.average.applied() if self.average is not None else contextlib.nullcontext()

    def _want_cuda(self) -> bool:
        device = self.cfg.run.device
        return device == "cuda" or (device == "auto" and torch.cuda.is_available())

    def _device(self) -> torch.device:
        if self._want_cuda():
            if not torch.cuda.is_available():
                raise ConfigError("device=cuda requested but CUDA is not available")
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def _amp_dtype(self) -> torch.dtype | None:
        p = self.cfg.run.precision
        if self.device.type != "cuda":
            if p in ("bf16", "fp16"):
                logger.warning("precision %s ignored on CPU: training in fp32", p)
            return None
        if p == "auto":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def close(self) -> None:
        """Leaves the process group (when this run created one)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_parser() -> argparse.ArgumentParser:
    """Flags of `imgtxt train`."""
    parser = argparse.ArgumentParser(
        prog="imgtxt train", description="Train the image and text towers.", formatter_class=HelpFormatter
    )
    parser.add_argument("--recipe", choices=("tiny", "quick", "default"), default=None, help="starting config")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of config keys (over the recipe)")
    parser.add_argument("--data", type=str, default=None, help="dataset file or directory (sets config key `data`)")
    parser.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.pt")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key (repeatable; flat or GROUP.FIELD), e.g. --set epochs=3, --set optim.lr=1e-3",
    )
    add_logging_flags(parser)
    apply_env_defaults(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`imgtxt train`."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    overrides = list(args.overrides) + ([f"data={args.data}"] if args.data else [])
    try:
        cfg = load_config(args.recipe, args.config, overrides)
        trainer = Trainer(cfg, args.out, resume=args.resume).setup()
    except (ConfigError, OSError) as exc:  # e.g. a missing --config or data path: EXIT_USAGE, as in every command
        return fail("imgtxt train", exc)
    try:
        best = trainer.fit()
    finally:
        trainer.close()
    if trainer.rank == 0:
        print(json.dumps({"run": str(args.out), "best": best}, indent=2))
    return EXIT_OK
