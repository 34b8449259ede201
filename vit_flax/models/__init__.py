"""The models: the Keras example's ViT (seed_vit), Keras Hub's ViT (hub_vit), the Keras
preprocessing layers both run inside (augment), and create_model (factory)."""

from vit_flax.models.factory import Model, abstract_model, create_model

__all__ = ["Model", "abstract_model", "create_model"]
