"""Per-layer budget calibration: which layers a model can store at a cheaper cold layout.

Layers differ in how much their cold-storage error costs the model's output (SmolLM2-135M: one
layer of 30 at 3-bit keys / 2-bit values costs as much next-token KL as the other 29 together;
`results/TUNING_NOTES.md`, "Per-layer budgets"), so a mix of two layouts beats one global layout
at the same bytes. The indices are the model's own, so the mix is found per model, once, on
tuning text (never the text the quality is reported on):

1. cost: every group of ``group`` consecutive layers is put alone at the cheap layout ``lo``
   under an all-``hi`` base; its cost is the rise of the next-token KL vs the exact cache over
   teacher-forced continuation tokens (the eval harness's `run_segment` and `attention_kl`),
   averaged over segments (``cost="top1"``: the drop of top-1 agreement instead, the ranking
   behind the validated SmolLM2 mix). The groups' KL costs add up roughly (TUNING_NOTES: sum
   +0.0171 vs +0.0185 measured with every layer at ``lo``), which is what makes step 2 sound.
   Every run starts from the exact prefill's K/V (`run_segment`'s ``seed``: the prefill attends
   exactly, so only the continuation differs), one prefill per segment instead of one per run;
2. selection: greedy by cost per byte saved, cheapest first, until the cold-storage ratio
   reaches ``target_ratio`` (so it overshoots by at most one group); ties go to the lower layer;
3. the result: a `SpectralConfig` with `layer_overrides` (the layout most layers use is the
   base), the per-group costs, the predicted ratio and the chosen layers.

Bytes come from the layouts themselves (`spectral_kv.memory.cold_bytes_per_token`: a filled
`TierManager`'s cold bytes), so a layout's scales, statistics and shared state all count.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import OVERRIDABLE_FIELDS, SpectralConfig
from .eval.methods import make_method, model_kv_shape, parse_spec
from .eval.methods.spectral import SpectralMethod
from .eval.perplexity import run_segment
from .eval.quality import segment_slices
from .layer_overrides import describe_layers
from .memory import cold_bytes_per_token
from .metrics import attention_kl, top1_agreement

__all__ = ["CalibrationResult", "calibrate_layers", "select_layers", "resolve_layout", "layout_changes"]


def _spec_value(text: str) -> Any:
    """``"256"`` -> 256, ``"none"`` -> None, anything else stays a string (``"byte"``, ``"same"``)."""
    if text.lower() == "none":
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def resolve_layout(layout: "SpectralConfig | str | Mapping", name: str = "layout") -> SpectralConfig:
    """A `SpectralConfig` from ``layout``: a config, a preset name, a spec string
    ``"preset:field=value,..."`` (e.g. ``"balanced:value_stats=byte,quant_group=256"``) or a
    mapping ``{"preset": name, field: value, ...}``. ``name`` labels errors (``hi`` / ``lo``)."""
    if isinstance(layout, SpectralConfig):
        return layout
    if isinstance(layout, str):
        preset, opts = parse_spec(layout)
        fields = {k: _spec_value(v) for k, v in opts.items()}
    elif isinstance(layout, Mapping):
        fields = dict(layout)
        preset = fields.pop("preset", None)
    else:
        raise ValueError(f"{name} must be a SpectralConfig, a preset name or spec, or a mapping, got {layout!r}")
    try:
        return SpectralConfig.resolve(preset, **fields)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}={layout!r}: {exc}") from None


def layout_changes(hi: SpectralConfig, lo: SpectralConfig) -> dict[str, Any]:
    """The fields ``lo`` changes from ``hi``, all among `OVERRIDABLE_FIELDS` (the cold layout);
    a ValueError names a field that cannot differ per layer (``verbose`` is not compared)."""
    for name, c in (("hi", hi), ("lo", lo)):
        if c.layer_overrides is not None:
            raise ValueError(f"{name} has layer_overrides ({c.layer_overrides!r}): give one layout for every layer")
    changes = {}
    for f in dataclasses.fields(SpectralConfig):
        a, b = getattr(hi, f.name), getattr(lo, f.name)
        if f.name == "verbose" or a == b:
            continue
        if f.name not in OVERRIDABLE_FIELDS:
            raise ValueError(f"hi and lo differ in {f.name!r} (hi {a!r}, lo {b!r}), which cannot differ per layer "
                             f"(only {sorted(OVERRIDABLE_FIELDS)} can)")
        changes[f.name] = b
    if not changes:
        raise ValueError("hi and lo are the same layout: nothing to calibrate")
    return changes


def select_layers(costs: list[float], saved: list[float], hi_bytes: float, dense_bytes: float,
                  target_ratio: float) -> list[int]:
    """Greedy choice of the groups to store at ``lo``: cheapest cost per byte saved first (ties:
    the lower index), until ``dense_bytes / (hi_bytes - saved bytes) >= target_ratio``.

    Parameters
    ----------
    costs : list of float
        Each group's cost at ``lo`` (any sign; a negative cost goes first).
    saved : list of float
        Bytes each group saves at ``lo`` (> 0).
    hi_bytes, dense_bytes : float
        Bytes of every layer at ``hi``, and the same tokens' fp16 bytes.
    target_ratio : float

    Returns
    -------
    list of int
        The chosen groups' indices in the order picked (empty when ``hi`` already meets the target).
    """
    if len(costs) != len(saved) or any(s <= 0 for s in saved):
        raise ValueError(f"want one cost per group and every group to save bytes at lo, got {costs}, {saved}")
    need = hi_bytes - dense_bytes / target_ratio
    order = sorted(range(len(costs)), key=lambda i: (costs[i] / saved[i], i))
    chosen, done = [], 0.0
    for i in order:
        if done >= need * (1 - 1e-12):  # relative slack: bytes are sums of floats
            break
        chosen.append(i)
        done += saved[i]
    if done < need * (1 - 1e-12):
        raise ValueError(f"target_ratio {target_ratio} is out of reach: every group at lo gives "
                         f"{dense_bytes / (hi_bytes - done):.4f}")
    return chosen


@dataclass(frozen=True)
class CalibrationResult:
    """What `calibrate_layers` found.

    Attributes
    ----------
    config : SpectralConfig
        The calibrated config (`layer_overrides` set unless every layer got one layout).
    lo_layers : tuple of int
        Layers stored at ``lo``, sorted.
    groups : tuple of tuple of int
        The layer groups measured.
    costs : tuple of float
        Per group, the selection's cost (``cost``) when only it is at ``lo``, mean over segments.
    cost : str
        ``"kl"``: rise of the next-token KL (nats) vs the exact cache; ``"top1"``: drop of top-1 agreement.
    base_kl : float
        Next-token KL of the all-``hi`` cache.
    predicted_ratio, hi_ratio, lo_ratio, target_ratio : float
        Cold-storage ratios (fp16 bytes of the cold tokens / bytes stored) of the result, of
        all-``hi``, of all-``lo``, and the one asked for.
    predicted_cost : float
        Sum of the chosen groups' costs (the KL rise expected if costs add up).
    bytes_per_token : dict
        ``hi``, ``lo``, ``fp16``: cold bytes per cold token of one layer.
    settings : dict
        ``context``, ``continuation``, ``chunk``, ``segments``, ``offsets``, ``group``, ``seconds``
        and the measurements (``per_segment``: ``base`` and ``groups``, each ``kl`` and ``top1`` per segment).
    """

    config: SpectralConfig
    lo_layers: tuple
    groups: tuple
    costs: tuple
    cost: str
    base_kl: float
    predicted_ratio: float
    hi_ratio: float
    lo_ratio: float
    target_ratio: float
    predicted_cost: float
    bytes_per_token: dict
    settings: dict

    def summary(self) -> str:
        """A few lines: the chosen layers, the ratio and the costs."""
        lines = [f"lo at layers {describe_layers(self.lo_layers) or 'none'}: predicted {self.predicted_ratio:.3f}x cold "
                 f"(target {self.target_ratio}, all hi {self.hi_ratio:.3f}x, all lo {self.lo_ratio:.3f}x), "
                 f"all-hi next-token KL {self.base_kl:.5f}, predicted {self.cost} cost {self.predicted_cost:+.5f}"]
        for g, c in zip(self.groups, self.costs):
            lines.append(f"  layers {describe_layers(g):>7s}: {self.cost} cost {c:+.5f}{'  -> lo' if g[0] in self.lo_layers else ''}")
        lines.append(f"config: {self.config.summary()}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; ``config`` as `dataclasses.asdict` (``SpectralConfig(**d["config"])`` loads it)."""
        out = dataclasses.asdict(self)
        out["config"] = dataclasses.asdict(self.config)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CalibrationResult":
        """Inverse of `to_dict` (also after a JSON round trip)."""
        d = dict(d)
        d["config"] = SpectralConfig(**d["config"])
        for key in ("lo_layers", "costs"):
            d[key] = tuple(d[key])
        d["groups"] = tuple(tuple(g) for g in d["groups"])
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "CalibrationResult":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _token_ids(tokenizer, text_or_token_ids) -> torch.Tensor:
    if isinstance(text_or_token_ids, str) and not text_or_token_ids:
        raise ValueError("text_or_token_ids is an empty string")
    ids = text_or_token_ids
    ids = tokenizer(ids, add_special_tokens=False)["input_ids"] if isinstance(ids, str) else ids
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("text_or_token_ids holds no tokens")
    return ids


def _measure(model, config: SpectralConfig, ctx, cont, chunk: int, ref_logits, seed) -> tuple[float, float]:
    """(next-token KL, top-1 agreement) of ``config``'s cache vs the exact logits ``ref_logits``."""
    method = SpectralMethod("calibrate", "spectral", {"_config": config.replace(verbose=False)})
    method.setup(model)
    try:
        run = run_segment(model, method, ctx, cont, chunk, seed=seed)
    finally:
        method.teardown(model)
    return attention_kl(run.logits, ref_logits), top1_agreement(run.logits, ref_logits)


def calibrate_layers(model, tokenizer, text_or_token_ids, *, hi, lo, target_ratio: float = 5.0, group: int = 3,
                     context: int = 3584, continuation: int = 512, chunk: int = 64, segments: int = 3,
                     offsets: list[int] | None = None, cost: str = "top1",
                     log: Callable[[str], None] | None = print) -> CalibrationResult:
    """Measure each layer group's cost at ``lo`` and pick the layers for ``lo`` that reach ``target_ratio``.

    Parameters
    ----------
    model : transformers causal LM (its device and dtype are used as they are)
    tokenizer : callable, ``tokenizer(text, add_special_tokens=False)["input_ids"]``
    text_or_token_ids : str, list of int or Tensor[N] int64
        Tuning text (never the text quality is reported on).
    hi, lo : SpectralConfig, preset name, ``"preset:field=value,..."`` or mapping (`resolve_layout`)
        The better and the cheaper layout; they may differ only in `OVERRIDABLE_FIELDS`.
    target_ratio : float
        Cold-storage ratio to reach, within ``[hi's, lo's]``.
    group : int
        Consecutive layers measured (and moved) together; 3 takes a third of the runs of 1.
    context, continuation, chunk, segments : int
        Per segment: ``context`` tokens prefilled, ``continuation`` teacher-forced ``chunk`` at a time.
    offsets : list of int, optional
        Segment starts in the token ids (default: ``segments`` windows spread evenly).
    cost : {"top1", "kl"}
        A group's cost: top-1 agreement's drop (default: its mix beat KL's on SmolLM2's tuning split) or KL's rise.
    log : callable or None
        Progress lines.

    Returns
    -------
    CalibrationResult
        Costs ``len(groups) + 1`` spectral runs and one exact run per segment.
    """
    t0 = time.perf_counter()
    say = log or (lambda s: None)
    hi, lo = resolve_layout(hi, "hi"), resolve_layout(lo, "lo")
    lo_changes = layout_changes(hi, lo)
    hi_changes = {k: getattr(hi, k) for k in lo_changes}
    for name, value in (("group", group), ("context", context), ("continuation", continuation),
                        ("chunk", chunk), ("segments", segments)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if cost not in ("kl", "top1"):
        raise ValueError(f"cost must be 'kl' or 'top1', got {cost!r}")
    if continuation < 2:
        raise ValueError(f"continuation must be at least 2 tokens (one teacher-forced step), got {continuation}")
    first_cold = hi.sink_tokens + hi.hot_buffer_size + hi.block_size
    if context < first_cold:
        raise ValueError(f"context={context} is too short for one cold block: needs {first_cold} tokens "
                         f"({hi.sink_tokens} sinks + hot {hi.hot_buffer_size} + block {hi.block_size})")
    ids = _token_ids(tokenizer, text_or_token_ids)
    length = context + continuation
    if offsets is None:
        try:
            offsets = segment_slices(ids.numel(), segments, length)
        except ValueError:
            raise ValueError(f"text_or_token_ids has {ids.numel()} tokens, too few for {segments} segments of "
                             f"{context} + {continuation}") from None
    elif len(offsets) != segments or any(o < 0 or o + length > ids.numel() for o in offsets):
        raise ValueError(f"offsets {offsets} are not {segments} windows of {length} tokens inside {ids.numel()}")

    # Bytes (step 2's inputs) before the runs, so a target out of range fails at once.
    from .integrations.transformers.cache import SpectralCache

    n_layers, kv_heads, head_dim = model_kv_shape(model)
    exact_layers = set(SpectralCache(hi.replace(verbose=False), model.config).exact_layer_indices)
    layers = [i for i in range(n_layers) if i not in exact_layers]
    held = length - 1  # tokens a layer holds at a segment's end (the last one is only predicted)
    per_token = {"hi": cold_bytes_per_token(hi, kv_heads, head_dim, held),
                 "lo": cold_bytes_per_token(lo, kv_heads, head_dim, held), "fp16": 2.0 * 2 * kv_heads * head_dim}
    if per_token["lo"] >= per_token["hi"]:
        raise ValueError(f"lo stores {per_token['lo']:.2f} B per token and layer, hi {per_token['hi']:.2f}: lo must be cheaper")
    hi_ratio, lo_ratio = per_token["fp16"] / per_token["hi"], per_token["fp16"] / per_token["lo"]
    if not isinstance(target_ratio, (int, float)) or not hi_ratio <= target_ratio <= lo_ratio:
        raise ValueError(f"target_ratio={target_ratio!r} is outside [{hi_ratio:.4f}, {lo_ratio:.4f}] "
                         "(all layers at hi, all at lo)")
    groups = [tuple(layers[i : i + group]) for i in range(0, len(layers), group)]
    say(f"calibrate: {len(groups)} groups of {group} layers, {segments} segments of {context} + {continuation}; "
        f"hi {hi_ratio:.3f}x, lo {lo_ratio:.3f}x cold")

    # Step 1: costs. The exact reference runs once per segment, then all-hi, then each group at lo.
    exact = make_method("exact")
    base: dict[str, list] = {"kl": [], "top1": []}
    per_group: list[dict[str, list]] = [{"kl": [], "top1": []} for _ in groups]
    for si, off in enumerate(offsets):
        ctx, cont = ids[off : off + context], ids[off + context : off + length]
        kv: list = []
        ref = run_segment(model, exact, ctx, cont, chunk,
                          on_prefill=lambda c: kv.extend(tuple(t.clone() for t in exact.dense_kv(c, i)) for i in range(n_layers)))
        seed = (kv, ref.logits[:1])
        for m, value in zip(("kl", "top1"), _measure(model, hi, ctx, cont, chunk, ref.logits, seed)):
            base[m].append(value)
        say(f"segment {si + 1}/{segments} @ {off}: all hi KL {base['kl'][-1]:.5f} top-1 {base['top1'][-1]:.4f} "
            f"({time.perf_counter() - t0:.0f}s)")
        for g, rec in zip(groups, per_group):
            over = hi.replace(layer_overrides={g: lo_changes})
            for m, value in zip(("kl", "top1"), _measure(model, over, ctx, cont, chunk, ref.logits, seed)):
                rec[m].append(value)
            say(f"  layers {describe_layers(g)} at lo: KL {rec['kl'][-1]:.5f} top-1 {rec['top1'][-1]:.4f} "
                f"({time.perf_counter() - t0:.0f}s)")
    sign = 1 if cost == "kl" else -1  # KL rises, agreement drops
    costs = [sign * sum(a - b for a, b in zip(rec[cost], base[cost])) / segments for rec in per_group]

    # Step 2: selection.
    saved = [len(g) * (per_token["hi"] - per_token["lo"]) for g in groups]
    chosen = select_layers(costs, saved, len(layers) * per_token["hi"], len(layers) * per_token["fp16"], target_ratio)
    lo_layers = tuple(sorted(i for gi in chosen for i in groups[gi]))
    hi_layers = tuple(i for i in layers if i not in lo_layers)

    # Step 3: the config; the layout most layers use is the base (a tie: lo, as the README's mix).
    if not lo_layers:
        config = hi
    elif not hi_layers:
        config = lo
    elif len(lo_layers) >= len(hi_layers):
        config = lo.replace(layer_overrides={hi_layers: hi_changes})
    else:
        config = hi.replace(layer_overrides={lo_layers: lo_changes})
    stored = len(lo_layers) * per_token["lo"] + len(hi_layers) * per_token["hi"]
    settings = {"context": context, "continuation": continuation, "chunk": chunk, "segments": segments,
                "offsets": list(offsets), "group": group, "seconds": time.perf_counter() - t0,
                "per_segment": {"base": base, "groups": per_group}}
    return CalibrationResult(
        config=config, lo_layers=lo_layers, groups=tuple(groups), costs=tuple(costs), cost=cost,
        base_kl=sum(base["kl"]) / segments,
        predicted_ratio=len(layers) * per_token["fp16"] / stored, hi_ratio=hi_ratio, lo_ratio=lo_ratio,
        target_ratio=float(target_ratio), predicted_cost=sum(costs[gi] for gi in chosen), bytes_per_token=per_token,
        settings=settings)
