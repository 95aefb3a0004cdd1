"""Small models saejax trains itself: the embedded modular-arithmetic default (:mod:`.modular`)."""

from saejax.models.modular import (
                                   ModularConfig,
                                   default_config,
                                   load_or_train,
                                   modular_activations,
                                   modular_model,
                                   prompts,
                                   row_labels,
)

__all__ = ["ModularConfig", "default_config", "load_or_train", "modular_activations", "modular_model", "prompts",
           "row_labels"]
