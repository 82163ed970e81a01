"""Choosing and applying a quantisation: which modules, which scheme, done once, from outside the model.

    qc = QuantConfig.preset("w8a8")                      # or from the seed's predict YAML:
    qc = QuantConfig.from_mindformers(yaml["model"]["model_config"]["quantization_config"])
    report = quantize_model(model, qc)                   # replaces nn.Linear / Experts in place

Module selection follows MindFormers' `quantization_config`: `modules_to_not_convert` (names of
modules, matched against any component of the dotted module name) and `layer_policies` (regex ->
overrides for the modules whose name matches; MindFormers names are translated through
`hf_map.MINDFORMERS_MODULES`, e.g. `.*\\.feed_forward\\..*` -> `.*\\.mlp\\..*`, `w2` -> `down_proj`).
Only modules with a `weight` [out, in] and no bias are candidates: `nn.Linear` and the routed
experts. The embedding, norms, the router (gate + bias) and the DSA indexer's per-head weights
(`indexer.weights_proj`, which transformers keeps in fp32: it scales every index score) are never
quantised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dsv3.checkpoint import hf_map
from dsv3.errors import UserError
from dsv3.model.moe import Experts
from dsv3.quant.modules import PROJ, QuantExperts, QuantLinear
from dsv3.quant.native import use_dense_kernels
from dsv3.quant.schemes import SCHEMES, make_scheme

DEFAULT_NOT_CONVERT = {
    # the seed's W8A8 YAML: lm_head and lkv2kv (kv_b_proj) stay dense; its feed_forward policy converts w2
    "w8a8": ("lm_head", "kv_b_proj"),
    # weight-only: the head is the largest matrix read per token, so it is quantised; kv_b_proj stays
    # dense (the absorbed-MLA decode precomputes W_UK / W_UV from it anyway)
    "int8": ("kv_b_proj",),
    "int4": ("kv_b_proj",),
    # DeepSeek's FP8 checkpoints: every attention / MLP / expert linear, not the head nor MTP's eh_proj
    "fp8": ("lm_head", "eh_proj"),
}


@dataclass(frozen=True)
class LayerPolicy:
    pattern: str  # regex over our dotted module names
    method: str | None  # None: leave matching modules unquantised
    modules_to_not_convert: tuple[str, ...] = ()


@dataclass(frozen=True)
class QuantConfig:
    method: str
    modules_to_not_convert: tuple[str, ...] = ()
    layer_policies: tuple[LayerPolicy, ...] = ()
    group_size: int = 32  # int4
    notes: tuple[str, ...] = field(default=(), compare=False)  # what of the source config was not applied

    def __post_init__(self):
        if self.method not in SCHEMES:
            raise UserError(f"quantization {self.method!r}: expected one of {', '.join(SCHEMES)} or none")

    @classmethod
    def preset(cls, method: str, group_size: int = 32) -> "QuantConfig":
        if method not in SCHEMES:
            raise UserError(f"quantization {method!r}: expected one of {', '.join(SCHEMES)} or none")
        return cls(method, DEFAULT_NOT_CONVERT[method], group_size=group_size)

    def method_for(self, module_name: str, leaf: str | None = None) -> str | None:
        """The scheme for module `module_name` (its projection `leaf` for experts), or None to keep it dense."""
        method, skip = self.method, self.modules_to_not_convert
        for pol in self.layer_policies:
            if re.fullmatch(pol.pattern, module_name):
                method, skip = pol.method, pol.modules_to_not_convert
                break
        parts = module_name.split(".") + ([leaf] if leaf else [])
        if method is None or any(s in parts for s in skip):
            return None
        return method

    def describe(self) -> str:
        pol = "".join(f"; policy {p.pattern}: {p.method or 'none'}, keep {list(p.modules_to_not_convert)}" for p in self.layer_policies)
        return f"{self.method} (keep dense: {list(self.modules_to_not_convert)}{pol})"

    # ---- the seed's predict YAML
    @classmethod
    def from_mindformers(cls, qc: dict, where: str = "quantization_config") -> "QuantConfig":
        """MindFormers `model.model_config.quantization_config` -> QuantConfig (unsupported values raise)."""
        if not isinstance(qc, dict):
            raise UserError(f"{where}: expected a mapping, got {type(qc).__name__}")
        notes: list[str] = []
        method, skip = _mf_method(qc, where, notes)
        policies = []
        for pattern, pol in (qc.get("layer_policies") or {}).items():
            pw = f"{where}.layer_policies[{pattern!r}]"
            if not isinstance(pol, dict):
                raise UserError(f"{pw}: expected a mapping")
            pm, pskip = _mf_method(pol, pw, notes)
            for k in ("act_quant_granularity", "weight_quant_granularity"):
                want = "per_token" if k.startswith("act") else "per_channel"
                if pol.get(k) not in (None, want):
                    raise UserError(f"{pw}.{k}: only {want!r} is supported, got {pol.get(k)!r}")
            policies.append(LayerPolicy(_mf_pattern(pattern, pw), pm, pskip))
        unknown = set(qc) - _MF_KEYS
        if unknown:
            raise UserError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_MF_KEYS)})")
        if method is None:
            raise UserError(f"{where}: weight_dtype must be int8 (got {qc.get('weight_dtype')!r})")
        return cls(method, skip, tuple(policies), notes=tuple(dict.fromkeys(notes)))


_MF_KEYS = {"quant_method", "weight_dtype", "activation_dtype", "kvcache_dtype", "outliers_suppression",
            "modules_to_not_convert", "algorithm_args", "layer_policies", "act_quant_granularity", "weight_quant_granularity"}


def _mf_name(name: str, where: str) -> str:
    if name in hf_map.MINDFORMERS_MODULES:
        return hf_map.MINDFORMERS_MODULES[name]
    raise UserError(f"{where}: unknown MindFormers module name {name!r} (known: {', '.join(sorted(hf_map.MINDFORMERS_MODULES))})")


def _mf_pattern(pattern: str, where: str) -> str:
    """Translate the MindFormers names inside a layer-policy regex to ours (`feed_forward` -> `mlp`)."""
    def sub(m: re.Match) -> str:
        word = m.group(0)
        return hf_map.MINDFORMERS_MODULES.get(word, word)

    try:
        re.compile(pattern)
    except re.error as e:
        raise UserError(f"{where}: not a regular expression ({e})") from None
    return re.sub(r"[A-Za-z_][A-Za-z0-9_]*", sub, pattern)


def _mf_method(qc: dict, where: str, notes: list[str]) -> tuple[str | None, tuple[str, ...]]:
    if qc.get("quant_method", "ptq") not in ("ptq", "rtn"):
        raise UserError(f"{where}.quant_method: only 'ptq' / 'rtn' (post-training, round to nearest) are supported, got {qc.get('quant_method')!r}")
    wd, ad = str(qc.get("weight_dtype", "int8")).lower(), str(qc.get("activation_dtype", "none")).lower()
    if wd not in ("int8", "none"):
        raise UserError(f"{where}.weight_dtype: int8 or none, got {wd!r}")
    if ad not in ("int8", "none"):
        raise UserError(f"{where}.activation_dtype: int8 or none, got {ad!r}")
    if str(qc.get("kvcache_dtype", "none")).lower() != "none":
        raise UserError(f"{where}.kvcache_dtype: KV-cache quantisation is not supported (use 'none')")
    sup = str(qc.get("outliers_suppression", "none"))
    if sup.lower() not in ("none", ""):
        notes.append(f"{where}.outliers_suppression {sup!r} is NOT applied (smoothing needs calibration text and is not "
                     "built): plain per-channel weights / per-token activations")
    if qc.get("algorithm_args"):
        notes.append(f"{where}.algorithm_args {qc['algorithm_args']!r} ignored (no algorithm takes arguments here)")
    method = None if wd == "none" else ("w8a8" if ad == "int8" else "int8")
    skip = tuple(_mf_name(n, f"{where}.modules_to_not_convert") for n in (qc.get("modules_to_not_convert") or []))
    return method, skip


# ------------------------------------------------------------------------------------------ applying
@dataclass
class QuantReport:
    converted: dict[str, int] = field(default_factory=dict)  # method -> modules converted
    kept: list[str] = field(default_factory=list)  # modules left dense by the config
    unsupported: list[str] = field(default_factory=list)  # shapes the scheme cannot take

    def summary(self) -> str:
        conv = ", ".join(f"{n} {m}" for m, n in self.converted.items()) or "nothing"
        out = f"quantised {conv}; {len(self.kept)} linear(s) kept dense by the config"
        if self.unsupported:
            out += f"; {len(self.unsupported)} left dense (shape not supported: {', '.join(self.unsupported[:4])})"
        return out


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def quantize_model(model: nn.Module, qc: QuantConfig) -> QuantReport:
    """Replace the selected `nn.Linear`s and routed `Experts` of `model` by quantised modules, one at a
    time (each dense matrix is freed once quantised). A tied lm_head gets its own quantised copy. The
    linears left dense become `KernelLinear` (same tensors; a native bf16 GEMV when they are bf16)."""
    report = QuantReport()
    schemes = {}
    uses: dict[int, int] = {}  # a module reachable under several names keeps its dense weight (still used)
    for _, mod in model.named_modules(remove_duplicate=False):
        uses[id(mod)] = uses.get(id(mod), 0) + 1
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.endswith("indexer.weights_proj"):
            continue  # never a candidate (module docstring)
        if isinstance(mod, nn.Linear):
            method = qc.method_for(name)
            shape = (mod.out_features, mod.in_features)
        elif isinstance(mod, Experts) and not isinstance(mod, QuantExperts):
            methods = {qc.method_for(name, p) for p in PROJ}
            method = methods.pop() if len(methods) == 1 else None
            shape = tuple(mod.gate_proj.shape[1:])
        else:
            continue
        if method is None:
            report.kept.append(name)
            continue
        scheme = schemes.setdefault(method, make_scheme(method, qc.group_size))
        dims = [shape] if isinstance(mod, nn.Linear) else [shape, shape[::-1]]
        if not all(scheme.supports(*d) for d in dims) or (isinstance(mod, nn.Linear) and mod.bias is not None):
            report.unsupported.append(name)
            continue
        new = QuantLinear.from_linear(scheme, mod) if isinstance(mod, nn.Linear) else QuantExperts.from_experts(scheme, mod)
        _set(model, name, new)
        if isinstance(mod, nn.Linear) and uses[id(mod)] == 1:
            mod.weight = None  # the module list above still holds the dense module: free its matrix now
        report.converted[method] = report.converted.get(method, 0) + 1
    use_dense_kernels(model)  # the linears kept dense (W8A8's lm_head, kv_b_proj): bf16 GEMV when bf16
    model.quantization = qc
    return report


def set_reference(model: nn.Module, on: bool = True) -> None:
    """Switch every quantised module to its plain dequantise-then-matmul path (tests, debugging)."""
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantExperts)):
            m.reference = on


def resolve(quantization, hf_config: dict | None = None) -> QuantConfig | None:
    """`quantization` argument -> QuantConfig or None. Accepts None/'none', a method name, a QuantConfig,
    or a MindFormers `quantization_config` dict."""
    if quantization is None or quantization == "none":
        return None
    if isinstance(quantization, QuantConfig):
        return quantization
    if isinstance(quantization, dict):
        return QuantConfig.from_mindformers(quantization)
    if isinstance(quantization, str):
        method, _, group = quantization.partition(":")  # "int4:64" picks the group size
        if group and (method != "int4" or group not in ("32", "64", "128", "256")):
            raise UserError(f"quantization {quantization!r}: only int4 takes a group size (int4:32|64|128|256)")
        return QuantConfig.preset(method, int(group) if group else 32)
    raise UserError(f"quantization: expected a name ({', '.join(SCHEMES)}), got {type(quantization).__name__}")


