"""`keep:`: learn the new task without forgetting the old skills (docs/keep.md).

Next to the task loss the model answers unlabelled keep prompts (the old skills' questions about the
fine-tuning images, or the user's keep data) and is pulled toward its own base: the same model with its
adapters switched off by a flag (no second copy, and unlike PEFT's `disable_adapter()` no adapter's
`requires_grad` is touched, so a layer schedule's frozen layers stay frozen). Two targets:
- `kl`: the base's next-token distribution at the answer position, computed on the fly without grad;
- `answers`: cross-entropy on the base's greedy answers, generated once before training.
The weight rises from 0 over `ramp` of training (a constant weight from step 0 stalls the new task).
Two ways to pay less per step (docs/keep.md, measured in docs/benchmarks.md): `refresh: k` asks the same rows
for k calls, so the base decodes once per k (its targets never go stale: the base is frozen); `fuse: true`
appends the keep rows to the training batch, so one forward and backward serve both terms.

Host-free: a host hands over its processor (or a `render` function for its chat template) and, for
`images: train` with `target: answers`, a few collated training batches; `Keep.term` is then called after
each training forward and its value is added to the task loss like every other extra term (under `fuse`,
`fuse` runs before the forward and hands the host the joined batch).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..base_view import adapters_disabled, cpu_4bit_repack_off
from ..errors import MMTuningError
from .batches import IGNORE_INDEX, appended, joined_rows, per_token, right_padded, to_model, unwrap_parallel
from .rows import (KeepRow, Render, answer_batch, collate_images, conversation_messages, left_padded, open_image,
                   processed_row, prompt_batch, prompt_tokens, splice, template_renderer, tokenizer_of,
                   training_images, user_messages)
from .share import Share, keep_share
from .sources import KeepSources, resolve_sources

__all__ = ["Keep", "KeepStep", "Share", "keep_share", "joined_rows", "right_padded", "appended", "per_token",
           "to_model", "unwrap_parallel", "cpu_4bit_repack_off", "describe", "IGNORE_INDEX"]

logger = logging.getLogger("mmtuning.keep")
LOG_KEY = "loss_keep"
SHOWN_EXAMPLES = 4  # base answers shown in the log before training


@dataclass
class KeepStep:
    """One call's keep rows as the tuned model reads them, and the unweighted term from their logits."""

    batch: dict[str, torch.Tensor]
    positions: int  # the term reads each row's last `positions` logits
    loss: Callable[[torch.Tensor], torch.Tensor]  # logits (rows, positions, vocab) -> the term
    live: torch.Tensor | None = None  # (rows, positions): the answer positions the term reads (kl)
    image_rows: list[int | None] | None = None  # per row, the training row of its image (images: train)


@dataclass
class Pending:
    """A call's plan: its keep step (None when the weight is 0 now) and where its rows sit in a fused batch."""

    step: KeepStep | None
    factor: float
    task_rows: int = 0  # training rows before the keep rows in the fused batch; 0: not fused
    fresh: bool = False  # the step's rows were drawn from this batch (not reused under `refresh`)
    packed: Any = None  # shared_prefix.Packed when the keep rows ride behind their training rows


class Keep:
    """One run's keep term: sources (checked at construction), rows (built in `prepare`), the term per step."""

    def __init__(self, spec: Any, where: str = "mmtuning.keep"):
        self.spec = spec
        self.where = where
        self.sources: KeepSources = resolve_sources(spec, where)
        self.pool: list[KeepRow] = []
        self.prepared = False
        self.processor: Any = None
        self.render: Render | None = None
        self.image_id: int | None = None
        self.pad_id = 0
        self.total_steps: int | None = None
        self.accumulation = 1
        self.step = 0
        self.micro = 0
        self.capture: Any = None  # the losses' FeatureCapture: paused during keep forwards
        self.report: dict[str, Any] = {}
        self._checked_graph = False
        self._logits_to_keep = True
        self._use_cache = True  # off after a model fails cached decoding once
        self._synced: tuple[int, bool] | None = None  # (model id, whether its forwards gather across ranks)
        self._first_batch: dict[str, Any] | None = None
        self.pool_has_train = False  # `answers` over training images: the pool holds them, not each step
        self._tokens: dict[str, tuple[str, list[int]]] = {}  # prompt -> template text and ids (one image)
        self._pending: Pending | None = None  # planned by `fuse` before the forward, read by `term` after it
        self._cached: tuple[tuple[int, int], KeepStep] | None = None  # ((refresh group, rows), its keep step)
        self._fusing = True  # off after a fused forward fails or returns no logits for the keep rows
        self._packing = True  # off after a forward with packed keep rows fails
        self._sharing = True  # off after the base fails to share an image prefix between keep rows
        self._said_unjoinable = False  # the once-per-run warning

    # --- before training ------------------------------------------------------------------------------

    def check_plan(self, plan: Any) -> None:
        """Refuse a keep term that no adapter could move: text-only keep prompts with adapters only on the
        vision side never reach an adapter on their way to the logits."""
        if self.sources.has_images:
            return
        if not plan.modules_of("language") and not plan.parameters_of("language") and not plan.selected_of("language"):
            raise MMTuningError(
                f"{self.where}: the keep prompts carry no images (images: none) and there are no language-model "
                f"adapters, so no adapter sits on their path to the logits and the keep term could change nothing. "
                f"Enable language adapters (language: {{}}) or ask the prompts about images (images: train).")

    def prepare(self, model: nn.Module, processor: Any, *, render: Render | None = None,
                chat_template: str | None = None, training_batches: Iterable[dict[str, Any]] | None = None,
                total_steps: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Build the keep rows with the run's processor and chat template, generate the base's answers where
        needed, and log what will be kept. Returns that report (also `self.report`)."""
        from ..arch import unwrap
        from ..arch import image_token_id

        self.processor = processor
        self.render = render or template_renderer(processor, chat_template)
        tokenizer = tokenizer_of(processor)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        try:
            self.image_id = image_token_id(unwrap(model).config)
        except ValueError:
            self.image_id = None
        from .shared_prefix import PACKED_MODEL_TYPES

        self._packing = self._packing and getattr(unwrap(model).config, "model_type", None) in PACKED_MODEL_TYPES
        if total_steps:
            self.total_steps = total_steps
        batches = iter(training_batches or ())
        self.pool = self._build_pool(batches)
        self._first_batch = next(batches, None) if self.sources.uses_train_images and not self.pool_has_train else None
        examples = self._example_rows()
        answered = examples + (self.pool if self.spec.target == "answers" else [])
        for row, answer in zip(answered, self._generate(model, answered)):
            row.answer_ids = answer
        self.prepared = True
        self.report = self._describe(examples, tokenizer)
        for line in describe(self.report):
            (log or logger.info)(line)
        return self.report

    def _build_pool(self, batches) -> list[KeepRow]:
        spec, sources = self.spec, self.sources
        rows: list[KeepRow] = []
        if sources.prompts and sources.images == "none":
            rows += [self._asked(processed_row(user_messages(p, 0), [], self.processor, self.render), p)
                     for p in sources.prompts]
        elif sources.prompts and sources.images == "files":
            for index in range(min(spec.pool, len(sources.prompts) * len(sources.image_files))):
                image = sources.image_files[index // len(sources.prompts)]
                prompt = sources.prompts[index % len(sources.prompts)]
                rows.append(self._asked(processed_row(user_messages(prompt, 1), [open_image(image)], self.processor,
                                                      self.render), prompt))
        elif sources.uses_train_images and spec.target == "answers":
            self.pool_has_train = True
            images = self._collect_training_images(batches, -(-spec.pool // len(sources.prompts)))
            for index in range(min(spec.pool, len(images) * len(sources.prompts))):
                image = images[index // len(sources.prompts)]
                rows.append(self._spliced(sources.prompts[index % len(sources.prompts)], image))
        rows = rows[: spec.pool]
        for conversation in sources.conversations[: spec.pool]:
            pictures = [open_image(p) for p in conversation.images]
            rows.append(self._asked(processed_row(conversation_messages(conversation.text, len(pictures)), pictures,
                                                  self.processor, self.render), conversation.text))
        return rows

    def _collect_training_images(self, batches, count: int) -> list[tuple[dict[str, torch.Tensor], int]]:
        images: list[tuple[dict[str, torch.Tensor], int]] = []
        for batch in batches:
            images += training_images(batch, self.image_id)
            if len(images) >= count:
                break
        if not images:
            raise MMTuningError(
                f"{self.where}.images: `train` with target `answers` needs training images before training, and none "
                f"were handed over (prepare_keep(..., training_batches=...)) or the batches hold no images. Write "
                f"`images:` as a folder of images, or use target: kl.")
        return images[:count]

    def _example_rows(self) -> list[KeepRow]:
        """A few rows to show the base's answers for; with per-step training images, from the first batch."""
        if self.pool:
            return [] if self.spec.target == "answers" else self.pool[:SHOWN_EXAMPLES]
        batch = self._first_batch
        if batch is None:
            return []
        images = training_images(batch, self.image_id)
        prompts = self.sources.prompts
        return [self._spliced(prompts[i % len(prompts)], images[i % len(images)])
                for i in range(min(SHOWN_EXAMPLES, len(images) * len(prompts)))]

    @torch.no_grad()
    def _generate(self, model: nn.Module, rows: list[KeepRow]) -> list[list[int]]:
        """The base's greedy answers (adapters off), each ending with the end-of-turn token."""
        if not rows:
            return []
        tokenizer = tokenizer_of(self.processor)
        eos = tokenizer.eos_token_id
        answers: list[list[int]] = []
        was_training = model.training
        model.eval()
        try:
            with self._paused(), adapters_disabled(model), cpu_4bit_repack_off(model):
                for start in range(0, len(rows), 32):
                    chunk = rows[start: start + 32]
                    batch = to_model(prompt_batch(chunk, self.pad_id), model)
                    out = model.generate(**batch, max_new_tokens=self.spec.answer_tokens, do_sample=False,
                                         pad_token_id=self.pad_id, eos_token_id=eos)
                    for generated in out[:, batch["input_ids"].shape[1]:].tolist():
                        if eos in generated:
                            generated = generated[: generated.index(eos) + 1]
                        answers.append([t for t in generated if t != self.pad_id or t == eos] or [eos])
        finally:
            model.train(was_training)
        return answers

    def _describe(self, examples: list[KeepRow], tokenizer) -> dict[str, Any]:
        shown = examples or self.pool[:SHOWN_EXAMPLES]
        image_text = {"train": "the training batches' images", "none": "no images",
                      "files": f"{len(self.sources.image_files)} image file(s)"}[self.sources.images]
        return {
            "prompts": len(self.sources.prompts),
            "conversations": len(self.sources.conversations),
            "images": image_text,
            "rows": len(self.pool) if self.pool else "per step, over the training batch's images",
            "target": self.spec.target,
            "weight": self.spec.weight,
            "ramp": f"{self.spec.ramp_steps} steps" if self.spec.ramp_steps is not None else f"{self.spec.ramp:g} of training",
            "batch_size": self.spec.batch_size or "half the training rows",
            "per": self.spec.per,
            "every": self.spec.every,
            "refresh": self.spec.refresh,
            "fuse": self.spec.fuse,
            "templates": list(dict.fromkeys(row.text for row in shown))[:SHOWN_EXAMPLES],
            "examples": [{"prompt": row.question, "base_answer": tokenizer.decode(row.answer_ids, skip_special_tokens=True).strip()}
                         for row in shown],
        }

    # --- during training ------------------------------------------------------------------------------

    def factor(self, step: int | None = None) -> float:
        """The keep weight at optimizer step `step`: the ramp, then `every`'s skip-and-scale."""
        step = self.step if step is None else step
        spec = self.spec
        if spec.every > 1 and step % spec.every:
            return 0.0
        ramp = spec.ramp_steps if spec.ramp_steps is not None else spec.ramp * (self.total_steps or 0)
        if spec.ramp_steps is None and spec.ramp > 0 and not self.total_steps:
            raise MMTuningError(f"{self.where}.ramp: a share of training needs the run's total steps; pass "
                                f"total_steps to prepare_keep or write ramp_steps: N.")
        weight = spec.weight * (min(1.0, step / ramp) if ramp > 0 else 1.0)
        return weight * spec.every

    def term(self, model: nn.Module, inputs: dict[str, Any], outputs: Any = None) -> torch.Tensor | None:
        """The weighted keep term for this micro-batch (None when its weight is 0 now, or outside training).
        After a fused forward (`fuse`) it is read from that forward's `outputs`; else the keep rows get a
        forward of their own."""
        if not model.training or not torch.is_grad_enabled():
            return None
        pending, self._pending = self._pending or self._plan(model, inputs), None
        if pending.step is None:
            return None
        step = pending.step
        logits = self._fused_logits(pending, outputs)
        if logits is None:
            with self._paused():
                logits = self._last_logits(unwrap_parallel(model), step.batch, step.positions)
        value = step.loss(logits)
        if not self._checked_graph:
            if not value.requires_grad:
                raise MMTuningError(f"{self.where}: the keep term has no gradient: no trainable adapter sits on the "
                                    f"keep prompts' path to the logits. Put adapters on the language model "
                                    f"(language: {{}}) or remove `keep:`.")
            self._checked_graph = True
        return value * pending.factor

    def fuse(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """`fuse: true`: the training batch with this call's keep rows appended (unlabelled, so the task loss is
        unchanged), for one forward and backward instead of two; `term` then reads the keep rows' logits from
        that forward. The batch as it is when keep is off now, or when the rows cannot join it."""
        if not (self.spec.fuse and self._fusing and model.training and torch.is_grad_enabled()):
            return inputs
        self._pending = pending = self._plan(model, inputs)
        if pending.step is None:
            return inputs
        packed = self._packed(inputs, pending)
        if packed is not None:
            pending.packed, pending.task_rows = packed, inputs["input_ids"].shape[0]
            return packed.batch
        joined = joined_rows(inputs, pending.step.batch, self.pad_id)
        if joined is None:
            if not self._said_unjoinable:
                logger.warning("mmtuning keep: a training batch's inputs (%s) differ from the keep rows' (%s); its keep "
                               "rows get a forward of their own", sorted(inputs), sorted(pending.step.batch))
                self._said_unjoinable = True
            return inputs
        pending.task_rows = inputs["input_ids"].shape[0]
        return joined

    def _packed(self, inputs: dict[str, Any], pending: "Pending"):
        """The keep rows behind the training rows holding their images (shared_prefix.py), where that is exact."""
        step = pending.step
        if not (pending.fresh and self._packing and step.live is not None and step.image_rows):
            return None
        from .shared_prefix import packed_rows

        return packed_rows(inputs, step.batch, step.image_rows, step.live, self.pad_id, self.image_id)

    def unfuse(self, error: BaseException) -> None:
        """The fused forward failed on this model: its keep rows (and every later call's) get their own forward."""
        if self._pending is not None and self._pending.packed is not None:
            logger.warning("mmtuning keep: the training forward with keep rows packed behind their images failed "
                           "(%s); keep rows are joined as rows of their own from now on", error)
            self._packing = False
        else:
            logger.warning("mmtuning keep: the training forward with keep rows joined failed (%s); keep rows get a "
                           "forward of their own from now on (fuse: false)", error)
            self._fusing = False
        if self._pending is not None:
            self._pending.task_rows, self._pending.packed = 0, None

    def _plan(self, model: nn.Module, inputs: dict[str, Any]) -> "Pending":
        """This call's factor and keep step; counts the call (a resumed run draws the same rows)."""
        if not self.prepared:
            raise MMTuningError("mmtuning.keep is configured but not prepared: call MMTuning.prepare_keep(model, "
                                "processor, ...) before training (the transformers Trainer integration does it in train()).")
        share = self.share(inputs["input_ids"].shape[0], self.micro)
        self.micro += 1
        factor = self.factor()
        if factor == 0 or share.rows == 0:
            return Pending(None, 0.0)
        step, fresh = self._keep_step(unwrap_parallel(model), inputs, share)
        return Pending(step, factor * share.scale, fresh=fresh)

    def share(self, task_rows: int, micro: int) -> "Share":
        """This micro-batch's part of the optimizer step's keep rows (a function of the step and the micro-batch,
        so a resumed run asks the same rows): see `keep_share`."""
        chunk = len(self.sources.prompts) if self.sources.uses_train_images and not self.pool_has_train else 1
        return keep_share(self.spec, task_rows, self.step, micro, self.accumulation, chunk)

    def _keep_step(self, model: nn.Module, inputs: dict[str, Any], share: "Share") -> tuple["KeepStep", bool]:
        """New keep rows and targets every `refresh` keep-bearing micro-batches; in between the same ones (the
        base is frozen, so its targets for a row never change). Also whether they were drawn from `inputs`."""
        group = (share.first // (self.spec.refresh * share.rows), share.rows)  # every `refresh` calls of this size
        if self._cached is not None and self._cached[0] == group:
            return self._cached[1], False
        rows = self.rows_for(inputs, share.first, share.rows)
        with self._paused():
            step = self._kl_step(model, rows) if self.spec.target == "kl" else self._answers_step(model, rows)
        step.image_rows = [row.image_row for row in rows]
        self._cached = (group, step)
        return step, True

    def _fused_logits(self, pending: "Pending", outputs: Any) -> torch.Tensor | None:
        """The keep rows' logits at the positions the term reads, from the fused forward's outputs (None when
        the call was not fused, or the forward returned no logits for them: fused-loss kernels)."""
        if not pending.task_rows:
            return None
        logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        if pending.packed is not None and isinstance(logits, torch.Tensor) and logits.dim() == 3 \
                and logits.shape[:2] == pending.packed.batch["input_ids"].shape:
            return pending.packed.keep_logits(logits, pending.step.positions)
        batch = pending.step.batch
        rows, length = batch["input_ids"].shape
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[0] != pending.task_rows + rows \
                or logits.shape[1] < length:
            logger.warning("mmtuning keep: the training forward returned no logits for the joined keep rows (a fused "
                           "loss kernel?); keep rows get a forward of their own from now on (fuse: false)")
            self._fusing = False
            return None
        return logits[pending.task_rows:, length - pending.step.positions: length]

    def rows_for(self, inputs: dict[str, Any], first: int, count: int) -> list[KeepRow]:
        """Keep rows `first` .. `first + count - 1` of the run (a resumed run draws the same rows): pool rows in
        turn, or the prompts in turn about this batch's own images."""
        sources: list[Callable[[int], KeepRow]] = []
        if self.pool:
            sources.append(lambda i: self.pool[(first + i) % len(self.pool)])
        if self.sources.uses_train_images and not self.pool_has_train:
            images = training_images(inputs, self.image_id)
            if images:
                prompts = self.sources.prompts
                one_each = len(images) == inputs["input_ids"].shape[0]  # image i is training row i's
                sources.append(lambda i: self._spliced(prompts[(first + i) % len(prompts)], images[i % len(images)],
                                                       i % len(images) if one_each else None))
        if not sources:
            raise MMTuningError(f"{self.where}: this training batch has no images for the keep prompts (images: "
                                f"train); write `images:` as a folder of images, or add `data:`.")
        return [sources[(first + i) % len(sources)](i) for i in range(count)]

    def _spliced(self, prompt: str, image, image_row: int | None = None) -> KeepRow:
        if prompt not in self._tokens:
            self._tokens[prompt] = prompt_tokens(prompt, 1, self.processor, self.render)
        text, ids = self._tokens[prompt]
        row = self._asked(splice(text, ids, [image], self.image_id), prompt)
        row.image_row = image_row
        return row

    @staticmethod
    def _asked(row: KeepRow, question: str) -> KeepRow:
        row.question = question
        return row

    def _kl(self, model: nn.Module, rows: list[KeepRow]) -> torch.Tensor:
        """The unweighted `kl` term of `rows` with a forward of their own."""
        step = self._kl_step(model, rows)
        return step.loss(self._last_logits(model, step.batch, step.positions))

    def _kl_step(self, model: nn.Module, rows: list[KeepRow]) -> "KeepStep":
        """KL(base || tuned) at every position of the base's greedy answer, its end-of-turn token included: a
        first-token-only KL kept the old answer word but let the tuned model run on past it ("red left")."""
        batch = to_model(prompt_batch(rows, self.pad_id), model)
        with torch.no_grad(), adapters_disabled(model):
            batch, base, live = self._base_answer(model, batch, rows)
        base_log = F.log_softmax(base.float(), dim=-1)

        def loss(tuned: torch.Tensor) -> torch.Tensor:
            per_position = (base_log.exp() * (base_log - F.log_softmax(tuned.float(), dim=-1))).sum(-1)
            return (per_position * live).sum() / live.sum()

        return KeepStep(batch, base.shape[1], loss, live=live)

    def _base_answer(self, model: nn.Module, batch: dict[str, torch.Tensor], rows: list[KeepRow] | None = None):
        """Greedy decoding with the adapters off, up to `answer_tokens` tokens or every row's end-of-turn token.
        Returns the prompts with the answers but their last token appended (the tuned forward's input), the
        base's logits at each answer position (rows, positions, vocab) and which positions are a row's answer.
        Tokens after the first reuse the prompt's key/value cache (no second pass over the image) where the
        model returns one; otherwise each token re-reads the whole row."""
        eos = tokenizer_of(self.processor).eos_token_id
        logits, live = [], []
        done = torch.zeros(batch["input_ids"].shape[0], dtype=torch.bool, device=batch["input_ids"].device)
        shared = self._shared_first_step(model, rows) if rows is not None else None
        (step, cache), mask = (shared[:2], shared[2]) if shared is not None else (self._first_step(model, batch), None)
        for position in range(self.spec.answer_tokens):
            logits.append(step)
            live.append(~done)
            token = step.argmax(-1)
            if eos is not None:
                done = done | (token == eos)
            if self._all_done(model, done) or position == self.spec.answer_tokens - 1:
                break
            batch = appended(batch, torch.where(done, self.pad_id, token), ~done)
            mask = None if mask is None else torch.cat([mask, (~done)[:, None].to(mask.dtype)], 1)
            step, cache = self._next_step(model, batch, cache, mask)
        return batch, torch.stack(logits, 1), torch.stack(live, 1).float()

    def _all_done(self, model: nn.Module, done: torch.Tensor) -> bool:
        """Every row answered. Under FSDP or ZeRO-3 each forward gathers weights with every rank, so all ranks
        decode the same number of tokens (like transformers' synced_gpus): done when every rank's rows are."""
        if self._synced is None or self._synced[0] != id(model):
            self._synced = (id(model), gathers_across_ranks(model))
        if not self._synced[1]:
            return bool(done.all())
        import torch.distributed as dist

        pending = torch.tensor([0.0 if bool(done.all()) else 1.0], device=done.device)
        dist.all_reduce(pending)
        return float(pending) == 0.0

    def _shared_first_step(self, model: nn.Module, rows: list[KeepRow]):
        """Where several keep rows ask about one training image: the base reads each image's prefix (template
        opening and image tokens) once, copies its key/value cache to the rows that share it, then reads each
        row's question behind it (positions continue from the prefix, padding sits between prefix and question).
        Returns the first answer position's logits, the cache and the decoding mask; None where nothing is shared
        or the model cannot decode this way (then every row reads its whole prompt)."""
        if not (self._sharing and self._use_cache and self.image_id is not None) or len(rows) < 2 \
                or any(r.image_row is None or len(r.images) != 1 for r in rows):
            return None
        images = sorted({r.image_row for r in rows})
        ends = {max(i for i, t in enumerate(r.prompt_ids) if t == self.image_id) + 1 for r in rows}
        if len(images) == len(rows) or len(ends) != 1:
            return None
        (end,) = ends
        first = {image: next(r for r in rows if r.image_row == image) for image in images}
        if any(r.prompt_ids[:end] != first[r.image_row].prompt_ids[:end] or len(r.prompt_ids) == end for r in rows):
            return None
        try:
            prefix = {"input_ids": torch.tensor([first[i].prompt_ids[:end] for i in images]),
                      "attention_mask": torch.ones((len(images), end), dtype=torch.long),
                      **collate_images([first[i].images[0] for i in images])}
            out = self._forward(model, to_model(prefix, model), 1, use_cache=True)
            cache = getattr(out, "past_key_values", None)
            if cache is None or not hasattr(cache, "batch_select_indices"):
                return None
            device = out.logits.device
            cache.batch_select_indices(torch.tensor([images.index(r.image_row) for r in rows], device=device))
            question = left_padded([r.prompt_ids[end:] for r in rows], self.pad_id)
            mask = torch.cat([torch.ones((len(rows), end), dtype=torch.long), question["attention_mask"]], 1).to(device)
            positions = (mask.cumsum(-1) - 1)[:, end:].clamp(min=end)
            out = self._forward(model, {"input_ids": question["input_ids"].to(device), "attention_mask": mask}, 1,
                                past_key_values=cache, use_cache=True, position_ids=positions)
            return out.logits[:, -1], out.past_key_values, mask
        except torch.cuda.OutOfMemoryError:
            raise
        except (TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
            logger.info("mmtuning keep: the base cannot share an image prefix between keep rows (%s); each reads "
                        "its whole prompt", error)
            self._sharing = False
            return None

    def _first_step(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """The prompt's next-token logits, and its key/value cache when the model keeps one (None otherwise:
        under gradient checkpointing in training, transformers turns the cache off)."""
        use_cache = self.spec.answer_tokens > 1 and self._use_cache
        out = self._forward(model, batch, 1, **({"use_cache": True} if use_cache else {}))
        return out.logits[:, -1], getattr(out, "past_key_values", None) if use_cache else None

    def _next_step(self, model: nn.Module, batch: dict[str, torch.Tensor], cache, mask=None):
        """Logits after the token just appended: through the cache when there is one (only the new token and
        its per-token inputs go in, images stay out), else a full forward of the grown row. `mask`: the shared-
        prefix decoding's own mask (its positions are counted from it)."""
        if cache is not None:
            last = {key: value[:, -1:] for key, value in per_token(batch).items()}
            shared = {} if mask is None else {"position_ids": mask.sum(-1, keepdim=True) - 1}
            try:
                out = self._forward(model, {**last, "attention_mask": batch["attention_mask"] if mask is None else mask},
                                    1, past_key_values=cache, use_cache=True, **shared)
                return out.logits[:, -1], out.past_key_values
            except torch.cuda.OutOfMemoryError:
                raise
            except (TypeError, ValueError, RuntimeError, IndexError) as error:  # an architecture that cannot decode this way
                logger.info("mmtuning keep: cached decoding unavailable (%s); each answer token re-reads its row", error)
                self._use_cache = False
        return self._last_logits(model, batch, 1)[:, -1], None

    def _last_logits(self, model: nn.Module, batch: dict[str, torch.Tensor], positions: int) -> torch.Tensor:
        """Logits at the last `positions` positions (rows, positions, vocab)."""
        return self._forward(model, batch, positions).logits[:, -positions:]

    def _forward(self, model: nn.Module, batch: dict[str, torch.Tensor], positions: int, **kwargs: Any):
        """The model's output computing only the last `positions` logits where its forward allows it."""
        if self._logits_to_keep:
            try:
                return model(**batch, logits_to_keep=positions, **kwargs)
            except TypeError:  # a model whose forward has no logits_to_keep
                self._logits_to_keep = False
        return model(**batch, **kwargs)

    def _answers_step(self, model: nn.Module, rows: list[KeepRow]) -> "KeepStep":
        """Cross-entropy on the base's greedy answers (generated before training), read at every position."""
        batch, labels = answer_batch(rows, self.pad_id)
        batch = to_model(batch, model)
        labels = labels[:, 1:].to(batch["input_ids"].device)

        def loss(logits: torch.Tensor) -> torch.Tensor:
            logits = logits[:, :-1]
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)

        return KeepStep(batch, batch["input_ids"].shape[1], loss)

    @contextmanager
    def _paused(self):
        capture = self.capture
        if capture is None:
            yield
            return
        before = capture.paused
        capture.paused = True
        try:
            yield
        finally:
            capture.paused = before

    def callback(self) -> Any:
        """A transformers TrainerCallback feeding total steps, accumulation and the step to the term."""
        from transformers import TrainerCallback

        keep = self

        class KeepStep(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if state.max_steps and state.max_steps > 0:
                    keep.total_steps = state.max_steps
                keep.accumulation = max(1, int(args.gradient_accumulation_steps))

            def on_step_begin(self, args, state, control, **kwargs):
                keep.step, keep.micro = state.global_step, 0

        return KeepStep()


def gathers_across_ranks(model: nn.Module) -> bool:
    """True when the model's forwards are collective: FSDP2-managed (fully_shard) or DeepSpeed ZeRO-3 partitioned
    parameters, in a run of 2+ processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules()) or \
        any(hasattr(p, "ds_id") for p in model.parameters())


def describe(report: dict[str, Any]) -> list[str]:
    """The log lines shown before training: how many prompts, their templates, the base's answers."""
    lines = [f"mmtuning keep: {report['prompts']} prompt(s), {report['conversations']} conversation(s), images: "
             f"{report['images']}; rows: {report['rows']}; target {report['target']}, weight {report['weight']:g} "
             f"ramped over {report['ramp']}, "
             + (f"{report['batch_size']} row(s) per {report.get('per', 'step')}" if isinstance(report["batch_size"], int)
                else f"half as many keep rows as training rows per {report.get('per', 'step')}")
             + (f", every {report['every']} steps" if report["every"] > 1 else "")
             + (f", new rows every {report['refresh']} micro-batches" if report["refresh"] > 1 else "")
             + (", in the training forward (fuse)" if report["fuse"] else "")]
    lines += [f"mmtuning keep template: {text!r}" for text in report["templates"]]
    lines += [f"mmtuning keep base answer: {e['prompt']!r} -> {e['base_answer']!r}" for e in report["examples"]]
    return lines
