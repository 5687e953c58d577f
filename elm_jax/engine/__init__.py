"""The generic training engine every stage (teacher, supernet, retrain, finetune) uses.

Shape of it (after google/flax ``examples/lm1b_nnx``):

* the NNX model is split ONCE into ``(graphdef, params, other)``; the train state
  (:class:`~elm_jax.engine.trainer.TrainState`) is a plain pytree, and ONE pure step
  ``train_step(state, batch) -> (state, metrics)`` is compiled with ``jax.jit``, explicit
  ``in_shardings``/``out_shardings`` (from ``jax.eval_shape`` of the state, see
  :mod:`.sharding`) and ``donate_argnums=0`` (:mod:`.trainer`);
* the data position IS the step: a data source is a pure function of ``(seed, step)``, and the
  state carries ``step`` and ``rng``, so a run killed and rerun from its checkpoint
  (:mod:`.checkpoint`) reproduces the uninterrupted run bit for bit (on CPU);
* the host loop (:func:`~elm_jax.engine.loop.fit`) dispatches steps asynchronously and touches
  metrics on the host only every ``log_every`` steps, one step late, so the device never waits
  (:mod:`.metrics` writes them);
* the optimiser is AdamW with warm-up and linear decay (:mod:`.optim`); losses are in
  :mod:`.losses`;
* ``loss_fn`` / ``eval_fn`` return metric *sums* (added over devices, log windows and eval
  batches); the engine divides none of them on its own: each :class:`~.trainer.Trainer`
  declares its derived metrics as ``ratios={name: (numerator, denominator)}`` (default
  :data:`~.losses.LM_RATIOS`, ``loss = loss_sum / weight_sum`` and
  ``correct = correct_sum / weight_sum``), reported next to the raw sums
  (:func:`~.trainer.derive_ratios`).

The names below are the engine's public API, re-exported for ``from elm_jax import engine``.
"""

from elm_jax.engine.loop import Hooks, fit
from elm_jax.engine.optim import decay_mask, lr_schedule, make_optimizer
from elm_jax.engine.trainer import NonFiniteError, Trainer, TrainState, evaluate
from elm_jax.preemption import Preempted

__all__ = ["Hooks", "fit", "decay_mask", "lr_schedule", "make_optimizer", "NonFiniteError",
           "Trainer", "TrainState", "evaluate", "Preempted"]
