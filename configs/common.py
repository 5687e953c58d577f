"""Pieces shared by ``configs/mlm.py`` and ``configs/clm.py``.

Variants (``--config=configs/mlm.py:VARIANT``, or several comma-separated, applied in order so
later ones win: ``:demo,test`` is the demo's rules at the test's sizes):
  ``demo``  (default) CPU-sized run on the embedded Shakespeare/Milton corpus: minutes on 2 cores.
  ``test``  tiny, for the test suite: seconds.
  ``paper`` the paper-scale settings (DESIGN §1): H=528, 12 layers, seq 128, global batch 256,
            lr 1e-4, a BERT-base (MLM) or GPT-2 (CLM) teacher given as a checkpoint directory.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import ml_collections

VARIANTS = ("demo", "test", "paper")


def train_config(steps: int, lr: float, *, batch_log_every: int = 10, eval_every: int = 0,
                 checkpoint_every: int = 0) -> ml_collections.ConfigDict:
    """Optimiser and loop settings of one training stage (DESIGN §1.5: AdamW, wd 0.01 except
    biases and norms, 10% linear warm-up then linear decay, gradient clipping 1.0)."""
    return ml_collections.ConfigDict(dict(
        steps=steps,
        lr=lr,
        warmup_frac=0.1,
        decay_start_frac=0.0,                 # linear decay starts here (<= warmup_frac: at the warm-up's end)
        weight_decay=0.01,
        b1=0.9,
        b2=0.999,
        eps=1e-6,
        clip_norm=1.0,
        log_every=batch_log_every,
        eval_every=eval_every or steps,       # 0 -> only at the end
        checkpoint_every=checkpoint_every or steps,
        keep_checkpoints=3,
        nan_policy="stop",                    # 'stop': raise naming the step; 'skip': drop the update
    ))


def _decay_from_half(tc: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``tc`` with its learning rate held at the peak to half-way, then decayed linearly."""
    tc.decay_start_frac = 0.5
    return tc


Overlay = Callable[[ml_collections.ConfigDict], None]


def parse_variants(spec: str | None, known: Sequence[str] = VARIANTS) -> tuple[str, ...]:
    """The variants of a ``--config=FILE:SPEC`` argument: ``SPEC`` is one variant or several,
    comma-separated (``minilm,test``), applied in that order so later ones win; empty: ``demo``."""
    names = tuple(v.strip() for v in (spec or "demo").split(","))
    for v in names:
        if v not in known:
            raise ValueError(f"unknown config variant {v!r}; choose one of {tuple(known)} "
                             "(several: comma-separated, later ones winning)")
    return names


def base_config(task: str, variant: str | None = "demo",
                task_overlays: Mapping[str, Overlay] | None = None,
                includes: Mapping[str, Sequence[str]] | None = None) -> ml_collections.ConfigDict:
    """The config of ``task`` for the variant spec ``variant`` (:func:`parse_variants`).

    Each variant is an overlay on the defaults: its shared part here (``test``, ``paper``,
    ``demo``), then its part in ``task_overlays`` (the task's config file: its teacher recipe, its
    teacher checkpoint), one variant after the other, so in ``demo,test`` the test sizes replace
    the demo's wherever both set a field. A variant that only the task file knows (``minilm``) has
    no shared part; ``includes`` names the variants it builds on, applied just before it
    (``minilm``: the demo's rules)."""
    task_overlays, includes = dict(task_overlays or {}), dict(includes or {})
    names = parse_variants(variant, tuple(VARIANTS) + tuple(v for v in task_overlays
                                                            if v not in VARIANTS))
    c = _defaults(task)
    c.variant = ",".join(names)
    applied = []
    for v in names:
        applied += [*includes.get(v, ()), v]
    for v in applied:
        _apply_shared(c, v)
        if v in task_overlays:
            task_overlays[v](c)
    return c


def _defaults(task: str) -> ml_collections.ConfigDict:
    """Every field at its default: what the variants overlay (the ``demo`` sizes)."""
    c = ml_collections.ConfigDict()
    c.task = task
    c.variant = ""
    c.seed = 0

    c.data = ml_collections.ConfigDict(dict(
        corpus="shakespeare",          # 'shakespeare' (embedded default) | 'movie_reviews' (Pang & Lee
                                       # reviews, the polarity task's domain) | both:
                                       # 'shakespeare+movie_reviews' | 'files' | 'tfds'
        cache_dir="",                  # '' -> $ELM_JAX_CACHE or ~/.cache/elm_jax
        train_files="",                # corpus=files: comma-separated paths or globs
        validation_files="",           # corpus=files: held-out documents
        search_files="",               # corpus=files: search-split documents ('' -> held out from train)
        search_fraction=0.05,          # the share of training documents held out (by text hash) as the
                                       # search split when none is given (corpus=movie_reviews / files / tfds)
        validation_fraction=0.1,       # corpus=movie_reviews: the share of reviews held out (by text
                                       # hash) as the validation split
        tfds_name="",                  # corpus=tfds: e.g. 'wikipedia/20230601.en' prepared under tfds_data_dir
        tfds_data_dir="",
        tfds_train_split="train",
        tfds_validation_split="validation",
        tfds_search_split="",          # '' -> held out from the train split by document hash
        text_key="text",
        max_docs=0,                    # > 0: use only the first max_docs documents of each split
        seq_len=64,
        batch_size=32,                 # global batch (all processes together)
        eval_batch_size=32,
        eval_batches=0,                # 0 -> the whole validation split
        mask_rate=0.15,
        mask_token_frac=0.8,
        random_token_frac=0.1,
        # MLM: the LM head and its softmax run only at up to this many selected positions per row
        # (BERT's max_predictions_per_seq; a row's selections beyond it are dropped at random).
        # -1 = auto: mean + 3 sd of the per-row count, rounded up to 8 (seq 64 at 15%: 24);
        # 0 = the head at every position.
        max_predictions=-1,
        tokenizer=ml_collections.ConfigDict(dict(
            kind="sentencepiece",      # 'sentencepiece' (trained here) | 'sentencepiece_model' | 'wordpiece'
            vocab_size=4096,
            model_type="unigram",
            path="",                   # sentencepiece_model / wordpiece: model file or checkpoint dir
            max_train_chars=0,         # > 0: train the tokenizer on a prefix of the training text
            lowercase=True,
        )),
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    # 'auto': bf16 compute with fp32 master weights on GPU/TPU, fp32 on CPU; or 'float32' / 'bfloat16'.
    c.precision = "auto"
    # JAX persistent compilation cache: '' -> <data cache dir>/jax_compile, 'none' = off, or a
    # directory. A resumed or repeated run loads its compiled steps instead of recompiling.
    c.compile_cache_dir = ""
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=0, process_id=-1))

    c.teacher = ml_collections.ConfigDict(dict(
        source="train",                # 'train' | 'hf_bert:DIR' | 'hf_gpt2:DIR' | 'checkpoint:DIR'
        # source=train: reuse the teacher trained for the same corpus, tokenizer, config, seed and
        # code from <data cache dir>/teachers/ (and store the one trained here); False: always train
        cache=True,
        model=ml_collections.ConfigDict(dict(
            family="bert" if task == "mlm" else "gpt2",
            layers=4, hidden=192, heads=4, ffn=768,
            embedding="standard", embed_size=128, dropout=0.1,
        )),
        train=train_config(steps=150, lr=1e-3, eval_every=150, checkpoint_every=50),
    ))

    # Supernet pre-training (DESIGN §1.2-1.5).
    # The demo's student schedule (supernet, search, retraining) is the measured one of
    # BENCHMARKS.md "Student recipes" (bench/results/student_recipe.jsonl): 1,000 supernet and 400
    # retraining steps, each at its peak rate to half-way, put every MLM student over a nat below
    # the context-free answer within the make-run budget (1,200 / 500 gained 0.01-0.05 nats more
    # for 3 more minutes); 100 / 60 steps left them above it.
    c.supernet = ml_collections.ConfigDict(dict(
        train=_decay_from_half(train_config(steps=1000, lr=1e-3, eval_every=500, checkpoint_every=500)),
        sample_per="step",             # 'step': one architecture per step; 'device': one per device
        sandwich=False,                # with sample_per='device': largest, smallest, random others
        # with sample_per='device': architectures per device per step, each on an equal block of
        # the device's rows, run one after the other (the sandwich rule on one device: 3 or more)
        paths_per_device=1,
        kd_loss="pearson",             # 'pearson' (ELM's relational loss) | 'mse'
        # Weight of the ground-truth MLM/CLM loss. The search's fitness is each candidate's MLM/CLM
        # loss with inherited weights, which needs a trained LM head (KD on features alone never
        # trains it), so the default keeps it on; 0.0 = features-only distillation.
        gt_weight=1.0,
        grow=True,                     # PCA width growth (False: fixed initial widths)
        calc_every=10,                 # PCA statistic / CKA logging interval (steps)
        epoch_steps=25,                # widths grow at every epoch end; 0 = one pass over the data
        num_add=2,                     # candidates widened per epoch
        upper_params=0,                # skip growth when the mean params of 1000 random archs exceed it (0 = never)
        remat=False,                   # jax.checkpoint each layer: activation memory of ~1 layer
    ))

    # Evolutionary search (DESIGN §1.6) under budgets; each budget is a dict of optional
    # min_/max_ params, flops (per sequence of data.seq_len) and latency_ms (predicted).
    # Bounds are non-negative numbers; max_<q>=float('inf') means no upper bound (as if left
    # out), an infinite minimum or NaN is refused. Every other float setting must be finite.
    c.search = ml_collections.ConfigDict(dict(
        population=16,
        generations=4,
        parents=4,                     # top-k kept as parents
        mutations=6,                   # children by mutation per generation
        crossovers=4,                  # children by uniform crossover per generation
        mutation_prob=0.2,             # each gene resampled with this probability
        eval_batches=32,               # fixed search-split batches scoring every candidate: the
                                       # candidates' spread over the paired standard error of a
                                       # difference grows ~ sqrt(batches); 32 put it past 5x
                                       # (BENCHMARKS.md "Search fitness noise")
        budgets=[{"name": "small", "max_params": 450_000}],
        random_control=False,          # also the best of as many random legal architectures (same
                                       # scorer), exported and retrained as kind random_best: the
                                       # control the evolution must beat
        rerank_top=0,                  # > 0: re-rank each budget's (and the random control's) k best
                                       # by a short standalone KD training scored on the search split
                                       # (elm_jax.search.rerank); the retraining recipe, rerank_steps long
        rerank_steps=200,
        rerank_tie_level=0.9,          # short losses within this paired interval of the lowest are
                                       # tied and the fitness picks among them (0: the plain argmin);
                                       # on demo seed 1 the argmin took a pick 0.0008 nats lower that
                                       # retrained 0.010 worse
    ))
    # Export: the CKA head module (DESIGN §1.3) re-splits each layer into fewer, wider heads.
    # Hand-designed baselines per budget and family (elm_jax.search.baselines): the largest uniform
    # all-<family> model satisfying every bound, and the one nearest in parameters to the found
    # model; extracted and retrained exactly like the found model (same inherited initialisation,
    # same retraining).
    c.export = ml_collections.ConfigDict(dict(cka_heads=True, cka_threshold=0.9,
                                              baselines=("bert", "mobilebert"),
                                              measure_latency=True))
    # KD re-training of each exported model from its inherited weights (DESIGN §1.7).
    c.retrain = ml_collections.ConfigDict(dict(
        train=_decay_from_half(train_config(steps=400, lr=1e-3, eval_every=200, checkpoint_every=200)),
        kd_loss="pearson", gt_weight=1.0,
    ))
    # Fine-tuning of the final MLM models on a sentence(-pair) task: a classifier on their pooled
    # final states (finetune.pooling).
    c.finetune = ml_collections.ConfigDict(dict(
        task="polarity",               # 'polarity' | 'glue/<cola|sst2|mrpc|qqp|mnli|qnli|rte|wnli>'
        tfds_data_dir="",              # glue: --data_dir of `tfds build glue/<name> --file_format=array_record`
        holdout_frac=0.1,              # glue: stratified part of train held out for model selection
        # 300 steps ~ 3 epochs of the 3,200 polarity training sentences: at 60 steps the demo's
        # barely pre-trained encoders stayed at chance (constant predictions); 300 reach ~0.65.
        train=train_config(steps=300, lr=1e-3, eval_every=300, checkpoint_every=100),
        batch_size=32,
        # Found models are fine-tuned with `seeds` seeds (seed, seed + 1, ...) and, with `scratch`,
        # the same architecture from random initialisation with the same seeds: does pre-training
        # help? Judged by a paired bootstrap over test sentences and seeds (elm_jax.paired_bootstrap),
        # as is every model against bag-of-words. Baselines are fine-tuned with the first seed.
        seeds=1,
        scratch=False,
        # 'mean' (the mean of the final states over the real tokens) | 'cls' (the [CLS] state):
        # the demo's encoders, pre-trained by MLM alone, never trained their [CLS] state; mean
        # pooling fine-tuned the same found model to 0.622 test accuracy against 0.596 (3 seeds).
        pooling="mean",
        kd="none",                     # 'none' | 'dist' (ELM's DIST) | 'soft_ce': KD from the tuned teacher
        kd_weight=1.0,                 # loss = CE + kd_weight * KD(student logits, teacher logits)
        temperature=1.0,
        teacher_train=train_config(steps=300, lr=1e-3, eval_every=300, checkpoint_every=100),
    ))
    # Per-device latency table (DESIGN §2): measured once per device, cached.
    c.latency = ml_collections.ConfigDict(dict(
        predict=True,                  # build/load the table and report predicted latency in search
        batch=1, seq_len=0,            # 0 -> data.seq_len
        # The ONE timing policy (elm_jax.timing.TimingPolicy) of the table, its check and the
        # export stage's measured latency: the quantile of >= repeats interleaved rounds over
        # >= min_time_s seconds (0 = the minimum; see the TimingPolicy docstring for why).
        repeats=20, warmup=3, quantile=0.0, min_time_s=2.0,
        cache_dir="",                  # '' -> data cache dir / latency
    ))

    # The search space of the elastic supernet (DESIGN §1.1); used from the supernet stage on.
    c.space = ml_collections.ConfigDict(dict(
        layers=4, hidden=128, inner=32, embed_size=64, candidates=3, f0=64,
        max_ffn=ml_collections.ConfigDict(dict(bert=384, mobilebert=192)),
        base_heads=4, families=("bert", "mobilebert"),
        elastic_depth=True, min_layers=2,
        head_choices=(),               # head counts the supernet samples (divisors of base_heads;
                                       # () = all). (4,): the paper's fixed heads, which the CKA
                                       # head module may then reduce at export
    ))
    return c


def _apply_shared(c: ml_collections.ConfigDict, variant: str) -> None:
    """The part of ``variant`` that both tasks share, in place."""
    if variant == "test":
        c.data.update(seq_len=32, batch_size=8, eval_batch_size=8, eval_batches=2, max_docs=6)
        # 8 rows cannot carry several architectures per device on the suite's 8 devices: one
        # architecture per step (also after ``demo``: ``demo,test`` samples as the test does)
        c.supernet.update(sample_per="step", sandwich=False, paths_per_device=1)
        c.data.tokenizer.update(vocab_size=256, max_train_chars=200_000)
        c.teacher.model.update(layers=2, hidden=32, heads=2, ffn=64, embed_size=16, dropout=0.0)
        c.teacher.cache = False        # tests train (and resume) the teacher they ask for
        c.teacher.train = train_config(steps=20, lr=3e-3, batch_log_every=5, eval_every=10,
                                       checkpoint_every=10)
        c.supernet.train = train_config(steps=12, lr=3e-3, batch_log_every=4, eval_every=6,
                                        checkpoint_every=6)
        c.supernet.update(calc_every=2, epoch_steps=6, num_add=1)
        c.retrain.train = train_config(steps=6, lr=3e-3, batch_log_every=3, eval_every=6,
                                       checkpoint_every=3)
        c.search.update(population=8, generations=2, parents=3, mutations=3, crossovers=2,
                        eval_batches=1)
        c.search.budgets = [{"name": "small", "max_params": 16_000}]
        c.latency.update(predict=False, repeats=3, warmup=1, min_time_s=0.0)
        c.finetune.train = train_config(steps=6, lr=1e-3, batch_log_every=3, eval_every=6,
                                        checkpoint_every=3)
        c.finetune.teacher_train = train_config(steps=6, lr=1e-3, batch_log_every=3, eval_every=6,
                                                checkpoint_every=3)
        c.finetune.batch_size = 8
        c.space.update(layers=2, hidden=32, inner=16, embed_size=16, candidates=2, f0=16,
                       base_heads=2, min_layers=1)
        c.space.max_ffn.update(bert=64, mobilebert=32)
    elif variant == "paper":
        c.data.update(seq_len=128, batch_size=256, eval_batch_size=256)
        c.teacher.train = train_config(steps=100_000, lr=1e-4, batch_log_every=100,
                                       eval_every=5_000, checkpoint_every=2_000)
        # 10 epochs; with a real corpus set epoch_steps to one pass over it.
        c.supernet.train = train_config(steps=100_000, lr=1e-4, batch_log_every=100,
                                        eval_every=5_000, checkpoint_every=2_000)
        c.supernet.update(calc_every=100, epoch_steps=10_000, num_add=4, upper_params=15_700_000,
                          remat=True)
        c.retrain.train = train_config(steps=50_000, lr=1e-4, batch_log_every=100,
                                       eval_every=5_000, checkpoint_every=2_000)
        c.search.update(population=100, generations=20, parents=25, mutations=25, crossovers=25,
                        eval_batches=16,
                        budgets=[{"name": "small", "max_params": 15_700_000},
                                 {"name": "tiny", "max_params": 10_000_000}])
        c.finetune.train = train_config(steps=3_000, lr=2e-5, batch_log_every=50,
                                        eval_every=500, checkpoint_every=500)
        c.finetune.teacher_train = train_config(steps=3_000, lr=2e-5, batch_log_every=50,
                                                eval_every=500, checkpoint_every=500)
        c.finetune.kd = "dist"         # ELM fine-tunes with DIST from the fine-tuned teacher
        c.finetune.pooling = "cls"     # a pre-trained BERT's [CLS] state, as ELM fine-tunes
        c.space.update(layers=12, hidden=528, inner=132, embed_size=128, candidates=6, f0=132,
                       base_heads=12, min_layers=6)
        # Candidates start at f0*(j+1) (132..792) and grow by f0 up to these caps.
        c.space.max_ffn.update(bert=4 * 528, mobilebert=8 * 132)
    if variant == "demo":
        # The sandwich rule, four architectures per step (largest, smallest, two random), each on a
        # quarter of every device's rows, so it runs on one device as on several (RESULTS.md,
        # "Search recipes": sandwich4 on 4 devices and sandwich_p4 on one put the found model
        # 0.015-0.016 nats ahead of the size-matched BERT and ahead of the random search's best,
        # where uniform one-per-step sampling left it 0.011-0.066 behind; per-device uniform
        # sampling, the control, 0.031 behind).
        c.supernet.update(sample_per="device", sandwich=True, paths_per_device=4)
