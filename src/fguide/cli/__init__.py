"""Command-line interface: one thin module per command (parse, call, print).

What every command shares is here, so that one concept has one spelling: the accepted
``--classifier`` forms and the argparse types that refuse a bad number before
anything runs (:class:`fguide.params.Range` instances for numbers).
"""

from __future__ import annotations

import argparse
from typing import Any

from fguide import defaults
from fguide.params import Range

CLASSIFIER_FORMS = (
    "resnet18..resnet152 (a torchvision weight file), an ADM classifier preset (e.g. "
    "128x128_classifier: noise-aware, sees x_t and t), clip:FOLDER (a transformers CLIP folder "
    "as a zero-shot head), reward:CLIP_FOLDER:HEAD_FILE (a scalar reward head on CLIP image "
    "embeddings, e.g. an aesthetic score), or module:function / file.py:function returning an "
    "nn.Module that "
    "takes images in [-1, 1]"
)
"""The ``--classifier`` forms every command accepts (all go through ``load_classifier``)."""

POSITIVE_INT = Range(int, 1)
NONNEGATIVE_INT = Range(int, 0)


def add_hidden_alias(parser: Any, flag: str, dest: str, **kwargs: Any) -> None:
    """An older spelling ``flag`` of the option stored in ``dest``: accepted, not listed."""
    parser.add_argument(
        flag, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs
    )


def softplus_beta_arg(text: str) -> float:
    """``argparse`` type of ``--softplus-beta``: a finite number >= 0, or ``relu`` (= 0)."""
    try:
        return defaults.parse_softplus_beta(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a finite number >= 0 or 'relu', got {text!r}"
        ) from None
