"""``deeplab <subcommand> ...``: one module per subcommand, each with ``main(argv=None)``."""

from __future__ import annotations

import importlib
import sys
from typing import Dict, List, Optional, Tuple

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: Dict[str, Tuple[str, str]] = {
    "info": ("deeplab.cli.info", "parameters and Mult-Adds of every model variant"),
    "weights": ("deeplab.cli.weights", "fetch / list pretrained backbone weights"),
    "train": ("deeplab.cli.train", "train a model (the paper's recipe; DDP under torchrun)"),
    "eval": ("deeplab.cli.eval", "evaluate a checkpoint: mIoU, per-class IoU, multi-scale + flip"),
    "predict": ("deeplab.cli.predict", "segment images with a checkpoint or an exported model"),
    "export": ("deeplab.cli.export", "export a checkpoint to ONNX or TorchScript"),
    "push": ("deeplab.cli.push", "upload a model to the Hugging Face Hub with its model card"),
    "bench": ("deeplab.cli.bench", "latency / throughput benchmarks"),
    "demo": ("deeplab.cli.demo", "fine-tune on real VOC photos on the CPU, evaluate, write overlays"),
    "convert": ("deeplab.cli.convert", "convert the paper's TensorFlow checkpoints"),
    "compare": ("deeplab.cli.compare", "compare evaluation reports: metrics, trimap, per-class IoU deltas"),
    "serve": ("deeplab.cli.serve", "web page + HTTP API for a model (pip install 'deeplab[serve]')"),
    "data": ("deeplab.cli.data", "check a dataset's masks: class histogram, pitfalls, class weights"),
    "plot": ("deeplab.cli.plot", "draw curves.png of one or more run directories"),
}


def _usage() -> str:
    lines = ["usage: deeplab <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "run `deeplab <subcommand> --help` for its options"]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Dispatch ``deeplab <subcommand> ...``; each subcommand's ``main`` reports its own errors.

    Returns:
        The exit status: 0, 2 for a usage or user error (one ``deeplab <cmd>: error:`` line).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from deeplab._version import __version__

        print(__version__)
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"deeplab: error: unknown subcommand {name!r}; choose from {sorted(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
