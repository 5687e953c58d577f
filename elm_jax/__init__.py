"""elm-jax: ELM (Elastic Language Model) architecture search in JAX/Flax NNX."""

__version__ = "0.1.0"
