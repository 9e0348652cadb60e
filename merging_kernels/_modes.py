"""Running a user's model in eval mode without losing the mode of any of its modules."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Every module of ``models`` in eval mode inside the block; afterwards each module gets its own mode back.

    ``model.train(was_training)`` would not do: it sets one mode for every submodule, so a model kept in train
    mode with a frozen, eval-mode part (a backbone, a BatchNorm) would come back all in train mode.
    """
    modes = [(m, m.training) for model in models for m in model.modules()]
    roots = [(model, model.training) for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        # each model's own train() first, so that an override undoes what its eval() did beyond the flags (e.g.
        # requires_grad it switched off); then every module's exact flag
        for model, training in roots:
            model.train(training)
        for m, training in modes:  # not m.train(): it sets the children too, and a shared module is listed
            m.training = training  # once, so a later parent would overwrite the mode given back to it
