"""Models as chains of units, and their measured profiles."""

from smartsplit.models.chain import as_chain
from smartsplit.models.profile import ModelProfile, ProfileCache, UnitProfile, profile_chain
from smartsplit.models.zoo import MODELS, build_model, default_input_shape

__all__ = ["MODELS", "ModelProfile", "ProfileCache", "UnitProfile", "as_chain", "build_model", "default_input_shape", "profile_chain"]
