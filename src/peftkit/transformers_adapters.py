"""transformers' adapter methods as functions on an un-wrapped model (see ``peftkit.integrations.transformers_model``).

``model.add_adapter(config)`` (transformers + 🤗 PEFT) becomes ``add_adapter(model, config)``; after the first
``add_adapter``/``load_adapter`` the model's own ``model.set_adapter(...)`` etc. run peftkit's code too.
"""

from .integrations import transformers_model as _impl
from .integrations.transformers_model import *

__all__ = list(_impl.__all__)
