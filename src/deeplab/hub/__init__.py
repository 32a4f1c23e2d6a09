"""Models on the Hugging Face Hub: ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained``.

>>> deeplab.hub.save_pretrained(model, "my-model", classes=names, dataset="voc")   # doctest: +SKIP
>>> deeplab.hub.push_to_hub("my-model", "org/deeplab-voc")                         # doctest: +SKIP
>>> model = deeplab.from_pretrained("org/deeplab-voc@v1")                          # doctest: +SKIP
>>> seg = deeplab.Segmenter.from_pretrained("hf://org/deeplab-voc")                # doctest: +SKIP

A saved model is a folder of three files, the layout the Hub's libraries share:

- ``config.json``: ``{"format": "deeplab-hub", "version": 1, "model_config": ModelConfig,
  "classes", "palette", "normalization", "dataset", "metrics", "evaluation", "training",
  "source", "weights": {"file", "sha256", "size", "parameters"}}``;
- ``model.safetensors``: the state dict (no pickle: nothing runs when it is opened);
- ``README.md``: the model card (architecture, citation, training data and recipe, the eval
  figures with their setting, how to load it, limitations), with the Hub's YAML header.

Loading downloads ``config.json`` and ``model.safetensors`` through ``huggingface_hub`` into the
Hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``), so a second load makes no transfer; ``@revision``
(a branch, tag or commit) pins what is fetched. ``HF_HUB_OFFLINE=1`` reads the cache only. The
weights are verified against the size and sha256 that ``config.json`` records before they are
read, and loaded strictly into the model rebuilt from the stored config. ``HF_ENDPOINT`` (read at
call time) points everything at another Hub, a mirror or a test server.

Needs the ``[hub]`` extra (``huggingface_hub`` and ``safetensors``).

Modules, in the direction imports flow:

* :mod:`~deeplab.hub.format` - the folder contract: file names, ``hf://`` ids, :class:`HubError`,
  the optional packages, reading and verifying a saved folder. A leaf.
* :mod:`~deeplab.hub.card` - :func:`model_card`, the ``README.md`` from a ``config.json`` dict.
* :mod:`~deeplab.hub.save` - :func:`save_pretrained`, :func:`save_pretrained_from_checkpoint`.
* :mod:`~deeplab.hub.push` - :func:`push_to_hub`.
* :mod:`~deeplab.hub.load` - :func:`load_pretrained`, :func:`load_from_hub`,
  :func:`from_pretrained`, :func:`checkpoint_for`.
"""

from .card import CITATION as CITATION
from .card import TF_REFERENCE as TF_REFERENCE
from .card import TF_ZOO_PAGE as TF_ZOO_PAGE
from .card import model_card
from .format import (
    CARD_NAME,
    CONFIG_NAME,
    HUB_FORMAT,
    HUB_PREFIX,
    WEIGHTS_NAME,
    HubError,
    is_hub_id,
    parse_hub_id,
)
from .format import HUB_VERSION as HUB_VERSION
from .format import INSTALL_HINT as INSTALL_HINT
from .format import PathLike as PathLike
from .load import HubModel, checkpoint_for, from_pretrained, load_from_hub, load_pretrained
from .push import PushResult, push_to_hub
from .save import save_pretrained, save_pretrained_from_checkpoint

# CITATION, TF_REFERENCE, TF_ZOO_PAGE, HUB_VERSION, INSTALL_HINT and PathLike: module names of the
# former hub.py, outside __all__ as they were there.
__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "HUB_FORMAT",
    "HUB_PREFIX",
    "WEIGHTS_NAME",
    "HubError",
    "HubModel",
    "PushResult",
    "checkpoint_for",
    "from_pretrained",
    "is_hub_id",
    "load_from_hub",
    "load_pretrained",
    "model_card",
    "parse_hub_id",
    "push_to_hub",
    "save_pretrained",
    "save_pretrained_from_checkpoint",
]
