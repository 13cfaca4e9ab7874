"""Starting weights: load a user's state dict, or pre-train one on the embedded data.

DSparse is a fine-tuning method: a device that trains only its last units relies on the
frozen units before them already computing useful features. With a pre-trained model
(ImageNet weights, say) that holds; from random weights it does not, and a short run
barely moves (the frozen random features carry little signal). Nothing can be downloaded
here, so :func:`pretrain` makes a stand-in: every unit trained centrally on the examples
of the first classes only, so that the federated run still has something to learn
(the other classes).

``dsparse pretrain --model mobilenet_v2 --out PATH`` writes one; the app's
``initial-weights`` run-config key (and ``experiments.compare --weights``) start from it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import pickle
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import DATASETS, Split, batch_iterator, load_dataset
from .models import MODELS, build_model
from .trainer import SparseTrainer, make_optimizer_factory
from .units import model_units

__all__ = ["PretrainInfo", "load_weights", "loss_reporter", "pretrain", "add_cli"]


def load_weights(path: str | Path, model_name: str, *, key: str = "initial-weights") -> dict[str, torch.Tensor]:
    """A state dict from ``path``, checked against ``model_name``'s tensors (names, shapes).

    Accepts ``model.state_dict()`` saved with ``torch.save``, or a dict holding it under
    ``"state_dict"``. Loaded with ``weights_only=True``: a file is data, never code.
    ``key`` names the setting in error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key} {str(path)!r} is not a file; write one with `dsparse pretrain --model {model_name} --out {path}` "
            f"or give the path of a saved {model_name} state_dict()"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{key} {str(path)!r}: cannot read a torch state dict ({error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{key} {str(path)!r} holds a {type(state).__name__}, not a state dict")
    expected = build_model(model_name, seed=0).state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(
            f"{key} {str(path)!r} does not fit model {model_name!r}: {len(missing)} tensors missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}); save model.state_dict() "
            f"of a {model_name} with 10 classes"
        )
    for name, tensor in expected.items():
        if not isinstance(state[name], torch.Tensor) or tuple(state[name].shape) != tuple(tensor.shape):
            shape = tuple(state[name].shape) if isinstance(state[name], torch.Tensor) else type(state[name]).__name__
            raise ValueError(
                f"{key} {str(path)!r}: {name} has shape {shape}, model {model_name!r} expects {tuple(tensor.shape)}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(state[name]).all()):
            raise ValueError(f"{key} {str(path)!r}: {name} holds NaN or Inf; it cannot be a starting point")
    return {name: state[name].to(tensor.dtype) for name, tensor in expected.items()}


@dataclass(frozen=True)
class PretrainInfo:
    """What :func:`pretrain` did (written beside the weights as JSON)."""

    model: str
    steps: int
    batch_size: int
    lr: float
    momentum: float
    classes: list[int]
    examples: int
    seed: int
    final_loss: float
    losses: list[float] = field(default_factory=list)


def pretrain(
    model_name: str,
    train: Split,
    *,
    steps: int = 160,
    batch_size: int = 64,
    lr: float = 0.01,
    momentum: float = 0.9,
    classes: int = 6,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, torch.Tensor], PretrainInfo]:
    """Train every unit of ``model_name`` centrally on the examples of classes ``0 .. classes-1``.

    The defaults (160 steps of batch 64, SGD lr 0.01, momentum 0.9) take MobileNetV2 on
    the embedded data to about 0.48 held-out accuracy over all 10 classes; lr 0.05
    diverges for MobileNetV2 from scratch at batch 64. ``on_step(step, loss)`` is called
    after every step (progress).
    """
    if steps <= 0 or batch_size <= 0 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be > 0, got {steps}, {batch_size}, {lr}")
    if not 0 < classes <= 10:
        raise ValueError(f"classes must be in 1..10, got {classes}")
    model = build_model(model_name, seed=seed)
    indices = (train.y < classes).nonzero().squeeze(1).numpy()
    if len(indices) == 0:
        raise ValueError(f"no training examples of classes 0..{classes - 1}")
    batches = batch_iterator(train, indices, batch_size, seed=seed + 99)
    trainer = SparseTrainer(
        model,
        [unit.name for unit in model_units(model)],
        optimizer_factory=make_optimizer_factory("sgd", lr=lr, momentum=momentum),
    )
    losses: list[float] = []
    try:
        for step in range(1, steps + 1):
            losses.append(trainer.step(*next(batches)).loss)
            if on_step is not None:
                on_step(step, losses[-1])
    finally:
        trainer.close()
    info = PretrainInfo(
        model_name, steps, batch_size, lr, momentum, list(range(classes)), int(len(indices)), seed, losses[-1], losses
    )
    return model.state_dict(), info


def loss_reporter(steps: int, say: Callable[[str], None]) -> Callable[[int, float], None]:
    """An ``on_step`` for :func:`pretrain` that passes ``say`` a line at every fifth of ``steps``.

    Parameters
    ----------
    steps : int
        The steps :func:`pretrain` will take (the lines say ``step k/steps``).
    say : callable
        Receives each line, without indentation or newline (the caller's own progress output).

    Returns
    -------
    callable
        ``on_step(step, loss)``.
    """
    every = max(1, steps // 5)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            say(f"pre-training step {step}/{steps}, loss {loss:.3f}")

    return on_step


# --------------------------------------------------------------------------- CLI

#: :func:`pretrain`'s keywords that ``dsparse pretrain`` takes as options of the same name
#: (``--batch-size`` is ``batch_size``), with :func:`pretrain`'s defaults.
_CLI_SETTINGS = ("steps", "batch_size", "lr", "momentum", "classes", "seed")


def _say(line: str) -> None:
    print(f"  … {line}", file=sys.stderr, flush=True)


def _cmd_pretrain(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    train, _ = load_dataset(
        args.dataset, root=args.data_root or None, num_train=args.train_examples or None, seed=args.seed
    )
    settings = {name: getattr(args, name) for name in _CLI_SETTINGS}
    state, info = pretrain(args.model, train, **settings, on_step=loss_reporter(args.steps, _say))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp")
    torch.save(state, temp)
    temp.replace(out)  # never a half-written file at ``out``
    out.with_suffix(".json").write_text(
        json.dumps({**asdict(info), "dataset": args.dataset, "data_root": args.data_root}, indent=2)
    )
    print(
        f"pre-trained {args.model} on classes 0..{args.classes - 1} of {args.dataset} ({info.steps} steps, "
        f"final loss {info.final_loss:.3f}): {out}"
    )
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``dsparse pretrain``."""
    parser = subparsers.add_parser(
        "pretrain",
        help="pre-train starting weights on the first classes of the data (a stand-in for downloaded weights)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenet_v2")
    parser.add_argument("--out", required=True, help="where to write the state dict (.pt; a .json beside it says how)")
    parser.add_argument(
        "--dataset",
        default="synthetic",
        choices=DATASETS,
        help="synthetic (embedded), fashion-mnist (Debian's package or --data-root), "
        "cifar10 (with --data-root); pre-trains on its first --classes classes",
    )
    parser.add_argument("--data-root", default="", help="folder of the dataset's files (see the run-config key)")
    parser.add_argument("--train-examples", type=int, default=0, help="0 = the dataset's default size")
    default = {name: inspect.signature(pretrain).parameters[name].default for name in _CLI_SETTINGS}
    parser.add_argument("--steps", type=int, default=default["steps"])
    parser.add_argument("--batch-size", type=int, default=default["batch_size"])
    parser.add_argument("--lr", type=float, default=default["lr"])
    parser.add_argument("--momentum", type=float, default=default["momentum"])
    parser.add_argument(
        "--classes",
        type=int,
        default=default["classes"],
        help="pre-train on classes 0..N-1; the federated run learns all 10",
    )
    parser.add_argument("--seed", type=int, default=default["seed"])
    parser.set_defaults(func=_cmd_pretrain)
    return parser
