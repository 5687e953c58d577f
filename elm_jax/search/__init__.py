"""The search library (DESIGN §1.6, §4): population scoring (:mod:`.scoring`), budgets as
constraints (:mod:`.constraints`), the evolutionary search (:mod:`.evolution`) and Pareto sets
(:mod:`.pareto`). The ``search`` stage that drives them is :mod:`elm_jax.stages.search`.
"""
