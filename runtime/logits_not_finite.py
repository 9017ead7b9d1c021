"""The refusal of a model whose logits came out NaN or infinite: its weights or config overflow the activations."""
from __future__ import annotations

from klconvert.errors import KLError

OVERFLOW_CAUSE = ("its weights or config.json (e.g. routed_scaling_factor) make the activations overflow -- check "
                  "them, or re-download the model")


class LogitsNotFinite(KLError):
    """A model computed NaN or infinite logits `where` ("for the prompt", "at new token 3 of prompt 1"), said as
    `engine`'s where one is named."""

    def __init__(self, where: str, engine: str | None = None):
        super().__init__(f"{'' if engine is None else f'{engine}: '}the model computed NaN or infinite logits "
                         f"{where}: {OVERFLOW_CAUSE}")
        self.where = where

    def ran_by(self, engine: str) -> LogitsNotFinite:
        """This refusal as `engine`'s, one of several models a command runs ("--reference bad" of eval's two): the
        line blamed neither, and a user whose reference overflowed would take the quantized model for the culprit."""
        return LogitsNotFinite(self.where, engine)
