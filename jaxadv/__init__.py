"""jaxadv: Szegedy et al., "Intriguing properties of neural networks", in JAX."""
from jaxadv.models import ZOO, ALL_MODELS, Layer, Model, get_model

__all__ = ["ZOO", "ALL_MODELS", "Layer", "Model", "get_model"]
