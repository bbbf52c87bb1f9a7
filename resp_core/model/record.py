"""The pruning record: which units of which layers a mask keeps, as saved with a compacted model
(``resp_pruning.json``), and every rule a record written by RESP satisfies."""

from __future__ import annotations

from pathlib import Path

from ..errors import RespError
from .adapter import DecoderAdapter
from .masks import MaskSet

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: config.json of the base model type, record only in resp_pruning.json


def _layer_plan(adapter: DecoderAdapter, mask: MaskSet) -> list[dict]:
    """Per kept layer: source index, kept query heads, kept KV heads, kv_index, kept channels."""
    g = adapter.geometry
    e = mask.effective()
    group = g.kv_group_of_head()
    plan = []
    for i in range(g.num_layers):
        if not bool(e.layer[i, 0]):
            continue
        q = e.q_head[i].nonzero().flatten()
        kv = e.kv_group[i].nonzero().flatten()
        remap = {int(k): j for j, k in enumerate(kv.tolist())}
        kv_index = [remap[int(group[h])] for h in q.tolist()]
        plan.append({
            "source_layer": i,
            "q_heads": q.tolist(),
            "kv_heads": kv.tolist(),
            "kv_index": kv_index,
            "mlp_channels": e.mlp_channel[i].nonzero().flatten().tolist(),
        })
    return plan


def _grouping(kv_index: list[int], n_kv: int) -> tuple[int, list[int] | None]:
    """(num_key_value_groups, kv_index or None when heads are spread evenly and in order)."""
    if n_kv == 0 or len(kv_index) % n_kv:
        return 1, kv_index
    rep = len(kv_index) // n_kv
    even = [h // rep for h in range(len(kv_index))]
    return (rep, None) if kv_index == even else (1, kv_index)


def _record(adapter: DecoderAdapter, plan: list[dict]) -> dict:
    records = []
    for p in plan:
        i = p["source_layer"]
        a, m = adapter.attention_parts(i), adapter.mlp_parts(i)
        nq, nkv = len(p["q_heads"]), len(p["kv_heads"])
        records.append({
            "source_layer": i, "num_heads": nq, "num_kv_heads": nkv,
            "q_heads": p["q_heads"], "kv_heads": p["kv_heads"],
            "kv_index": _grouping(p["kv_index"], nkv)[1] if nq else None,
            "intermediate_size": len(p["mlp_channels"]),
            "o_proj_bias": a.o.bias is not None, "down_proj_bias": m.down.bias is not None,
        })
    return {"format": FORMAT_VERSION, "base_model_type": adapter.family,
            "dense_geometry": adapter.geometry.to_json(), "layers": records}


def plan_summary(record: dict) -> dict:
    """Per kept layer (num_heads, num_kv_heads, intermediate_size): what export formats compare."""
    return {r["source_layer"]: (r["num_heads"], r["num_kv_heads"], r["intermediate_size"]) for r in record["layers"]}


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_record(record: dict, where: Path, n_layers: int) -> None:
    """Every rule a record written by RESP satisfies; one line naming ``where`` on the first breach."""
    def bad(msg: str):
        raise RespError(f"{where}: {msg}")

    if record.get("format") not in READABLE_FORMATS:
        bad(f"unsupported format {record.get('format')!r} (this RESP reads {', '.join(map(str, READABLE_FORMATS))})")
    dg = record.get("dense_geometry")
    keys = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
    if not isinstance(dg, dict) or not all(_int(dg.get(k)) and dg[k] > 0 for k in keys):
        bad("dense_geometry is missing or not positive integers")
    if dg["num_heads"] % dg["num_kv_heads"]:
        bad("dense_geometry: num_heads is not a multiple of num_kv_heads")
    hpg = dg["num_heads"] // dg["num_kv_heads"]
    layers = record.get("layers")
    if not isinstance(layers, list):
        bad("layers is missing")
    if len(layers) != n_layers:
        bad(f"{len(layers)} layer records for num_hidden_layers {n_layers} in config.json")
    if len(layers) > dg["num_layers"]:
        bad(f"{len(layers)} layer records but the dense model had {dg['num_layers']} layers")
    prev = -1
    for j, rec in enumerate(layers):
        at = f"layers[{j}]"
        if not isinstance(rec, dict):
            bad(f"{at} is not an object")
        for k in ("source_layer", "num_heads", "num_kv_heads", "intermediate_size"):
            if not _int(rec.get(k)) or rec[k] < 0:
                bad(f"{at}.{k} is missing or not a non-negative integer")
        for k in ("o_proj_bias", "down_proj_bias"):
            if not isinstance(rec.get(k), bool):
                bad(f"{at}.{k} is missing or not true/false")
        src, nq, nkv = rec["source_layer"], rec["num_heads"], rec["num_kv_heads"]
        if not prev < src < dg["num_layers"]:
            bad(f"{at}.source_layer {src} is out of order or outside [0, {dg['num_layers']})")
        prev = src
        if nq > dg["num_heads"] or nkv > dg["num_kv_heads"] or rec["intermediate_size"] > dg["intermediate_size"]:
            bad(f"{at}: widths ({nq} heads, {nkv} KV heads, {rec['intermediate_size']} channels) exceed the dense "
                f"model's ({dg['num_heads']}, {dg['num_kv_heads']}, {dg['intermediate_size']})")
        if (nq == 0) != (nkv == 0):
            bad(f"{at}: {nq} query heads with {nkv} KV heads")
        kvi = rec.get("kv_index")
        if nq == 0 and kvi is not None:
            bad(f"{at}.kv_index must be null for a layer without heads")
        if nq and kvi is None and nq % nkv:
            bad(f"{at}: {nq} query heads do not spread evenly over {nkv} KV heads and there is no kv_index")
        if kvi is not None:
            if not isinstance(kvi, list) or len(kvi) != nq or not all(_int(x) for x in kvi):
                bad(f"{at}.kv_index must list one KV head per query head ({nq})")
            if any(not 0 <= x < nkv for x in kvi):
                bad(f"{at}.kv_index has entries outside [0, {nkv})")
            # kept heads are in their original order and GQA groups are consecutive: the map is
            # non-decreasing, uses every KV head, and no KV head serves more than its dense group
            if kvi[0] != 0 or any(b - a not in (0, 1) for a, b in zip(kvi, kvi[1:])) or kvi[-1] != nkv - 1:
                bad(f"{at}.kv_index is not a non-decreasing map onto every KV head")
            if max(kvi.count(k) for k in range(nkv)) > hpg:
                bad(f"{at}.kv_index gives a KV head more than its {hpg} query heads")
        if "q_heads" in rec or "kv_heads" in rec:
            qh, kh = rec.get("q_heads"), rec.get("kv_heads")
            for name, lst, n, top in (("q_heads", qh, nq, dg["num_heads"]), ("kv_heads", kh, nkv, dg["num_kv_heads"])):
                if (not isinstance(lst, list) or len(lst) != n or not all(_int(x) and 0 <= x < top for x in lst)
                        or lst != sorted(set(lst))):
                    bad(f"{at}.{name} must be {n} increasing indices in [0, {top})")
            groups = [h // hpg for h in qh]
            if sorted(set(groups)) != kh:
                bad(f"{at}: kv_heads {kh} are not the groups of q_heads {qh}")
            derived = _grouping([kh.index(gr) for gr in groups], nkv)[1] if nq else None
            if derived != kvi:
                bad(f"{at}.kv_index {kvi} does not match q_heads/kv_heads (expected {derived})")
        elif record["format"] >= 2:
            bad(f"{at}: q_heads/kv_heads are missing")
