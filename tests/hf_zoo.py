"""The Hugging Face sweep's per-model proof, shared by tests/test_hf_sweep.py and
benchmarks/hf_sweep.py.

An architecture is a transformers ``model_type`` with the task class its auto mapping
names: causal LMs (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), encoders (masked LM), vision
encoders (image classification) and speech encoders (CTC, audio classification). Each is
built from its own config class, shrunk generically (:func:`shrunk_config`: two layers,
width 64, four heads of 16, MLP width 96, four experts of which two per token, a small
vocabulary; random unit-scale weights, nothing downloaded). Per model (:func:`check_model`):
the front end ``capture="auto"`` ran, and through the zero-invariance oracle (half of every
group) the MLP neurons, the attention heads and the experts (removal equals a -inf router
logit); then ``emit="module"`` of the neuron plan and a ``save_pretrained`` /
``from_pretrained`` round trip of it. Torch-Pruning's MetaPruner runs on a fresh copy
(:func:`torch_pruning_row`).
"""
from __future__ import annotations

import inspect
import re
import tempfile
import time

import torch

import fxprune
from fxprune._util import first_line
from fxprune.passes.check_values import output_error
from fxprune.passes.verify import check_zero_invariance
from helpers import count_params, half_plan, unit_scale
from timm_zoo import analyzed_row, reason_kind

TOLERANCE = 1e-4
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, LAYERS, VOCAB, EXPERTS, TOP_K = 64, 4, 2, 16, 96, 2, 128, 4, 2
IDS_SHAPE = (2, 8)
# Exact config keys and the value a shrunk config gives them (int-valued keys only).
EXACT = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "dim", "hidden_dim", "word_embed_proj_dim",
                     "embedding_size", "d_embed", "n_embed", "emb_dim", "model_dim"), HIDDEN),
    **dict.fromkeys(KV_KEYS := ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv",
                                "kv_heads"), KV_HEADS),
    **dict.fromkeys(("ffn_dim", "d_ff", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_hidden_size",
                     "dim_feedforward", "d_inner", "inner_hidden_size", "ff_dim", "mlp_dim"), MLP),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                     "num_experts_total"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"), TOP_K),
    **dict.fromkeys(("n_group", "topk_group", "n_shared_experts", "num_shared_experts", "first_k_dense_replace",
                     "decoder_sparse_step", "moe_layer_freq"), 1),
    # Mamba-2 blocks (Bamba, Falcon-H1...): n_heads x d_head must equal expand (2) x hidden
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_ssm": 128, "mamba_d_state": 16, "state_size": 16,
    "ssm_state_size": 16,
    "max_source_positions": 32,  # Whisper's encoder takes 2x this many feature frames
    "max_length": 64,  # audio spectrogram transformer's frame count
}
PATTERNS = [  # (regex on a key, value) for the keys no exact name covers
    (r"(^|_)(num_)?(hidden_)?layers$|^n_layers?$|^num_.*_layers$", LAYERS),
    (r"(^|_)(num_)?(attention_)?heads$|^n_heads?$|attention_heads$", HEADS),
    (r"head_dim$|^kv_channels$|head_size$", HEAD_DIM),
    (r"intermediate_size$", MLP),
    (r"_lora_rank$", 32),
]
PER_LAYER_LISTS = ("layer_types", "layers_block_type", "block_types", "mlp_only_layers", "attn_layer_indices")


def _shrunk_value(key: str, value):
    """The small value of one config field (lists of stage widths, depths and head counts
    included); fields that no rule names keep their default."""
    if isinstance(value, bool) or not isinstance(value, (int, list)):
        return value
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if key in ("depths", "num_layers", "depth", "encoder_layers", "block_repeats"):
                return [1] * len(value)
            if key in ("hidden_sizes", "embed_dims", "neck_hidden_sizes", "embed_dim", "hidden_dims", "conv_dim",
                       "dims", "channels", "widths", "stage_channels"):
                return [16 * 2 ** min(i, 3) for i in range(len(value))]
            if key in ("num_heads", "num_attention_heads", "heads"):
                return [2 ** min(i, 3) for i in range(len(value))]
        return value
    if key in EXACT and not key.endswith("_token_id"):
        return min(value, EXACT[key]) if key in ("max_length", "max_source_positions") else EXACT[key]
    if "feat_extract" in key or "conv" in key or key.startswith(("mamba_", "ssm_")):
        return value  # wav2vec2's feature encoder, state-space blocks: their own consistent sizes
    if key.endswith("_token_id"):
        return value if value < VOCAB else 0
    if key == "vocab_size":
        return min(value, VOCAB)
    if key == "max_position_embeddings":
        return min(value, 512)
    for pattern, small in PATTERNS:
        if re.search(pattern, key):
            return min(value, small) if "layers" in pattern else small
    return value


def shrunk_config(model_type: str):
    """The default config of ``model_type`` with few layers and small widths (sub-configs,
    such as a text or vision config, shrunk the same way); built through the config
    class's own ``__init__`` so derived fields (layer types, head dims) follow."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    values = _shrunk_dict(cls().to_dict())
    if {"expand", "num_heads", "head_dim"} <= values.keys() and isinstance(values.get("expand"), int):
        values["num_heads"] = values["expand"] * HIDDEN // HEAD_DIM  # Mamba-2: heads x head_dim = expand x hidden
    try:
        return cls(**values)
    except Exception:  # noqa: BLE001 - families without grouped-query attention (ESMC) refuse 2 kv heads
        return cls(**{k: HEADS if k in KV_KEYS else v for k, v in values.items()})


def _shrunk_dict(values: dict) -> dict:
    depth = next((values[k] for k in ("num_hidden_layers", "num_layers", "n_layer") if isinstance(values.get(k), int)),
                 None)
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and "model_type" in value:  # a sub-config
            out[key] = _shrunk_dict(value)
        elif isinstance(value, list) and (key in PER_LAYER_LISTS or (len(value) == depth and depth > LAYERS)):
            out[key] = value[:LAYERS]  # per-layer lists (layer types, dense or sparse MLPs) follow the depth
        elif key in ("vocab_size", "pad_token_id") and value is None:
            out[key] = VOCAB if key == "vocab_size" else 0
        elif key in ("transformers_version", "architectures"):
            continue
        else:
            out[key] = _shrunk_value(key, value)
    out["use_cache"] = False if "use_cache" in values else out.get("use_cache", False)
    return out


def architectures() -> dict[str, tuple[str, str]]:
    """model_type -> (kind, task class name), from transformers' auto mappings."""
    from transformers.models.auto import modeling_auto as m

    found: dict[str, tuple[str, str]] = {}
    for kind, mapping in (("causal", m.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("encoder", m.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
                          ("vision", m.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES),
                          ("speech", m.MODEL_FOR_CTC_MAPPING_NAMES),
                          ("speech", m.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES)):
        for model_type, name in mapping.items():
            if isinstance(name, (tuple, list)):
                name = name[0]
            found.setdefault(model_type, (kind, name))
    return found


def make_model(model_type: str) -> tuple[torch.nn.Module, dict]:
    """The shrunk model (unit-scale random weights, eval mode) and keyword inputs it runs on."""
    import transformers

    kind, name = architectures()[model_type]
    config = shrunk_config(model_type)
    torch.manual_seed(0)
    model = unit_scale(getattr(transformers, name)(config)).eval()
    return model, inputs_for(model, config)


def inputs_for(model: torch.nn.Module, config) -> dict:
    """Keyword inputs from the model's main_input_name and config; the first candidate the
    eager model runs on (speech models take frames or samples in more than one layout)."""
    g = torch.Generator().manual_seed(0)
    main = getattr(model, "main_input_name", "input_ids")
    sub = getattr(config, "vision_config", None) or getattr(config, "audio_config", None) or config
    candidates: list[dict] = []
    if main == "pixel_values":
        size = getattr(sub, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        candidates.append({main: torch.randn(1, getattr(sub, "num_channels", 3), h, w, generator=g)})
    elif main == "input_values":
        mel, frames = getattr(sub, "num_mel_bins", 128), getattr(sub, "max_length", 64)
        candidates += [{main: torch.randn(1, 4000, generator=g)}, {main: torch.randn(1, frames, mel, generator=g)}]
    elif main == "input_features":
        mel = getattr(sub, "num_mel_bins", None) or getattr(sub, "feature_size", 80)
        frames = 2 * getattr(sub, "max_source_positions", 32)
        candidates += [{main: torch.randn(1, mel, frames, generator=g)},
                       {main: torch.randn(1, frames, mel, generator=g)},
                       {main: torch.randn(1, frames, 2 * mel, generator=g)}]
    else:
        vocab = min(getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None), "vocab_size",
                                                                    VOCAB), VOCAB)
        candidates.append({main: torch.randint(3, vocab, IDS_SHAPE, generator=g)})
    params = inspect.signature(model.forward).parameters
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params and main != "input_ids":
        for c in candidates:
            c["decoder_input_ids"] = torch.ones(1, 4, dtype=torch.long)
    failure = None
    for inputs in candidates:
        try:
            with torch.no_grad():
                model(**inputs)
            return inputs
        except Exception as exc:  # noqa: BLE001 - try the next layout
            failure = exc
    raise RuntimeError(f"eager forward fails on the sweep's inputs: {first_line(failure, 120)}")


def head_counts(config) -> set[int]:
    """Every head count in the config (and its sub-configs): a group of that size is heads."""
    counts = set()
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            counts |= {v for k, v in value.items() if isinstance(v, int) and re.search(r"heads$|^n_head", k)}
        elif isinstance(value, int) and re.search(r"heads$|^n_head", key):
            counts.add(value)
    return counts - {0, 1}


def _oracle(model, graph, groups) -> float | None:
    plan = half_plan(graph, groups) if groups else {}
    return check_zero_invariance(model, graph, plan, tolerance=float("inf")) if plan else None


def _round_trip(model, graph, plan, inputs) -> str:
    """``emit="module"`` of the plan; its class saves and loads with the same outputs. "ok" or why not."""
    try:
        mine = fxprune.prune(graph, plan, emit="module")
        with tempfile.TemporaryDirectory() as d:
            mine.save_pretrained(d)
            back = type(mine).from_pretrained(d).eval()
        with torch.no_grad():
            error = output_error(mine(**inputs), back(**inputs))
        return "ok" if error < TOLERANCE else f"reload differs by {error:.2g}"
    except Exception as exc:  # noqa: BLE001 - a failure is a column
        return f"{type(exc).__name__}: {first_line(exc, 120)}"


def check_model(model_type: str, *, round_trip: bool = True) -> dict:
    """One sweep row for ``model_type`` (raises nothing: a failure is the row's ``why``)."""
    kind, name = architectures()[model_type]
    row: dict = {"model": model_type, "kind": kind, "class": name}
    start = time.perf_counter()
    try:
        model, inputs = make_model(model_type)
    except Exception as exc:  # noqa: BLE001
        row.update(stage="build", why=_why(exc))
        return row
    row["params_M"] = round(count_params(model) / 1e6, 2)
    try:
        graph, head = analyzed_row(model, inputs)
    except Exception as exc:  # noqa: BLE001
        row.update(stage="capture", why=_why(exc),
                   seconds=round(time.perf_counter() - start, 1))
        return row
    row.update(head)
    row["no_rule"] = sorted({reason_kind(g.reason) for g in graph.groups
                             if "has no channel rule" in g.reason or "could not handle" in g.reason})
    heads = head_counts(model.config)
    zero_invariant = [g for g in graph.prunable_groups if g.zero_invariant]
    neurons = [g for g in zero_invariant if g.size not in heads]
    head_groups = [g for g in graph.prunable_groups if g.size in heads]
    row.update(mlp_groups=len(neurons), head_groups=len(head_groups),
               experts=sum(e.prunable for e in graph.experts))
    try:
        row["mlp_error"] = _oracle(model, graph, neurons)
        row["head_error"] = _oracle(model, graph, [g for g in head_groups if g.zero_invariant])
        experts = [e for e in graph.experts if e.prunable]
        row["expert_error"] = (check_zero_invariance(model, graph, {e.id: [0] for e in experts},
                                                     tolerance=float("inf")) if experts else None)
    except Exception as exc:  # noqa: BLE001
        row.update(stage="prune", why=_why(exc))
    row["mlp_ok"] = row.get("mlp_error") is not None and row["mlp_error"] < TOLERANCE
    if round_trip and row["mlp_ok"]:
        row["module"] = _round_trip(model, graph, half_plan(graph, neurons), inputs)
    if "why" not in row:
        row["why"] = "" if row["mlp_ok"] else ("no MLP group prunable" if not neurons
                                               else f"oracle error {row['mlp_error']:.2g}")
    row["stage"] = row.get("stage") or ("pass" if row["mlp_ok"] else "analysis")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _why(exc: BaseException) -> str:
    """An exception in one line: its first, or its last where the first only announces it
    (transformers' config validation: "Class validation error for validator ...:")."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines and lines[0].endswith(":") else first_line(exc)
    return f"{type(exc).__name__}: {text[:160]}"


def _ignored(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers that write the model's outputs (Torch-Pruning must keep their widths)."""
    out = [model.get_output_embeddings()] if hasattr(model, "get_output_embeddings") else []
    out += [m for n, m in model.named_modules()
            if n.split(".")[-1] in ("classifier", "score", "lm_head", "head", "projector", "qa_outputs")]
    return [m for m in out if isinstance(m, torch.nn.Module)]


def torch_pruning_worker(model_type: str, conn) -> None:
    """Torch-Pruning 1.6.1 out of the box (L1 magnitude, 50% per layer, output layers kept),
    in a forked process: did it run, do the outputs keep their shapes, the parameters left."""
    try:
        import torch_pruning as tp
        from torch.utils._pytree import tree_flatten

        torch.set_num_threads(1)
        model, inputs = make_model(model_type)
        n0 = count_params(model)
        with torch.no_grad():
            want = [tuple(t.shape) for t in tree_flatten(model(**inputs))[0] if isinstance(t, torch.Tensor)]
        pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=_ignored(model), global_pruning=False)
        pruner.step()
        with torch.no_grad():
            got = [tuple(t.shape) for t in tree_flatten(model(**inputs))[0] if isinstance(t, torch.Tensor)]
        kept = count_params(model) / n0
        why = "" if got == want else f"output shapes {got[:2]} (were {want[:2]})"
        if not why and kept > 0.95:
            why = f"kept {kept:.2f}"
        conn.send({"tp_ok": not why, "tp_kept": round(kept, 3), "tp_why": why})
    except Exception as exc:  # noqa: BLE001 - a failure is a row
        conn.send({"tp_ok": False, "tp_why": f"{type(exc).__name__}: {first_line(exc, 100)}"})
