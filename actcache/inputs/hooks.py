"""The hook catalogue: every hook a model's bridge offers and its per-token shape, found without the weights;
checks of a requested hook, with the closest valid names."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actcache.errors import ActcacheError
from actcache.inputs import fingerprint, gates, hub

if TYPE_CHECKING:
    from actcache.inputs.model import ResolvedModel


_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook: str) -> int | None:
    """Block index a hook belongs to (None for embedding / final-norm hooks)."""
    m = _LAYER_RE.match(hook)
    return int(m.group(1)) if m else None


_LAYERS_RE = re.compile(r"^blocks\.([^.]*)\.(.+)\Z")
_SLICE_RE = re.compile(r"^(-?\d+)?:(-?\d+)?\Z")


def expand_layers(hooks: Collection[str], model: ResolvedModel) -> tuple[str, ...]:
    """``hooks`` with each layer pattern written out: ``blocks.*.X`` is X of every block, ``blocks.A:B.X`` of blocks
    A to B-1 (a Python slice: ``-4:`` is the last four), in block order; the others as they are, each once."""
    out: list[str] = []
    for hook in hooks:
        m = _LAYERS_RE.match(hook)
        if m is None or m.group(1).isdigit():
            out.append(hook)
            continue
        spec, rest = m.groups()
        n = model.n_layers
        if n is None:
            raise ActcacheError(
                f"hook {hook!r}: the config of {model.spec.name!r} gives no number of layers to expand "
                f"{spec!r} over; list the hooks (blocks.0.{rest},blocks.1.{rest},...)",
                field="hook",
            )
        s = _SLICE_RE.match(spec)
        if spec != "*" and s is None:
            raise ActcacheError(
                f"hook {hook!r}: {spec!r} is not a layer, * (every layer) or a slice such as 2:6 or -4:",
                field="hook",
            )
        lo, hi = (None, None) if s is None else (int(g) if g else None for g in s.groups())
        layers = range(*slice(lo, hi).indices(n))
        wide = any(v is not None and not -n <= v <= n for v in (lo, hi))  # as --heads: no clamping
        if wide or not layers:
            raise ActcacheError(
                f"hook {hook!r}: {spec!r} {'is out of range for' if wide else 'selects none of'} the {n} layers of "
                f"{model.spec.name!r} (0..{n - 1})",
                field="hook",
            )
        out.extend(f"blocks.{i}.{rest}" for i in layers)
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class HookCatalog:
    """The hooks a model's bridge offers, found without its weights (see ``hook_catalog``)."""

    names: tuple[str, ...]
    """Every hook name (TransformerLens names and bridge aliases), sorted."""
    per_token: dict[str, tuple[int, ...]]
    """Hooks that give one vector per token, with that vector's shape (e.g. ``(d_model,)``, ``(n_heads, d_head)``)."""
    other: dict[str, str]
    """Every other hook, with why it cannot be extracted (its shape, or that it did not fire)."""


CATALOG_VERSION = 2
"""Of what a catalogue on disk holds (2: gated hooks probed with their gate open); another is probed again."""
_PROBES = ((2, 5), (2, 7))  # two lengths: an attention pattern [batch, heads, pos, pos] cannot pass for per-token
_CATALOGS: dict[tuple, HookCatalog] = {}


def hook_catalog(model: ResolvedModel) -> HookCatalog:
    """Every hook of ``model`` and the per-token shape of each, from a bridge built without weights.

    Memoised per process and on disk (by model fingerprint and library versions), so a fan-out parent or a
    rerun pays for it once. The bridge is built on the ``meta`` device (no memory, any size); architectures
    whose boot must read weights (TransformerLens splits fused QKV projections, e.g. GPT-2's) are built from
    their config on the CPU instead, with random weights and two blocks (the others' hooks follow when both
    are alike; else the whole model, once).
    """
    from actcache.inputs.model import _HEAVY_LOCK  # the lock of the model's loads: a probe loads its config

    with _HEAVY_LOCK:
        if model.pin in _CATALOGS:
            return _CATALOGS[model.pin]
    path = _catalog_path(model)
    try:
        data = json.loads(path.read_text())
        catalog = HookCatalog(
            tuple(data["names"]), {k: tuple(v) for k, v in data["per_token"].items()}, dict(data["other"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        catalog = _probe_catalog(model)
        memo = {"names": catalog.names, "per_token": catalog.per_token, "other": catalog.other}
        fingerprint.write_quietly(path, json.dumps(memo))  # the memo is an optimisation only
    with _HEAVY_LOCK:
        return _CATALOGS.setdefault(model.pin, catalog)


def _catalog_path(model: ResolvedModel) -> Any:
    from importlib import metadata

    versions = [metadata.version(p) for p in ("transformer-lens", "transformers")]
    key = json.dumps([model.fingerprint, model.spec.trust_remote_code, versions, CATALOG_VERSION])
    return fingerprint.cache_dir() / "hooks" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def _probe_catalog(model: ResolvedModel) -> HookCatalog:
    import torch

    try:
        with torch.device("meta"):
            return _probe(_skeleton(model), "meta")
    except ActcacheError:
        raise
    except Exception:
        pass  # TransformerLens had to read a weight, or an op has no meta kernel: build it for real instead
    try:
        # Real (random) weights cost memory: two blocks tell every block's hooks when the blocks are alike.
        field = getattr(type(model.config), "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
        n = model.n_layers
        if n and n > 2 and getattr(model.config, "text_config", None) is None and hasattr(model.config, field):
            grown = _grow(_probe(_skeleton(model, {field: 2}).eval(), "cpu"), n)
            if grown is not None:
                return grown
        return _probe(_skeleton(model).eval(), "cpu")
    except ActcacheError:
        raise
    except Exception as e:
        raise ActcacheError(f"cannot build model {model.spec.name!r} with TransformerLens ({hub.first_line(e)})") from e


def _grow(two: HookCatalog, n_layers: int) -> HookCatalog | None:
    """The catalogue of ``n_layers`` alike blocks from one of two blocks; None when blocks 0 and 1 differ."""

    def block(name: str) -> tuple[int | None, str]:
        m = _LAYER_RE.match(name)
        return (int(m.group(1)), name[m.end() :]) if m else (None, name)

    views = []
    for i in (0, 1):
        views.append(
            {
                rest: (two.per_token.get(n), two.other.get(n))
                for n in two.names
                for layer, rest in [block(n)]
                if layer == i
            }
        )
    if views[0] != views[1]:
        return None
    names, per_token, other = [], {}, {}
    for n in two.names:
        layer, rest = block(n)
        if layer == 1:
            continue
        for full in [n] if layer is None else [f"blocks.{i}.{rest}" for i in range(n_layers)]:
            names.append(full)
            if n in two.per_token:
                per_token[full] = two.per_token[n]
            else:
                other[full] = two.other[n]
    return HookCatalog(tuple(sorted(names)), per_token, other)


def _skeleton(model: ResolvedModel, overrides: dict[str, Any] | None = None) -> Any:
    import warnings

    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TransformerBridge.boot_transformers(
            model.files,
            load_weights=False,
            trust_remote_code=model.spec.trust_remote_code,
            tokenizer=model.tokenizer,
            hf_config_overrides=overrides,
        )


def _probe(bridge: Any, device: str) -> HookCatalog:
    """Run ``bridge`` on dummy tokens of two lengths with every hook attached, and record what each gives; hooks
    that stay silent are probed again with their gate open (``inputs.gates``), as extraction opens it."""
    points = dict(bridge.hook_dict)  # names and aliases -> hook points (an alias shares its point)
    seen = _fired(bridge, device)
    canonical = gates.canonical_of(bridge)
    silent = {n for n, point in points.items() if any(id(point) not in got for got in seen)}
    opened: dict[str, list[dict[int, tuple[int, ...]]]] = {}
    closed: set[str] = set()
    for flag in sorted({f for n in silent if (f := gates.gate(canonical(n))) is not None}):
        try:
            with gates.opened(bridge, [flag]):
                opened[flag] = _fired(bridge, device)
        except Exception:  # TransformerLens refuses the flag for this architecture (NotImplementedError)
            closed.add(flag)
    per_token, other = {}, {}
    for n, point in sorted(points.items()):
        gate = gates.gate(canonical(n))
        runs = seen
        if n in silent and gate in opened:
            runs = opened[gate]
        shapes: list[Any] = [got.get(id(point)) for got in runs]  # None where the hook did not fire
        if any(s is None for s in shapes):
            other[n] = _silent(n, gate, gate in closed)
        elif all(s[:2] == probe for s, probe in zip(shapes, _PROBES, strict=True)) and shapes[0][2:] == shapes[1][2:]:
            per_token[n] = shapes[0][2:]
        else:
            other[n] = (
                f"gives shape {list(shapes[0])} for [batch={_PROBES[0][0]}, pos={_PROBES[0][1]}], "
                "not one vector per token [batch, pos, ...]"
            )
    return HookCatalog(tuple(sorted(points)), per_token, other)


def _fired(bridge: Any, device: str) -> list[dict[int, tuple[int, ...]]]:
    """Per probe shape, the shape each hook point (by id) gave."""
    import warnings

    import torch

    seen: list[dict[int, tuple[int, ...]]] = []
    for b, t in _PROBES:
        got: dict[int, tuple[int, ...]] = {}

        def record(act: Any, hook: Any, into: dict = got) -> None:
            if isinstance(act, torch.Tensor):
                into.setdefault(id(hook), tuple(act.shape))

        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # gated hooks a sweep skips, with a warning: probed with their gate open
            bridge.run_with_hooks(
                torch.zeros((b, t), dtype=torch.long, device=device),
                return_type=None,
                fwd_hooks=[(lambda _name: True, record)],
            )
        seen.append(got)
    return seen


def _silent(name: str, flag: str | None, refused: bool) -> str:
    """Why hook ``name`` gave nothing in the probes."""
    if gates.COPIES.match(name):  # no layer in the text: blocks alike give alike entries (``_grow``)
        return "is off in TransformerLens 4 unless switched on: the block's hook_resid_pre copied once per head"
    if flag is not None and refused:
        return f"needs TransformerLens's {flag}, which it does not support for this model's attention"
    if flag is not None:
        return f"does not fire in a forward pass of this model, even with TransformerLens's {flag} on"
    return "does not fire in a plain forward pass"


def _advice(hook: str) -> str:
    """What to extract instead of a hook that cannot be."""
    copy = gates.COPIES.match(hook)
    if copy:
        return f"extract blocks.{copy.group(1)}.hook_resid_pre instead"
    return "pick a per-token hook such as hook_resid_post"


def check_hook_layer(hook: str, model: ResolvedModel, names: Collection[str] = ()) -> None:
    """A hook's block must exist; the message lists the closest valid names (at the last block)."""
    layer, n = hook_layer(hook), model.n_layers
    if layer is not None and n is not None and layer >= n:
        moved = f"blocks.{n - 1}." + hook.split(".", 2)[2] if hook.count(".") >= 2 else hook
        close = _close(moved, names) if names else [moved]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ActcacheError(
            f"layer {layer} in hook {hook!r} is out of range: {model.spec.name!r} has {n} layers (0..{n - 1}){hint}",
            field="hook",
        )


def check_hook(hook: str, model: ResolvedModel, catalog: HookCatalog) -> tuple[int, ...]:
    """The per-token shape of ``hook``, or a one-line error naming the closest valid hooks."""
    check_hook_layer(hook, model, catalog.per_token)
    if hook in catalog.per_token:
        return catalog.per_token[hook]
    if hook in catalog.other:
        raise ActcacheError(f"hook {hook!r} {catalog.other[hook]}; {_advice(hook)}", field="hook")
    check_hook_name(hook, list(catalog.per_token))
    raise AssertionError("unreachable")


def _close(hook: str, names: Collection[str]) -> list[str]:
    return difflib.get_close_matches(hook, names, n=5, cutoff=0.6) or difflib.get_close_matches(
        hook, names, n=3, cutoff=0.3
    )


def check_hook_name(hook: str, names: list[str]) -> None:
    if hook in names:
        return
    close = _close(hook, names)
    hint = f"did you mean {', '.join(close)}?" if close else "run `actcache hooks MODEL` to list them"
    raise ActcacheError(f"unknown hook {hook!r}; {hint}", field="hook")
