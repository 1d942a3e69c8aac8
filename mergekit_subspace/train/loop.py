"""The optimisation itself: AdamW on the trainable tensors only, warm-up then linear decay, gradient
clipping, and early stopping on the validation loss (the best state is restored)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mergekit_subspace.train.data import Encoded, batch_order, collate, in_batches

WARMUP_FRACTION = 0.1
CLIP_NORM = 1.0


@dataclass
class LoopSettings:
    steps: int
    lr: float
    batch_size: int
    seed: int
    eval_every: int
    patience: int | None
    pad_id: int


@dataclass
class LoopOutcome:
    """What the run did: steps taken, the step whose state was kept, losses, validation passes, time."""

    steps_run: int
    kept_step: int
    train_loss: float
    seconds: float
    cpu_seconds: float = 0.0
    stopped_early: bool = False
    validation: list[dict[str, Any]] = field(default_factory=list)


def warmup_decay(steps: int) -> Any:
    """LR multiplier: linear warm-up over the first 10% of steps, then linear decay to zero."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    return lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, batch_size: int, pad_id: int) -> dict[str, float]:
    """Mean loss over the examples (over answer tokens for a causal LM) and, for classifiers, accuracy."""
    was_training = model.training
    model.eval()
    loss_sum, weight, correct = 0.0, 0, 0
    classify = not isinstance(data.targets[0], list)
    for rows in in_batches(len(data.ids), batch_size):
        batch = collate(data, rows, pad_id)
        out = model(**batch)
        if classify:
            count = len(rows)
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        else:  # the model's loss is a mean over the answer tokens of the batch (shifted by one)
            count = int((batch["labels"][:, 1:] != -100).sum())
        loss_sum += float(out.loss) * count
        weight += count
    model.train(was_training)
    result = {"loss": loss_sum / max(1, weight)}
    if classify:
        result["accuracy"] = correct / len(data.ids)
    return result


def run_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    train: Encoded,
    validation: Encoded | None,
    settings: LoopSettings,
    desc: str,
    progress: bool = True,
) -> LoopOutcome:
    """Train `params` (everything else in `model` is frozen) for `settings.steps` steps or until the
    validation loss has not improved for `patience` passes; the best validated state is restored."""
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_decay(settings.steps))
    lengths = [len(ids) for ids in train.ids]
    order = batch_order(lengths, settings.batch_size, torch.Generator().manual_seed(settings.seed))
    best_loss, best_state, kept_step, stale = math.inf, None, 0, 0
    outcome = LoopOutcome(steps_run=0, kept_step=0, train_loss=math.nan, seconds=0.0)
    recent: list[float] = []
    model.train()
    start, cpu_start = time.perf_counter(), time.process_time()
    with tqdm(total=settings.steps, desc=desc, disable=None if progress else True) as bar:
        for step in range(1, settings.steps + 1):
            loss = model(**collate(train, next(order), settings.pad_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            recent = (recent + [float(loss.detach())])[-10:]
            outcome.steps_run = step
            bar.update(1)
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
            if validation is None or (step % settings.eval_every and step != settings.steps):
                continue
            scores = evaluate(model, validation, settings.batch_size, settings.pad_id)
            outcome.validation.append({"step": step, **scores})
            if scores["loss"] < best_loss:
                best_loss, kept_step, stale = scores["loss"], step, 0
                best_state = [p.detach().clone() for p in params]
            else:
                stale += 1
                if settings.patience is not None and stale >= settings.patience:
                    outcome.stopped_early = True
                    break
    outcome.seconds = time.perf_counter() - start
    outcome.cpu_seconds = time.process_time() - cpu_start
    outcome.train_loss = sum(recent) / len(recent)
    outcome.kept_step = outcome.steps_run
    if best_state is not None:  # validated: keep the state with the lowest validation loss
        with torch.no_grad():
            for param, saved in zip(params, best_state, strict=True):
                param.copy_(saved)
        outcome.kept_step = kept_step
    model.eval()
    return outcome
