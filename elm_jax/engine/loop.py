"""The host training loop: steps, logging one step late, evaluation, checkpoints, preemption and hooks."""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping, Protocol

import jax
import numpy as np

from elm_jax import preemption
from elm_jax.engine import checkpoint as ckpt_lib
from elm_jax.engine import metrics as metrics_lib
from elm_jax.engine import sharding as shd
from elm_jax.engine.trainer import (
    _NO_BAD_STEP,
    EvalSource,
    NonFiniteError,
    Trainer,
    TrainSource,
    TrainState,
    derive_ratios,
    evaluate,
)
from elm_jax.fields import get as get_field
from elm_jax.fileio import atomic_write_json
from elm_jax.preemption import Preempted

log = logging.getLogger(__name__)


def _tokens_per_step(local: Mapping[str, np.ndarray]) -> int:
    x = local.get("inputs", next(iter(local.values())))
    return int(np.size(x)) * jax.process_count()


class Hooks(Protocol):
    """Stage-specific work between steps whose state is saved with every checkpoint.

    ``after_step(done, state, local_batch, writer)`` runs after step ``done - 1`` was queued
    (``local_batch`` is that step's batch); ``meta()`` returns JSON-able state stored in each
    checkpoint; ``on_restore(meta)`` restores it when a run resumes. With hooks that are pure
    functions of (state, batch, step), a resumed run stays identical to an uninterrupted one.
    """

    def after_step(
        self, done: int, state: TrainState, local_batch: Mapping[str, np.ndarray], writer: Any
    ) -> None: ...

    def meta(self) -> dict: ...

    def on_restore(self, meta: Mapping[str, Any]) -> None: ...


class _PreemptionWatch:
    """SIGTERM -> "stop after this step". Holds :func:`elm_jax.preemption.watch` for the
    duration of ``fit`` (a no-op when ``main`` already holds it for the whole run).

    One process: the notice is the process-wide flag. Several processes: a SIGTERM may
    reach them at different steps, so the decision must be collective; JAX's
    preemption sync service (``multihost_utils.reached_preemption_sync_point``, active
    after ``jax.distributed.initialize``) agrees on one step for all processes.
    """

    def __init__(self):
        self._multi = jax.process_count() > 1
        self._ctx = preemption.watch()

    def __enter__(self) -> "_PreemptionWatch":
        if not self._multi:
            self._ctx.__enter__()
        return self

    def reached(self, step: int) -> bool:
        if self._multi:
            try:
                from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service disabled
                return False
        return preemption.requested()

    def __exit__(self, *exc: Any) -> None:
        if not self._multi:
            self._ctx.__exit__(*exc)


def fit(
    trainer: Trainer,
    train_source: TrainSource,
    eval_source: EvalSource | None,
    workdir: str | os.PathLike,
    *,
    name: str = "teacher",
    meta: Mapping[str, Any] | None = None,
    hooks: "Hooks | None" = None,
    trivial_loss: float | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """Trains to ``tc.steps``, resuming from ``<workdir>/<name>/checkpoints``.

    With ``trivial_loss`` (the loss of the best context-free predictor on the evaluation
    source, DESIGN 8), every evaluation also records ``gain = trivial_loss - loss`` in nats
    (``eval/gain`` in ``metrics.jsonl``, ``gain`` in the summary's ``eval``) and prints one line
    ``<name> step S: validation loss L, trivial answer T, gain +G nats``, so a model that learns
    nothing beyond word frequencies is visible at every evaluation.

    Writes ``<workdir>/<name>/{checkpoints/, metrics.jsonl, tb/, summary.json}``.
    Checkpoints every ``tc.checkpoint_every`` steps and at the end; evaluates every
    ``tc.eval_every`` steps (0 = only at the end) and at the end; logs every
    ``tc.log_every`` steps. ``meta`` (JSON-able, e.g. the config) is stored with each
    checkpoint.

    Raises:
      NonFiniteError: nan_policy='stop' and a step had a non-finite loss/grad norm; raised
        at the latest one step later (each step's flag is fetched once the next step is
        queued); the state was not updated by that step and no non-finite state is ever saved.
      Preempted: SIGTERM received; the current step was finished and checkpointed.

    Returns:
      ``(final_state, summary)``; the summary is also in ``summary.json``.
    """
    tc = trainer.tc
    total = trainer.total_steps
    log_every = max(int(get_field(tc, "log_every", 100)), 1)
    eval_every = int(get_field(tc, "eval_every", 0) or 0)
    run_dir = os.path.join(os.fspath(workdir), name)
    pidx, pcount = jax.process_index(), jax.process_count()
    main = pidx == 0
    if main:
        os.makedirs(run_dir, exist_ok=True)
    t_start = time.time()

    ckpt = ckpt_lib.Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        keep=int(get_field(tc, "keep_checkpoints", 3)),
        save_every=int(get_field(tc, "checkpoint_every", 1000)),
    )
    writer = pbar = None
    try:
        restored = ckpt.restore_latest(trainer.abstract_state)
        if restored is not None:
            state, ck_meta, start = restored
            if hooks is not None:
                hooks.on_restore(ck_meta.get("hooks", {}))
            skipped_total = int(ck_meta.get("skipped_total", 0))
            log.info("%s: resuming from step %d", name, start)
        else:
            state, start, skipped_total = trainer.init_state(), 0, 0
        writer = metrics_lib.MetricWriter(
            run_dir, enabled=main, resume_step=start if restored is not None else None
        )
        pbar = metrics_lib.ProgressBar(total, initial=min(start, total), enabled=main, desc=name)

        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        tokens_per_step = 0
        pending: tuple[int, dict] | None = None  # (step, window metrics on device)
        window: dict | None = None
        prev_bad: jax.Array | None = None  # first_bad_step of the step before (nan_policy='stop')
        dispatched = start - 1  # the last step handed to the device
        t_train = time.perf_counter()

        def check_finite(bad_step: int) -> None:
            if bad_step != _NO_BAD_STEP and trainer.nan_policy == "stop":
                ckpt.wait()
                latest = ckpt.latest_step()
                kept = (f"last good checkpoint: step {latest} in {ckpt.directory}" if latest is not None
                        else "no checkpoint was saved before it (a rerun starts over)")
                raise NonFiniteError(
                    bad_step,
                    (
                        f"{name}: non-finite loss or gradient norm at step {bad_step} "
                        f"(nan_policy='stop'; stopped at step {dispatched}); the update was not "
                        f"applied and nothing non-finite was saved; {kept}. Lower the learning rate, "
                        f"or set train.nan_policy='skip' to skip such steps, and rerun."
                    ),
                )

        def flush() -> None:
            """Fetches the pending window (one step late) and logs it."""
            nonlocal pending, skipped_total, last_train
            if pending is None:
                return
            step, dev = pending
            pending = None
            host = {k: np.asarray(v).item() for k, v in jax.device_get(dev).items()}
            check_finite(int(host["first_bad_step"]))
            skipped_total += int(host["skipped"])
            n = max(int(host["finite_steps"]), 1)
            scalars = {
                k: v
                for k, v in host.items()
                if k not in ("first_bad_step", "finite_steps", "lr", "skipped", "loss", "grad_norm")
            }
            last_train = derive_ratios(scalars, trainer.ratios)
            last_train.update(
                loss=host["loss"] / n,
                grad_norm=host["grad_norm"] / n,
                lr=host["lr"],
                skipped=float(skipped_total),
            )
            writer.write_scalars(step, {f"train/{k}": v for k, v in last_train.items()})
            pbar.update(step, loss=last_train["loss"], tokens_per_step=tokens_per_step)

        def save(step: int, force: bool) -> None:
            nonlocal window
            if not (force or ckpt.should_save(step)):
                return
            flush()
            partial_skipped = 0
            if window is not None:  # steps since the last log: must all be finite too
                part = jax.device_get({"b": window["first_bad_step"], "s": window["skipped"]})
                check_finite(int(part["b"]))
                partial_skipped = int(part["s"])
            ck = {"step": step, "skipped_total": skipped_total + partial_skipped, "name": name}
            ck.update(dict(meta or {}))
            if hooks is not None:
                ck["hooks"] = hooks.meta()
            ckpt.save(step, state, ck, force=True)

        def run_eval(step: int, log_it: bool = True) -> None:
            nonlocal last_eval
            if trainer.eval_fn is None or eval_source is None:
                return
            last_eval = evaluate(trainer, state, eval_source)
            if trivial_loss is not None and "loss" in last_eval:
                last_eval["gain"] = float(trivial_loss) - last_eval["loss"]
                pbar.write(f"{name} step {step}: validation loss {last_eval['loss']:.4f}, trivial answer "
                           f"{float(trivial_loss):.4f}, gain {last_eval['gain']:+.4f} nats")
            if log_it:
                writer.write_scalars(step, {f"eval/{k}": v for k, v in last_eval.items()})
            if main:
                log.info(
                    "%s step %d eval %s",
                    name,
                    step,
                    {k: round(v, 5) for k, v in last_eval.items() if not k.endswith("_sum")},
                )

        with _PreemptionWatch() as watch:
            for step in range(start, total):
                local = train_source.batch(step, pidx, pcount)
                if not tokens_per_step:
                    tokens_per_step = _tokens_per_step(local)
                state, m = trainer.train_step(state, shd.global_batch(local, trainer.mesh))
                dispatched = step
                if trainer.nan_policy == "stop":
                    # The previous step's flag, fetched now that this step is queued: a bad
                    # step stops the run one step later, without stalling the device.
                    if prev_bad is not None:
                        check_finite(int(jax.device_get(prev_bad)))
                    prev_bad = m["first_bad_step"]
                if hooks is not None:
                    hooks.after_step(step + 1, state, local, writer)
                window = m if window is None else trainer._accumulate(window, m)  # pylint: disable=protected-access
                flush()  # the previous log step's metrics, now that this step is queued
                done = step + 1
                if done % log_every == 0 or done == total:
                    pending, window = (done, window), None
                if eval_every and done % eval_every == 0 and done < total:
                    flush()
                    run_eval(done)
                if watch.reached(done):
                    save(done, force=True)
                    ckpt.wait()
                    raise Preempted(
                        done,
                        (
                            f"{name}: preempted (SIGTERM) after step {done}/{total}; checkpoint saved "
                            f"in {ckpt.directory}; rerun the same command to resume"
                        ),
                    )
                save(done, force=False)

            flush()
            final_step = int(jax.device_get(state.step))
            train_time = time.perf_counter() - t_train
            # A rerun of a finished run re-evaluates for the summary without re-logging.
            run_eval(final_step, log_it=final_step > start or restored is None)
            save(final_step, force=True)
            ckpt.wait()

        steps_run = max(final_step - start, 0)
        summary = {
            "name": name,
            "steps": total,
            "final_step": final_step,
            "resumed_from": start if restored is not None else None,
            "num_params": trainer.num_params(),
            "train": last_train,
            "eval": last_eval,
            "skipped_steps": skipped_total,
            "train_time_s": train_time,
            "wall_time_s": time.time() - t_start,
            "tokens_per_s": (tokens_per_step * steps_run / train_time)
            if train_time > 0 and steps_run
            else None,
            "process_count": pcount,
            "mesh": {k: int(v) for k, v in trainer.mesh.shape.items()},
        }
        if main:
            atomic_write_json(os.path.join(run_dir, "summary.json"), summary)
        return state, summary
    finally:
        if pbar is not None:
            pbar.close()
        if writer is not None:
            writer.close()
        ckpt.close()
