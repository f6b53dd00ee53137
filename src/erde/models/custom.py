"""Users' own networks as erde backbones: ready-made modules, or a factory named by import path.

A network becomes an early-exit network when it is given as an ordered list of
stages: a stem, blocks (an exit may follow any of them) and a classifier (the
last exit). :func:`staged_backbone` wraps such parts; :func:`build_custom_backbone`
builds them from a factory named in a config as ``package.module:factory``.

Checkpoints record that import path and are rebuilt from it. Importing a
module runs its top-level code, so a checkpoint (a file anyone can hand over)
never decides on its own what is imported: a module named by a checkpoint is
imported only when the user trusts it, by naming it themselves (the ``arch`` of
the config they train with, ``--trust-module``, ``trust_modules=``; see
:func:`trusted_modules`). On top of that, standard-library modules are refused
and only callables marked with :func:`backbone_factory` are called. The module
itself must already be importable (installed, or on ``PYTHONPATH``); erde adds
nothing to ``sys.path``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

from erde.models.backbone import Backbone, ModelConfigError

F = TypeVar("F", bound=Callable[..., Any])

FACTORY_MARK = "__erde_backbone_factory__"
_IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# Optional factory arguments and the value that means "not asked for".
_OPTIONAL = {"width": 1.0, "dropout": 0.0, "in_channels": 3}
RETURN_HINT = (
    "return an nn.Module with stem, blocks and classifier attributes (blocks: an ordered "
    "list of modules, e.g. nn.ModuleList) or a (stem, blocks, classifier) tuple"
)


# Modules the user trusts in this call (and its submodules): checkpoints may name only these.
_TRUSTED: ContextVar[frozenset[str]] = ContextVar("erde_trusted_modules", default=frozenset())


@contextlib.contextmanager
def trusted_modules(names: Iterable[str]) -> Iterator[frozenset[str]]:
    """Within the block, checkpoints may name factories in the modules ``names`` (and below).

    A name covers its submodules: ``mypackage`` trusts ``mypackage.models``.
    Nested blocks add to the names trusted outside them.
    """
    if isinstance(names, str):
        raise TypeError("trusted_modules takes a list of module names, not one string")
    added = _TRUSTED.get() | {str(n) for n in names if n}
    token = _TRUSTED.set(added)
    try:
        yield added
    finally:
        _TRUSTED.reset(token)


def module_of(arch: str) -> str | None:
    """The module an import-path ``arch`` names (``a.b`` of ``a.b:f``); None for registry names."""
    return arch.partition(":")[0] if is_import_path(arch) else None


def config_modules(cfg: Any) -> list[str]:
    """Modules the ``arch`` of a config's teacher and student name: the user's own choice."""
    archs = [getattr(getattr(cfg, role, None), "arch", None) for role in ("teacher", "student")]
    return [m for a in archs if isinstance(a, str) and (m := module_of(a))]


def is_trusted(module_name: str, extra: Iterable[str] = ()) -> bool:
    """Whether ``module_name`` is, or lies below, a module the user trusts."""
    for name in _TRUSTED.get().union(extra):
        if module_name == name or module_name.startswith(name + "."):
            return True
    return False


def check_trusted(arch: str, where: str, extra: Iterable[str] = ()) -> None:
    """Refuse, before any import, an ``arch`` from a file whose module the user did not trust."""
    module_name = module_of(arch)
    if module_name is None or is_trusted(module_name, extra):
        return
    shown = module_name if len(module_name) <= 100 else module_name[:100] + "..."
    raise ModelConfigError(
        f"{where} names the module {shown!r} to build its network; erde imports a module named "
        f"by a checkpoint only when you trust it (importing runs its code): pass --trust-module "
        f"{shown} (Python: trust_modules=[{shown!r}]) if it is your own code"
    )


def backbone_factory(fn: F) -> F:
    """Mark ``fn`` (a function or class) as a backbone factory erde may call by import path.

    ``fn(num_classes, **options)`` must return a backbone (see :data:`RETURN_HINT`);
    options it may accept: ``width``, ``dropout``, ``in_channels``.
    """
    setattr(fn, FACTORY_MARK, True)
    return fn


def is_import_path(arch: str) -> bool:
    """``package.module:factory`` names a user factory; registry names have no colon."""
    return ":" in arch


def import_factory(arch: str) -> Callable[..., Any]:
    """The marked factory ``arch`` names, importing its module; one clear error otherwise."""
    if not _IMPORT_PATH.fullmatch(arch):
        raise ModelConfigError(f"arch {arch!r} is not an import path; write package.module:factory")
    module_name, _, attribute = arch.partition(":")
    if module_name.split(".")[0] in sys.stdlib_module_names:
        raise ModelConfigError(
            f"arch {arch!r} names a standard-library module; it must name your own model factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ModelConfigError(
            f"arch {arch!r}: cannot import {module_name!r} ({exc}); install it or put its "
            "folder on PYTHONPATH"
        ) from None
    except Exception as exc:  # the user's module raised while importing
        raise ModelConfigError(
            f"arch {arch!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    factory: Any = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelConfigError(f"arch {arch!r}: module {module_name!r} has no {attribute!r}")
    if not callable(factory) or getattr(factory, "__dict__", {}).get(FACTORY_MARK) is not True:
        raise ModelConfigError(
            f"arch {arch!r} is not marked as a backbone factory; decorate it with "
            "@erde.models.backbone_factory (erde calls only factories marked so, because "
            "checkpoints name them)"
        )
    return factory


def _factory_options(factory: Callable[..., Any], arch: str, options: dict[str, Any]) -> dict:
    """The options the factory's signature takes; an option it lacks must be at its default."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return options
    taken = {}
    for name, value in options.items():
        if name in params:
            taken[name] = value
        elif value != _OPTIONAL.get(name, object()):
            raise ModelConfigError(
                f"arch {arch!r}: the factory takes no {name!r} argument, but {name}={value!r} "
                "was asked for"
            )
    return taken


def build_custom_backbone(
    arch: str,
    num_classes: int,
    *,
    input_shape: Sequence[int] | None = None,
    **options: Any,
) -> Backbone:
    """Import and call the factory ``arch`` names, then wrap and check what it returned.

    ``input_shape`` (C, H, W) is the probe input used to check that the parts
    chain and to read each block's channel count (default: ``in_channels`` x 32 x 32).
    """
    factory = import_factory(arch)
    in_channels = int(options.get("in_channels", 3))
    kwargs = _factory_options(factory, arch, options)
    try:
        built = factory(num_classes, **kwargs)
    except Exception as exc:  # the user's code: say whose it is
        raise ModelConfigError(
            f"arch {arch!r}: the factory raised {type(exc).__name__}: {exc}"
        ) from exc
    stem, blocks, classifier = _parts(built, arch)
    backbone = staged_backbone(
        stem, blocks, classifier, input_shape=input_shape or (in_channels, 32, 32),
        num_classes=num_classes, arch=arch, width=float(options.get("width", 1.0)),
    )  # fmt: skip
    return backbone


def _parts(built: Any, where: str) -> tuple[Any, Any, Any]:
    """(stem, blocks, classifier) of what a factory returned, or one clear error."""
    if isinstance(built, (tuple, list)) and len(built) == 3:
        return built[0], built[1], built[2]
    if isinstance(built, nn.Module) and all(
        hasattr(built, a) for a in ("stem", "blocks", "classifier")
    ):
        return built.stem, built.blocks, built.classifier
    raise ModelConfigError(
        f"arch {where!r}: the factory returned {type(built).__name__}, not a backbone; "
        f"{RETURN_HINT}"
    )


def staged_backbone(
    stem: nn.Module,
    blocks: Sequence[nn.Module] | nn.Module,
    classifier: nn.Module,
    *,
    input_shape: Sequence[int] = (3, 32, 32),
    num_classes: int | None = None,
    arch: str = "custom",
    width: float = 1.0,
) -> Backbone:
    """Wrap ``stem -> blocks -> classifier`` as a :class:`Backbone` (the modules are not copied).

    One probe image of ``input_shape`` (C, H, W) is run through the parts, in
    eval mode without gradients, to check that they chain, that every block
    yields a (1, C_b, H_b, W_b) feature map (exit heads pool it) and that the
    classifier yields (1, K), and to read the channel counts C_b.
    """
    where = f"arch {arch!r}"
    if not isinstance(stem, nn.Module) or not isinstance(classifier, nn.Module):
        raise ModelConfigError(f"{where}: stem and classifier must be nn.Modules; {RETURN_HINT}")
    if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ModelConfigError(
            f"{where}: blocks is one {type(blocks).__name__}, not a sequence; {RETURN_HINT}"
        )
    items = list(blocks) if isinstance(blocks, (Sequence, nn.ModuleList, nn.Sequential)) else None
    if not items or not all(isinstance(b, nn.Module) for b in items):
        raise ModelConfigError(
            f"{where}: blocks must be a non-empty sequence of nn.Modules, got "
            f"{type(blocks).__name__}; {RETURN_HINT}"
        )
    channels, outputs = _probe(stem, items, classifier, tuple(input_shape), where)
    if num_classes is not None and outputs != num_classes:
        raise ModelConfigError(
            f"{where}: the classifier gives {outputs} outputs, the data set has {num_classes} classes"
        )
    return StagedBackbone(stem, items, classifier, channels, outputs, arch, width)


def _probe(
    stem: nn.Module, blocks: list[nn.Module], classifier: nn.Module, shape: tuple, where: str
) -> tuple[list[int], int]:
    """Channel count after each block and the number of classes, from one probe image."""
    modules = [stem, *blocks, classifier]
    modes = [(m, m.training) for part in modules for m in part.modules()]
    tensors = [t for part in modules for t in (*part.parameters(), *part.buffers())]
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    device = tensors[0].device if tensors else torch.device("cpu")
    channels: list[int] = []
    step = "the stem"
    try:
        for part in modules:
            part.eval()
        with torch.no_grad():
            h = stem(torch.zeros(1, *shape, dtype=dtype, device=device))
            for i, block in enumerate(blocks):
                step = f"block {i}"
                h = block(h)
                if not isinstance(h, torch.Tensor) or h.dim() != 4:
                    got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
                    raise ModelConfigError(
                        f"{where}: block {i} returned {got}, exits need (B, C, H, W) feature maps"
                    )
                channels.append(int(h.shape[1]))
            step = "the classifier"
            logits = classifier(h)
    except ModelConfigError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelConfigError(
            f"{where}: {step} failed on a {(1, *shape)} input: {type(exc).__name__}: {first}"
        ) from exc
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 1:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelConfigError(f"{where}: the classifier returned {got}, expected (B, K) logits")
    return channels, int(logits.shape[1])


class StagedBackbone(Backbone):
    """A user's stem, blocks and classifier, held as a :class:`Backbone`."""

    def __init__(
        self,
        stem: nn.Module,
        blocks: list[nn.Module],
        classifier: nn.Module,
        block_channels: list[int],
        num_classes: int,
        arch: str,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        self.stem, self.blocks, self.classifier = stem, nn.ModuleList(blocks), classifier
        self.block_channels, self.num_classes = list(block_channels), int(num_classes)
        self.arch, self.width = arch, float(width)
