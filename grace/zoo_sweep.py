"""The zoo's bits sweep: from the same GRACE BF16 student, round-to-nearest PTQ, CE-only QAT and GRACE QAT at
W8, W4, W3 and W2 (group 128), scored on the first `sweep_questions` of the shapes v2 test split.

QAT runs use 3 seeds (data order) at W4 and at the widest width where PTQ loses 5 points or more, one
elsewhere. Every model is scored as the grid it holds: the QAT release's weights (codes x step sizes) and, for
PTQ, the max-abs round-to-nearest grid, both through the same fake-quantized linears. 3- and 2-bit codes
live in the 4-bit container (the AWQ INT4 kernel's), so they occupy as many bytes as W4: `container_bytes`
says so, `ideal_bytes` is what a b-bit packing would take. Results: OUT/zoo.json "sweep" (see `read_sweep`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import torch

METHODS = ("ptq-rtn", "qat-ce", "qat-grace")


def _score(loaded, items) -> dict:
    from .evaluation import evaluate

    result = evaluate(loaded, items, progress=False)
    return {"accuracy": result.accuracy, "per_type": result.per_type, "n": result.n}


def quantized_bytes(model, bits: int, group_size: int) -> dict:
    """Bytes of the fake-quantized linears' weights: as held (4-bit container below 8 bits, fp16 scales and
    packed zeros as AWQ; 8 bits: int8 codes, fp32 scales) and as an ideal b-bit packing with fp16 scales."""
    from .distill.fake_quant import fake_quant_modules

    container = ideal = 0
    for module in fake_quant_modules(model).values():
        out_features, in_features = module.weight.shape
        groups = out_features * (in_features // group_size)
        if bits == 8:
            container += out_features * in_features + 4 * groups
        else:
            container += out_features * in_features // 2 + 2 * groups + groups // 2
        ideal += math.ceil(out_features * in_features * bits / 8) + 2 * groups
    return {"container_bytes": container, "ideal_bytes": ideal}


def ptq_grid(folder: Path, bits: int, group_size: int = 128):
    """GRACE BF16 with its linears fake-quantized at round-to-nearest max-abs scales (symmetric, per group)."""
    import grace
    from .distill.fake_quant import QATConfig, apply_qat, fake_quant_modules
    from .quant.primitives import symmetric_scales

    loaded = grace.load(folder, device="cpu", dtype=torch.float32)
    apply_qat(loaded.model, QATConfig(bits=bits, group_size=group_size))
    with torch.no_grad():
        for module in fake_quant_modules(loaded.model).values():
            scales = symmetric_scales(module.weight, bits, group_size)
            module.log_scale.copy_(scales.log().reshape(module.log_scale.shape))
    loaded.model.eval()
    return loaded


def run_sweep(builder) -> dict:
    """Run (or resume) every sweep entry; returns zoo.json's "sweep" section. Several `--only sweep` processes
    may run at once: each entry is claimed by one (a claim file with its pid) and stored in its own file."""
    from .evaluation.shapes import read_shapes

    r = builder.recipe
    store = builder.work / "sweep"
    store.mkdir(parents=True, exist_ok=True)
    items = read_shapes("shapes-v2-test", r.sweep_questions)
    source = builder.out / "grace-bf16"
    _entry(store, "bf16", lambda: _score(_load(source), items))
    for bits in r.sweep_bits:
        _entry(store, f"ptq-rtn-w{bits}", lambda bits=bits: _ptq_entry(source, bits, items))
    _wait(store, ["bf16"] + [f"ptq-rtn-w{b}" for b in r.sweep_bits])
    runs = _read_all(store)
    bf16 = runs["bf16"]["accuracy"]
    lossy = [b for b in r.sweep_bits if runs[f"ptq-rtn-w{b}"]["accuracy"] <= bf16 - 0.05]
    widest = max(lossy) if lossy else None
    seeded = {4} | ({widest} if widest else set())
    names = []
    for bits in r.sweep_bits:
        for method in ("grace", "ce"):
            for seed in range(r.sweep_seeds if bits in seeded else 1):
                name = f"qat-{method}-w{bits}-s{seed}"
                names.append(name)
                _entry(store, name, lambda method=method, bits=bits, seed=seed: _qat_entry(builder, method, bits,
                                                                                            seed, items))
    _wait(store, names)
    return summarize(_read_all(store), r, widest)


def _load(folder):
    import grace

    return grace.load(folder, device="cpu", dtype=torch.float32)


def _grid_model(source: Path, release: Path):
    """GRACE BF16's architecture holding a QAT release's weights (its grid: codes x step sizes), for every
    width alike (grace.load reads only the 4- and 8-bit releases)."""
    from safetensors.torch import load_file

    loaded = _load(source)
    state = {}
    for path in sorted(release.glob("*.safetensors")):
        state.update(load_file(path))
    missing, unexpected = loaded.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    if [k for k in missing if "rotary" not in k] or unexpected:
        raise RuntimeError(f"{release} does not match {source}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return loaded


def _ptq_entry(source: Path, bits: int, items) -> dict:
    start = time.process_time()
    loaded = ptq_grid(source, bits)
    return _score(loaded, items) | quantized_bytes(loaded.model, bits, 128) | {
        "method": "ptq-rtn", "bits": bits, "seed": 0, "cpu_s": time.process_time() - start}


def _qat_entry(builder, method: str, bits: int, seed: int, items) -> dict:
    from .zoo import _beta_trace

    name, args = builder.qat_args(method, bits, seed)
    probe = args.pop("_probe", None)
    start = time.process_time()
    run_dir = builder.work / "runs" / name
    final = run_dir / "final" if _finished(run_dir) else builder.train(name, **args).final
    entry = _score(_grid_model(builder.out / "grace-bf16", final), items) | {"method": f"qat-{method}", "bits": bits, "seed": seed,
                                           "cpu_s": time.process_time() - start}
    if probe:
        trace = probe | _beta_trace(run_dir / "metrics.jsonl")
        entry["controller"] = {k: v for k, v in trace.items() if k != "beta_trace"}
    return entry


def _entry(store: Path, name: str, compute) -> None:
    """Compute one entry unless it is stored or claimed by a live process."""
    import os

    result, claim = store / f"{name}.json", store / f"{name}.claim"
    if result.is_file():
        return
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _alive(claim):
            return
        claim.unlink(missing_ok=True)
        return _entry(store, name, compute)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        value = compute()
        tmp = result.with_suffix(".partial")
        tmp.write_text(json.dumps(value, indent=1))
        tmp.replace(result)
    finally:
        claim.unlink(missing_ok=True)


def _alive(claim: Path) -> bool:
    import os

    try:
        os.kill(int(claim.read_text() or 0), 0)
        return True
    except (OSError, ValueError):
        return False


def _wait(store: Path, names: list[str]) -> None:
    while True:
        missing = [n for n in names if not (store / f"{n}.json").is_file()]
        if not missing:
            return
        if not any((store / f"{n}.claim").is_file() and _alive(store / f"{n}.claim") for n in missing):
            raise RuntimeError(f"sweep entries {', '.join(missing)} are neither stored nor being computed")
        time.sleep(10)


def _read_all(store: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in sorted(store.glob("*.json"))}


def _finished(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.jsonl"
    return (run_dir / "final" / "config.json").is_file() and metrics.is_file() and \
        '"outcome": "finished"' in metrics.read_text()


def summarize(runs: dict, recipe, widest: int | None) -> dict:
    rows = []
    container = {b: runs[f"ptq-rtn-w{b}"] for b in recipe.sweep_bits}
    for method in METHODS:
        for bits in recipe.sweep_bits:
            accs = [v["accuracy"] for k, v in runs.items() if k != "bf16" and v.get("method") == method
                    and v.get("bits") == bits]
            if not accs:
                continue
            rows.append({"method": method, "bits": bits, "n_seeds": len(accs), "mean": statistics.mean(accs),
                         "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "min": min(accs), "max": max(accs),
                         "accuracies": accs, "container_bytes": container[bits]["container_bytes"],
                         "ideal_bytes": container[bits]["ideal_bytes"]})
    return {"questions": recipe.sweep_questions, "split": "shapes-v2-test", "bf16": runs["bf16"]["accuracy"],
            "widest_ptq_drop_5": widest, "rows": rows, "runs": runs,
            "note": "3- and 2-bit codes are stored in the 4-bit container (as many bytes as W4, container_bytes); "
                    "ideal_bytes is a true b-bit packing with fp16 scales. Bytes count the quantized linears only."}


def read_sweep(path: str | Path | None = None) -> dict | None:
    """The sweep section of a zoo.json (default: the shipped zoo's), or None when it has none."""
    from .zoo import DEFAULT_OUT

    path = Path(path) if path else DEFAULT_OUT / "zoo.json"
    if path.is_dir():
        path = path / "zoo.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("sweep")


def sweep_table(path: str | Path | None = None) -> list[dict]:
    """Rows {method, bits, n_seeds, mean, std, min, max} of the sweep, for tables and plots ([] when none)."""
    sweep = read_sweep(path)
    return [{k: row[k] for k in ("method", "bits", "n_seeds", "mean", "std", "min", "max")}
            for row in (sweep or {}).get("rows", [])]
