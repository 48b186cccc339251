"""jaxadv: Szegedy et al., "Intriguing properties of neural networks", in JAX."""
from jaxadv.functional import logits_function
from jaxadv.models import ALL_MODELS, ZOO, ZooModel, get_model

__all__ = ["ALL_MODELS", "ZOO", "ZooModel", "get_model", "logits_function"]
