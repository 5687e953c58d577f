"""The generic training engine every stage (teacher, supernet, retrain, finetune) uses.

Shape of it (after google/flax ``examples/lm1b_nnx``):

* the NNX model is split ONCE into ``(graphdef, params, other)``; the train state
  (:class:`TrainState`) is a plain pytree, and ONE pure step
  ``train_step(state, batch) -> (state, metrics)`` is compiled with ``jax.jit``,
  explicit ``in_shardings``/``out_shardings`` (from ``jax.eval_shape`` of the state,
  see :mod:`elm_jax.sharding`) and ``donate_argnums=0``;
* the data position IS the step: a data source is a pure function of
  ``(seed, step)``, and the state carries ``step`` and ``rng``, so a run killed and
  rerun from its checkpoint reproduces the uninterrupted run bit for bit (on CPU);
* the host loop (:func:`fit`) dispatches steps asynchronously and touches metrics on
  the host only every ``log_every`` steps, one step late, so the device never waits.

Config fields read from ``tc`` (a ConfigDict / any attribute object):
``steps, lr, warmup_frac, weight_decay, b1, b2, eps, clip_norm, log_every, eval_every,
checkpoint_every, keep_checkpoints, nan_policy ('stop' | 'skip'), seed``.

Function contracts:
``loss_fn(model, batch, rng) -> (loss, metrics)``: ``loss`` is the scalar that is
differentiated (e.g. a weighted mean), ``metrics`` a dict of scalar *sums* over the
batch (e.g. ``loss_sum``, ``weight_sum``, ``correct_sum``). ``eval_fn(model, batch) ->
metrics`` likewise returns sums. Any ``<name>_sum`` with a ``weight_sum`` next to it is
reported as ``<name> = <name>_sum / weight_sum``, so eval ``loss`` is the token-weighted
mean over the whole eval set, independent of how it is split into batches.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from elm_jax import checkpoint as ckpt_lib
from elm_jax import metrics as metrics_lib
from elm_jax import preemption
from elm_jax import sharding as shd
from elm_jax.fileio import atomic_write_json
from elm_jax.preemption import Preempted  # re-exported: train.Preempted is what fit raises

log = logging.getLogger(__name__)

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]
EvalFn = Callable[[nnx.Module, dict], dict]

_NO_BAD_STEP = np.iinfo(np.int32).max


class NonFiniteError(RuntimeError):
    """A train step produced a non-finite loss or gradient norm (nan_policy='stop')."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class TrainSource(Protocol):
    def batch(self, step: int, process_index: int, process_count: int) -> dict[str, np.ndarray]:
        """This process's local rows of global batch ``step`` (a pure function of step)."""


class EvalSource(Protocol):
    def batches(self, process_index: int, process_count: int) -> Iterable[dict[str, np.ndarray]]:
        """The fixed eval batches (this process's local rows); same count on every process."""


def _cfg(tc: Any, name: str, default: Any) -> Any:
    """``tc.name`` if present, else ``default`` (works for ConfigDict and mappings)."""
    if isinstance(tc, Mapping):
        return tc.get(name, default)
    try:
        return getattr(tc, name)
    except (AttributeError, KeyError):
        return default


# ----------------------------------------------------------------------------
# Optimizer


def lr_schedule(tc: Any, total_steps: int) -> optax.Schedule:
    """Linear warm-up then linear decay to zero.

    With peak ``lr = tc.lr``, ``T = total_steps`` and ``W = floor(tc.warmup_frac * T)``::

        lr(t) = lr * t / W                          for 0 <= t < W
        lr(t) = lr * max(0, (T - t) / (T - W))      for t >= W

    so ``lr(0) = 0`` when there is a warm-up, ``lr(W) = lr`` and ``lr(T) = 0``.
    """
    peak = float(tc.lr)
    total = max(int(total_steps), 1)
    warm = int(math.floor(float(_cfg(tc, "warmup_frac", 0.0)) * total))
    warm = min(max(warm, 0), total - 1) if total > 1 else 0

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        up = peak * t / max(warm, 1)
        down = peak * jnp.maximum(0.0, (total - t) / (total - warm))
        return jnp.where(t < warm, up, down)

    return schedule


def decay_mask(params: Any) -> Any:
    """Weight-decay mask: True for matrices/embeddings, False for biases and norm
    scales (every parameter with ``ndim <= 1``), which should not be pulled to zero."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(tc: Any, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the :func:`lr_schedule`, decoupled weight decay on ``ndim > 1``
    parameters only (:func:`decay_mask`), after global-norm clipping to
    ``tc.clip_norm`` (``0`` = no clipping).

    Fields read: ``lr, warmup_frac, weight_decay, b1, b2, eps, clip_norm``.
    """
    adamw = optax.adamw(
        learning_rate=lr_schedule(tc, total_steps),
        b1=float(_cfg(tc, "b1", 0.9)),
        b2=float(_cfg(tc, "b2", 0.999)),
        eps=float(_cfg(tc, "eps", 1e-8)),
        weight_decay=float(_cfg(tc, "weight_decay", 0.0)),
        mask=decay_mask,
    )
    clip = float(_cfg(tc, "clip_norm", 0.0) or 0.0)
    if clip > 0:
        return optax.chain(optax.clip_by_global_norm(clip), adamw)
    return adamw


# ----------------------------------------------------------------------------
# State and compiled steps


@struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (checkpointed whole).

    Attributes:
      params: ``nnx.State`` of the model's ``nnx.Param`` variables.
      other: the rest of the model state (RNG counts/keys, batch stats); may be empty.
      opt_state: the optax state.
      step: int32 scalar, number of batches consumed = index of the next batch.
      rng: raw PRNG key data (``jax.random.key_data``); split once per step.
    """

    params: Any
    other: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


class _WithFrozen:
    """A jitted ``f(state, batch, frozen)`` called as ``f(state, batch)``; ``frozen`` is bound."""

    def __init__(self, jitted: Any, frozen: Any):
        self.jitted, self.frozen = jitted, frozen

    def __call__(self, state: Any, batch: Any) -> Any:
        return self.jitted(state, batch, self.frozen)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()  # pylint: disable=protected-access


def _where(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(pred, n, o), new, old)


def _reduce_metrics(acc: dict, m: dict) -> dict:
    """Folds one step's metrics into a window: sums, except min/last for two keys."""
    out = {}
    for k, v in m.items():
        if k == "first_bad_step":
            out[k] = jnp.minimum(acc[k], v)
        elif k == "lr":
            out[k] = v
        else:
            out[k] = acc[k] + v
    return out


def _derive(sums: Mapping[str, float]) -> dict[str, float]:
    """Adds ``<name> = <name>_sum / weight_sum`` for every ``<name>_sum``."""
    out = dict(sums)
    w = sums.get("weight_sum")
    if w is not None:
        for k, v in sums.items():
            if k.endswith("_sum") and k != "weight_sum":
                out[k[:-4]] = float(v) / float(w) if float(w) > 0 else float("nan")
    return out


class Trainer:
    """A model, its loss, optimizer and mesh, with the compiled train/eval steps.

    Args:
      model: the constructed NNX model (its current values are the initial state).
      loss_fn: ``(model, batch, rng) -> (loss, metric_sums)``.
      eval_fn: ``(model, batch) -> metric_sums`` (may be ``None``: no evaluation).
      tc: train config (see module docstring for fields).
      mesh: from :func:`elm_jax.sharding.make_mesh`.
      optimizer: overrides :func:`make_optimizer` (e.g. to freeze parts).

    Attributes:
      graphdef: the model's static structure (from the one ``nnx.split``).
      tx, schedule: the optax transformation and its learning-rate schedule.
      abstract_state: ``TrainState`` of ``jax.ShapeDtypeStruct`` with shardings (the
        restore target for checkpoints).
      state_shardings, batch_sharding: the ``NamedSharding`` trees used by the steps.
      train_step: jitted ``(state, batch) -> (state, metrics)``; DONATES ``state``.
        ``metrics`` (replicated scalars): ``loss``, ``grad_norm``, ``lr``, ``skipped``
        (1 if this step was not applied), ``finite_steps``, ``first_bad_step`` and the
        loss_fn's sums, all zeroed for a skipped step.
      eval_step: jitted ``(state, batch) -> metric sums``.
      train_step_traces: how many times ``train_step`` was traced (tests assert 1).
    """

    def __init__(
        self,
        model: nnx.Module,
        loss_fn: LossFn,
        eval_fn: EvalFn | None,
        tc: Any,
        mesh: Mesh,
        *,
        optimizer: optax.GradientTransformation | None = None,
        frozen: Any = None,
    ):
        self.tc = tc
        self.mesh = mesh
        self.loss_fn = loss_fn
        self.eval_fn = eval_fn
        self.nan_policy = str(_cfg(tc, "nan_policy", "stop"))
        if self.nan_policy not in ("stop", "skip"):
            raise ValueError(f"train.nan_policy must be 'stop' or 'skip', got {self.nan_policy!r}")
        self.total_steps = int(tc.steps)
        self.schedule = lr_schedule(tc, self.total_steps)
        self.tx = optimizer if optimizer is not None else make_optimizer(tc, self.total_steps)
        self.graphdef, params, other = nnx.split(model, nnx.Param, ...)
        # Kept to (re)build the initial state; never donated (init_state copies them).
        self._init_params, self._init_other = params, other

        abstract = jax.eval_shape(self._new_state, params, other)
        self.state_shardings: TrainState = shd.state_shardings(abstract, mesh)
        self.abstract_state: TrainState = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings
        )
        self.batch_sharding = shd.batch_sharding(mesh)
        self.train_step_traces = 0
        repl = shd.replicated(mesh)
        self.has_frozen = frozen is not None
        frozen_tree = frozen if self.has_frozen else {}
        frozen_sh = shd.state_shardings(jax.eval_shape(lambda: frozen_tree), mesh)
        self.frozen = self._place(frozen_tree, frozen_sh)
        self.train_step = _WithFrozen(
            jax.jit(
                self._train_step,
                in_shardings=(self.state_shardings, self.batch_sharding, frozen_sh),
                out_shardings=(self.state_shardings, repl),
                donate_argnums=0,
            ),
            self.frozen,
        )
        self.eval_step = _WithFrozen(
            jax.jit(
                self._eval_step,
                in_shardings=(self.state_shardings, self.batch_sharding, frozen_sh),
                out_shardings=repl,
            ),
            self.frozen,
        )
        self._accumulate = jax.jit(_reduce_metrics, out_shardings=repl)
        self._add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), out_shardings=repl)
        self._init_jit = jax.jit(self._new_state, out_shardings=self.state_shardings)

    # -- state ------------------------------------------------------------------
    def _new_state(self, params: Any, other: Any) -> TrainState:
        return TrainState(
            params=params,
            other=other,
            opt_state=self.tx.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.key(int(_cfg(self.tc, "seed", 0)))),
        )

    def _place(self, tree: Any, shardings: Any) -> Any:
        """Host values (identical on every process) -> global arrays with ``shardings``."""

        def one(x: Any, s: Any) -> jax.Array:
            if ckpt_lib.is_prng_key(x):
                data = one(jax.random.key_data(x), s)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

        return jax.tree.map(one, tree, shardings)

    def init_state(self) -> TrainState:
        """The initial state (model's current params, fresh optimizer, step 0), sharded."""
        params = self._place(self._init_params, self.state_shardings.params)
        other = self._place(self._init_other, self.state_shardings.other)
        return self._init_jit(params, other)

    def model_from_state(self, state: TrainState) -> nnx.Module:
        """The NNX model holding ``state``'s params (``nnx.merge``).

        The model shares ``state``'s arrays: do not pass ``state`` to ``train_step``
        (which donates it) while the model is still needed.
        """
        return nnx.merge(self.graphdef, state.params, state.other)

    def num_params(self) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.abstract_state.params)))

    # -- compiled steps ---------------------------------------------------------
    def _train_step(self, state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
        self.train_step_traces += 1  # Python side effect: runs once per trace/compile
        key = jax.random.wrap_key_data(state.rng)
        next_key, step_key = jax.random.split(key)

        def loss_of(params):
            # copy=True: fresh Variables owned by this (grad) trace, so the model may
            # mutate its non-param state (RNG counts, batch stats) inside jax.grad.
            model = nnx.merge(self.graphdef, params, state.other, copy=True)
            loss, sums = self.loss_fn(model, batch, step_key, *self._frozen_args(frozen))
            _, _, new_other = nnx.split(model, nnx.Param, ...)
            return loss, (sums, new_other)

        (loss, (sums, new_other)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        # Non-finite step: keep params/other/opt_state (data position and rng advance,
        # so the bad batch is skipped; with nan_policy='stop' the host loop raises).
        new_state = TrainState(
            params=_where(finite, new_params, state.params),
            other=_where(finite, new_other, state.other),
            opt_state=_where(finite, new_opt, state.opt_state),
            step=state.step + 1,
            rng=jax.random.key_data(next_key),
        )
        zero = jnp.zeros((), jnp.float32)
        metrics = {k: jnp.where(finite, jnp.asarray(v, jnp.float32), zero) for k, v in sums.items()}
        metrics.update(
            loss=jnp.where(finite, loss.astype(jnp.float32), zero),
            grad_norm=jnp.where(finite, grad_norm, zero),
            finite_steps=finite.astype(jnp.int32),
            skipped=(~finite).astype(jnp.int32),
            first_bad_step=jnp.where(finite, _NO_BAD_STEP, state.step).astype(jnp.int32),
            lr=self.schedule(state.step),
        )
        return new_state, metrics

    def _frozen_args(self, frozen: Any) -> tuple:
        return (frozen,) if self.has_frozen else ()

    def _eval_step(self, state: TrainState, batch: dict, frozen: Any) -> dict:
        model = nnx.merge(self.graphdef, state.params, state.other, copy=True)
        out = self.eval_fn(model, batch, *self._frozen_args(frozen))
        return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------
# Evaluation


def evaluate(trainer: Trainer, state: TrainState, eval_source: EvalSource) -> dict[str, float]:
    """Sums ``eval_fn`` over all eval batches (on device, one host fetch at the end).

    Returns the sums plus ``<name> = <name>_sum / weight_sum`` (e.g. ``loss``).
    """
    if trainer.eval_fn is None or eval_source is None:
        return {}
    sums = None
    for local in eval_source.batches(jax.process_index(), jax.process_count()):
        out = trainer.eval_step(state, shd.global_batch(local, trainer.mesh))
        sums = out if sums is None else trainer._add(sums, out)  # pylint: disable=protected-access
    if sums is None:
        return {}
    return _derive({k: float(v) for k, v in jax.device_get(sums).items()})


# ----------------------------------------------------------------------------
# The loop


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
) -> tuple[TrainState, dict[str, Any]]:
    """Trains to ``tc.steps``, resuming from ``<workdir>/<name>/checkpoints``.

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
    log_every = max(int(_cfg(tc, "log_every", 100)), 1)
    eval_every = int(_cfg(tc, "eval_every", 0) or 0)
    run_dir = os.path.join(os.fspath(workdir), name)
    pidx, pcount = jax.process_index(), jax.process_count()
    main = pidx == 0
    if main:
        os.makedirs(run_dir, exist_ok=True)
    t_start = time.time()

    ckpt = ckpt_lib.Checkpointer(
        os.path.join(run_dir, "checkpoints"),
        keep=int(_cfg(tc, "keep_checkpoints", 3)),
        save_every=int(_cfg(tc, "checkpoint_every", 1000)),
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
            last_train = _derive(scalars)
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
