"""The one trainer loop every strategy plugs into: data, forward, backward, combine, step, evaluate, save.

Mini-batch stochastic gradient descent as in the overview (Arnold, 2016, section 2): at step ``t`` with
a mini-batch ``B_t`` of the training set,

    g_t = (1 / |B_t|) sum_{(x, y) in B_t} grad_w L(f(x; w_t), y),        w_{t+1} = w_t - eta_t * u(g_t)

where ``L`` is the cross-entropy, ``u`` is the optimizer's update (plain SGD, momentum, Adam, ... from
:mod:`distlearn.optim` or ``torch.optim``) and ``eta_t`` the learning-rate schedule. A
:class:`distlearn.parallel.Strategy` decides which examples ``B_t`` this replica sees and how replicas
combine ``g_t`` or ``w`` (the single-process strategy does nothing). The loop::

    for epoch, for step:  x, y = batch(strategy)            # global batch B, this replica's M = B / R
                          loss = L(model(x), y); loss.backward()   # --amp: autocast; fp16 scales loss
                          strategy.before_step(...)          # e.g. allreduce the gradients
                          clip_grad_norm_(...)               # optional, on the combined gradient
                          optimizer.step() (fp16: or skip); scheduler.step(); strategy.after_step(...)
                          every log_every steps: a metrics record; every eval_every: test accuracy;
                          every checkpoint_every: an atomic checkpoint

Reproducibility: ``seed`` fixes the weights' initialisation, the data order (a permutation per epoch that
depends only on ``(seed, epoch)``), dropout and augmentation (a dedicated ``torch.Generator``), and
deterministic algorithms are switched on, so two runs with one seed end with identical weights, and a run
resumed from any checkpoint -- mid-epoch included -- ends with bit-identical weights to one that never
stopped (the checkpoint holds the model, optimizer, scheduler, strategy state, the data position and every
RNG state: :mod:`distlearn.train.state`).

Python API::

    from distlearn.train import TrainConfig, train
    result = train(TrainConfig(dataset="fashion-mnist", model="lenet", optimizer="adam", epochs=2))
    print(result.test_accuracy)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distlearn import optim
from distlearn.amp import Precision, device_type_of
from distlearn.checkpoint import check_fits, load_checkpoint, restoring, save_checkpoint
from distlearn.config import parse_options
from distlearn.data.prepare import RunData
from distlearn.data.user import TrainData
from distlearn.devices import module_device, place_model, synchronize, to_device, to_host
from distlearn.errors import ConfigError
from distlearn.evaluation import evaluate
from distlearn.metrics import METRICS_FILE, MetricRecord, MetricsWriter
from distlearn.models import create_model
from distlearn.parallel import Strategy, create_strategy
from distlearn.rundir import prepare_out
from distlearn.train.config import TrainConfig, validate_config
from distlearn.train.guard import DivergenceGuard
from distlearn.train.inputs import LossFn, check_fit, has_objects, resolve_inputs, run_data
from distlearn.train.launch import after_restart, launch_from_python
from distlearn.train.report import (
    Progress,
    TrainResult,
    Window,
    print_summary,
    progress_wanted,
    run_summary,
    served_result,
)
from distlearn.train.report import status_of as _status
from distlearn.train.schedule import make_scheduler, resume_lr
from distlearn.train.state import (
    RunState,
    check_resume,
    rng_state,
    seed_everything,
    set_rng_state,
    torch_settings,
)
from distlearn.train.straggler import SimClock

__all__ = ["TrainResult", "train"]


def train(
    config: TrainConfig,
    *,
    strategy: Strategy | None = None,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    train_data: TrainData | None = None,
    test_data: TrainData | None = None,
) -> TrainResult:
    """Train ``config.model`` (or ``model``) on ``config.dataset`` (or ``train_data``) and return the result.

    Args:
        config: the run's settings (:class:`TrainConfig`).
        strategy: how replicas combine their work; default ``create_strategy(config.strategy, run=config)``.
        model: a ready model instead of ``config.model`` (the seed still fixes data order and dropout).
        optimizer: a ready optimizer over ``model``'s parameters instead of ``config.optimizer``;
            it may be any ``torch.optim.Optimizer``. Set ``optimizer.requires_closure = True`` on one whose
            ``step`` needs a closure.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` instead of ``config.loss`` (cross-entropy).
        train_data, test_data: a torch Dataset of ``(x, y)``, a pair of tensors or an ArrayDataset
            (:mod:`distlearn.data.user`) instead of ``config.dataset``.
    """
    config = after_restart(config)  # torchrun restarted this worker: resume from OUT's newest checkpoint
    validate_config(config, check_optimizer=optimizer is None, check_strategy=False)
    if strategy is None:  # outside torchrun, a job of several processes is launched (train.launch)
        prepare_out(config)  # an earlier run in --out: refused, or removed with --overwrite
        objects = has_objects(model=model, optimizer=optimizer, loss_fn=loss_fn, train_data=train_data)
        launched = launch_from_python(config, train, objects)
        if launched is not None:
            return launched
    if optimizer is not None and model is None:
        raise ConfigError(
            "an optimizer was passed without its model; pass model= too (the optimizer's parameters)"
        )
    if model is not None and optimizer is not None:
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for group in optimizer.param_groups for p in group["params"]):
            raise ConfigError(
                "the optimizer holds parameters that are not the model's; build it on model.parameters()"
            )
    model, loss_fn, train_data, test_data = resolve_inputs(config, model, loss_fn, train_data, test_data)
    strategy = strategy if strategy is not None else create_strategy(config.strategy, run=config)
    # -- device: --device, or (auto) where a user's model and optimizer already are; see distlearn.devices
    mine = config.device == "auto" and optimizer is not None and module_device(model) is not None
    device = strategy.place(module_device(model) if mine else config.device)
    with torch_settings(config, device):
        strategy.setup(config.seed)
        try:
            if not strategy.trains:  # e.g. a parameter server: its whole life is serving the workers
                strategy.serve()
                return served_result(strategy)
            started = time.perf_counter()
            data = run_data(config, train_data, test_data)
            if model is not None or train_data is not None:
                check_fit(config, model, loss_fn, data)
            return _Run(config, strategy, data, model, optimizer, loss_fn, started=started).run()
        finally:
            strategy.close()


class _Run:
    """One training run on one replica: the model, optimizer, data and the state the loop advances."""

    def __init__(
        self,
        config: TrainConfig,
        strategy: Strategy,
        data: RunData,
        model: nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: LossFn | None,
        *,
        started: float,
    ) -> None:
        self.started = started  # the run's clock starts before its data is loaded
        self.config, self.strategy, self.data = config, strategy, data
        self.device = strategy.device  # model, batches, optimizer state (strategy.place(--device))
        self.user_model, self.user_optimizer = model is not None, optimizer is not None
        self.n_train = len(data.train_labels)
        self.global_batch = config.batch_size
        strategy.local_batch(self.global_batch)  # validates B against the number of replicas
        self.steps_per_epoch = strategy.steps_per_epoch(self.n_train, self.global_batch)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"--batch-size {self.global_batch} exceeds the {self.n_train} training examples; lower it"
            )
        self.total_steps = config.steps if config.steps is not None else config.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self._build(model, optimizer)
        self.guard = DivergenceGuard(config, self.closure_needed, strategy.rank, strategy.world_size)
        self.guard.scaler_decides = self.precision.scaler is not None  # fp16: the scaler drops inf/NaN steps
        self.state = RunState()
        self.window = Window(classify=data.classification, device=self.device)
        self.resumed_from: int | None = None  # the checkpoint's step when this run continues another
        self.clock = SimClock(config, strategy)  # --straggler delays and the simulated clock
        if config.resume is not None:
            self._restore(config.resume)
            self.resumed_from = self.state.step
        self.start_samples = self.state.samples  # samples/s counts only this process's steps and time
        self.writer = MetricsWriter(
            Path(config.out),
            run=config.name,
            rank=strategy.rank,
            world_size=strategy.world_size,
            role=strategy.role,
            tensorboard=config.tensorboard if strategy.is_main else "off",
            append=config.resume is not None,
            cut_after=self.resumed_from,  # the killed run's records past the checkpoint go
            filename=METRICS_FILE if strategy.is_main else f"metrics.rank{strategy.rank}.jsonl",
        )
        self.last_checkpoint: Path | None = None
        self.evaluations: list[MetricRecord] = []
        bar, lines_every = progress_wanted(config, strategy.is_main)
        self.progress = Progress(bar, lines_every, self.total_steps, self.state.step, strategy.replicas)
        self.progress_every = max(1, self.steps_per_epoch // 100)
        self.train_seconds = 0.0  # time in training steps only (evaluation and checkpoints excluded)
        self.hook_seconds = 0.0  # the closure's time in strategy.before_step (closure optimizers call it)
        self.parameters: list[torch.Tensor] = []
        self.loss_fn = loss_fn or nn.functional.cross_entropy

    def _build(self, model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        """Model, optimizer, schedule, augmentation RNG: one seed, so every replica builds the same."""
        config = self.config
        seed_everything(config.seed)
        if model is None:
            channels, height, _ = self.data.image_shape
            model = create_model(
                config.model, in_channels=channels, num_classes=self.data.num_classes, image_size=height
            )
        model = place_model(model, self.device, optimizer)  # before the optimizer is built on it
        self.closure_needed = bool(getattr(optimizer, "requires_closure", False)) or isinstance(
            optimizer, torch.optim.LBFGS
        )
        if optimizer is None:
            options = parse_options(config.optimizer_option)
            optimizer = optim.create(config.optimizer, model.parameters(), lr=config.lr, **options)
            self.closure_needed = optim.needs_closure(config.optimizer)
        self.model, self.optimizer = self.strategy.prepare(model, optimizer)
        self.precision = Precision(config.amp, device_type_of(self.model), closure=self.closure_needed)
        self.strategy.use_grad_scaler(self.precision.scaler)  # None unless --amp fp16
        self.scheduler = make_scheduler(config, self.optimizer, self.total_steps)
        self.augment_generator = torch.Generator().manual_seed(config.seed * 7919 + 17 + self.strategy.rank)

    def _restore(self, path: str) -> None:
        saved = load_checkpoint(path, map_location=self.device)  # written as CPU tensors
        with restoring(saved):  # a missing entry, a tensor of another shape: CheckpointError naming the file
            check_resume(self.config, saved["config"])
            check_fits(self.model, saved["model"], saved["path"])
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved["scheduler"] is not None:
                self.scheduler.load_state_dict(saved["scheduler"])
            resume_lr(self.optimizer, self.scheduler, self.config.lr, saved["config"].get("lr"))
            self.strategy.load_state_dict(saved["strategy"])
            self.precision.load_state_dict(saved.get("amp"))
            self.state = RunState.from_position(saved["position"])
            self.clock.load_state_dict(saved.get("sim_clock"))
            set_rng_state(saved["rng"], self.augment_generator, self.device)
            if saved.get("window") is not None and self.strategy.is_main:  # the partial window it saved
                self.window.load_state_dict(saved["window"])

    # -- the loop -----------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        state = self.state
        self.parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.model.train()
        self.segment_started = time.perf_counter()
        try:
            while state.epoch < self.epochs and state.step < self.total_steps:
                self._epoch()
            self.strategy.barrier()
        finally:
            self.progress.close()
        return self._finish()

    def _epoch(self) -> None:
        state, config = self.state, self.config
        self.epoch_train_seconds = 0.0
        batches = self.strategy.batches(
            self.n_train,
            global_batch=self.global_batch,
            seed=config.seed,
            epoch=state.epoch,
            start_step=state.step_in_epoch,
        )
        for indices in batches:
            self.clock.begin(state.step)  # a straggler's step starts late (--straggler, --straggler-dist)
            generator = self.augment_generator if self.data.augment else None
            x = self.data.transform(self.data.train_images[indices], generator)
            x, y = to_device((x, self.data.train_labels[indices]), self.device)  # pinned, non-blocking
            loss, logits = self._step_with_closure(x, y) if self.closure_needed else self._step(x, y)
            if self.scheduler is not None:
                self.scheduler.step()
            blocked = time.perf_counter()
            self.strategy.after_step(self.model, self.optimizer, state.step)
            self.window.comm += time.perf_counter() - blocked
            self.clock.end(state.step)
            state.step += 1
            state.step_in_epoch += 1
            state.samples += len(y)
            if not self.guard.skipped_last:  # (--on-nonfinite skip dropped the step)
                self.window.add(loss, logits, y)
            self._after_step()
            if state.step >= self.total_steps:
                break
        self._end_epoch()

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        with self.precision.autocast():
            logits = self.model(x)
            loss = self.loss_fn(logits, y)
        self.precision.backward(loss)
        blocked = time.perf_counter()
        self.strategy.before_step(self.model, self.optimizer, self.state.step)
        self.window.comm += time.perf_counter() - blocked
        if self.guard.step_allowed(loss, self.model, self.optimizer, self.state.step):
            self.precision.step(self.optimizer, self.parameters, self.config.clip_grad_norm)  # fp16: or skip
        return loss, logits

    def _step_with_closure(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A step of an optimizer that re-evaluates the loss (CG, L-BFGS); reports its first evaluation."""
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        at = self.state.step

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=True)
            with self.precision.autocast():  # bf16 only: fp16's scaler refuses closures
                out = self.model(x)
                value = self.loss_fn(out, y)
            value.backward()
            blocked = time.perf_counter()
            self.strategy.before_step(self.model, self.optimizer, at)
            self.hook_seconds += time.perf_counter() - blocked
            if self.config.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(self.parameters, self.config.clip_grad_norm)
            seen.append((value.detach(), out.detach()))
            return value

        self.optimizer.step(closure)
        self.guard.observe(seen[0][0], at)
        self.window.comm += self.hook_seconds
        self.hook_seconds = 0.0
        return seen[0]

    def _after_step(self) -> None:
        """The record, evaluation and checkpoint due after this step; their time stays out of the figures."""
        step, config = self.state.step, self.config
        if step % config.log_every == 0 and self.window.samples:  # (none: every step of it skipped)
            self._write_window()
        elif step % self.progress_every == 0:
            self.progress.update(step, samples=self.state.samples)
        pause = None
        if config.eval_every and step % config.eval_every == 0 and self.strategy.evaluates:
            pause = time.perf_counter()
            record = self._evaluate()
            self.progress.update(step, _status(record))
        ends_epoch = self.state.step_in_epoch == self.steps_per_epoch or step >= self.total_steps
        if config.checkpoint_every and step % config.checkpoint_every == 0 and not ends_epoch:
            pause = pause or time.perf_counter()  # (the epoch's end saves after its evaluation)
            self._save(epoch_complete=False)
        if pause is not None:
            self.window.started += time.perf_counter() - pause
            self.train_seconds += pause - self.segment_started
            self.epoch_train_seconds += pause - self.segment_started
            self.segment_started = time.perf_counter()

    def _end_epoch(self) -> None:
        state, config = self.state, self.config
        synchronize(self.device)  # the epoch's queued GPU work counts in its time
        finished = time.perf_counter()
        self.train_seconds += finished - self.segment_started
        self.epoch_train_seconds += finished - self.segment_started
        epoch_complete = state.step_in_epoch == self.steps_per_epoch
        if epoch_complete:
            state.seconds_per_epoch.append(self.epoch_train_seconds)
            if hasattr(self.optimizer, "next_epoch"):  # e.g. Adam(count="epoch"): the overview's p
                self.optimizer.next_epoch()
        if self.strategy.evaluates and not (config.eval_every and state.step % config.eval_every == 0):
            record = self._evaluate()
            self.progress.update(state.step, _status(record))
        self._save(epoch_complete=epoch_complete)
        if epoch_complete:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        self.segment_started = time.perf_counter()

    # -- records, evaluation, checkpoints ----------------------------------------------------------------

    def now(self) -> float:
        """The run's wall clock: the time before a resume plus this process's."""
        return self.state.wall_time + time.perf_counter() - self.started

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _stats(self) -> dict[str, Any]:
        stats = self.strategy.stats()
        return {"bytes_sent": stats.get("bytes_sent"), "staleness": stats.get("staleness")}

    def _record(self, kind: str, **fields: Any) -> MetricRecord:
        step = self.state.step
        self.guard.check(step, self.model, self.optimizer)  # no record of a diverged state: DivergenceError
        if self.clock.active:
            fields["extra"] = {**fields.get("extra", {}), **self.clock.fields()}
        return MetricRecord(
            kind=kind, step=step, epoch=step / self.steps_per_epoch, wall_time=self.now(), lr=self._lr(),
            **self._stats(), **fields,
        )  # fmt: skip

    def _write_window(self) -> None:
        window = self.window
        mean_loss = window.loss.item() / window.samples  # (first: on a GPU it waits for the window's steps)
        elapsed = time.perf_counter() - window.started
        record = self._record(
            "train",
            loss=mean_loss,
            accuracy=window.correct.item() / window.samples if window.classify else None,
            samples_per_s=window.samples / elapsed if elapsed > 0 else None,
            extra={"comm_s": window.comm, "compute_s": max(0.0, elapsed - window.comm)},
        )
        self.writer.write(record)
        self.progress.update(self.state.step, f"loss {mean_loss:.4f}", samples=self.state.samples)
        window.reset()

    def _evaluate(self) -> MetricRecord:
        with self.precision.autocast():
            loss, accuracy = evaluate(
                self.strategy.evaluation_model(self.model),
                self.data.test_images,
                self.data.test_labels,
                self.data.transform,
                self.config.eval_batch_size,
                loss_fn=self.loss_fn if self.loss_fn is not nn.functional.cross_entropy else None,
                classification=self.data.classification,
                device=self.device,
            )
        if accuracy is not None:
            self.state.best_accuracy = max(self.state.best_accuracy, accuracy)
        record = self._record("eval", loss=loss, accuracy=accuracy)
        self.writer.write(record)
        self.evaluations.append(record)
        return record

    def _save(self, epoch_complete: bool) -> None:
        self.guard.check(self.state.step, self.model, self.optimizer)  # never a diverged checkpoint
        if not (self.config.checkpoints and self.strategy.is_main):
            return
        saved = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "amp": self.precision.state_dict(),
            "position": self.state.position(self.now(), epoch_complete),
            "rng": rng_state(self.augment_generator, self.device),
            "window": self.window.state_dict(),  # the next train record's steps so far
            "sim_clock": self.clock.state_dict(),
            "config": asdict(self.config),
            "versions": {"torch": str(torch.__version__)},
        }
        directory = Path(self.config.out) / "checkpoints"
        keep = self.config.keep_checkpoints
        self.last_checkpoint = save_checkpoint(to_host(saved), directory, self.state.step, keep=keep)

    def _finish(self) -> TrainResult:
        state, strategy = self.state, self.strategy
        final = self.evaluations[-1] if self.evaluations else None
        summary = run_summary(self, final)
        samples = state.samples - self.start_samples
        samples_per_s = samples / self.train_seconds if self.train_seconds > 0 else 0.0
        # The job's throughput: every replica trains on its own share of each global batch at the same pace.
        summary["job_samples_per_s"] = samples_per_s * strategy.replicas
        summary["skipped_steps"] = self.guard.skipped  # --on-nonfinite skip
        summary.update(self.clock.summary())  # sim_time_s, straggler_delay_s, compute_cpu_s (clock on)
        record = self._record(
            "summary",
            loss=final.loss if final else None,
            accuracy=final.accuracy if final else None,
            samples_per_s=samples_per_s,
            extra=summary,
        )
        self.writer.write(record)
        self.writer.close()
        if strategy.is_main:  # --quiet too: a log of the run ends with its summary
            print_summary(summary, samples_per_s, self.now(), self.writer.path)
        best = state.best_accuracy if state.best_accuracy >= 0 else math.nan
        return TrainResult(
            model=self.model,
            test_accuracy=(final.accuracy if final else math.nan) if self.data.classification else None,
            test_loss=final.loss if final else math.nan,
            best_accuracy=best,
            steps=state.step,
            epochs=state.step / self.steps_per_epoch,
            samples_per_s=samples_per_s,
            train_seconds=self.train_seconds,
            wall_time=self.now(),
            seconds_per_epoch=state.seconds_per_epoch,
            metrics_path=self.writer.path,
            checkpoint=self.last_checkpoint,
            evaluations=self.evaluations,
            summary=summary,
        )
