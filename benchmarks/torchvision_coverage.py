"""Coverage of every torchvision classification model: deploy-prune and Torch-Pruning side by side.

For every model of ``torchvision.models.list_models(module=torchvision.models)`` (random init, fixed seed,
ratio 0.5, L1, no finetuning, the smallest input the model accepts) this script records

* **deploy-prune**: pruned? (#groups found), does the pruned model run, is its output shape unchanged,
  ONNX parity (ONNX Runtime vs PyTorch, relative to the output's scale), MAC ratio dense/pruned, ORT speedup,
  and how many conv/linear layers the analysis left alone (with the reasons, in the JSON);
* **Torch-Pruning** (``MetaPruner`` + ``MagnitudeImportance(p=1)``, ignoring only the ``nn.Linear`` layers with
  1000 outputs, which is what a user writes first): pruned?, output shape, MAC ratio, ORT speedup, the error.

Dense, ours and TP's pruned model are timed in ONE interleaved ``benchmark()`` call per model.

Each model runs in its own subprocess (``--one NAME``) with a wall-clock timeout and an address-space cap, so a
crash, a hang or a memory blow-up is recorded as that model's result instead of ending the run. The parent
collects one JSON line per model and writes the Markdown table (``--out``) and the raw results (``--json``).

Example (the command that regenerates docs/coverage.md)::

    python benchmarks/torchvision_coverage.py --out docs/coverage.md --json /tmp/coverage.json

Re-run a few models and merge them into an existing result file::

    python benchmarks/torchvision_coverage.py --models shufflenet_v2_x0_5,vit_b_16 --update \\
        --json /tmp/coverage.json --out docs/coverage.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULT_TAG = "@@COVERAGE-RESULT@@ "
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit")


def input_size(name: str, cnn_size: int) -> int:
    """The smallest input each family accepts: transformers hard-code 224, Inception/GoogLeNet need >= 75."""
    if name.startswith(TRANSFORMER_PREFIXES):
        return 224
    if name.startswith(("inception", "googlenet")):
        return max(96, cnn_size)
    return cnn_size


def family(name: str) -> str:
    return "transformer" if name.startswith(TRANSFORMER_PREFIXES) else "cnn"


# ----------------------------------------------------------------------------------------------------------
# one model (child process)


def _generic(reason: str) -> str:
    """A skip reason without its fx node name, so equal reasons can be counted together."""
    reason = re.sub(r"\(node [^)]*\)", "(node …)", reason)
    reason = re.sub(r"(at|of) node \S+", r"\1 node …", reason)
    reason = re.sub(r"convolution '[^']*'", "convolution '…'", reason)
    reason = re.sub(r"\(groups=\d+\)", "(groups=…)", reason)
    return re.sub(r"^\d+ of \d+ channels kept: ", "some channels kept: ", reason)


def _limit_memory(gb: float) -> None:
    if gb > 0:
        import resource

        cap = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import compare_torch_pruning as C
    from deploy_prune.bench import benchmark, make_session
    from deploy_prune.export import cleanup_onnx, export_onnx, onnx_size, parity, sidecar_of
    from deploy_prune.metrics import count_macs, count_params

    torch.set_num_threads(args.threads)
    hw = input_size(name, args.cnn_size)
    shape = (1, 3, hw, hw)
    r: dict[str, Any] = {"model": name, "family": family(name), "input_shape": list(shape), "errors": {},
                         "ours": {}, "tp": {}, "dense": {}, "timings_s": {}}
    tick = time.perf_counter()

    def lap(what: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        r["timings_s"][what] = round(now - tick, 1)
        tick = now

    def fail(stage: str, exc: BaseException) -> None:
        r["errors"][stage] = C.one_line(exc)
        print(f"--- {stage} failed ---", file=sys.stderr)
        traceback.print_exc()

    example = torch.randn(*shape, generator=torch.Generator().manual_seed(args.seed))
    inputs = [example, torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(args.seed + 1))]
    dense, redrawn = C.build(name, args.seed)
    if redrawn:
        r["redrawn_zero_weights"] = redrawn
    with torch.no_grad():
        r["dense"]["out_shape"] = list(dense(example).shape)
    r["dense"]["macs"] = count_macs(dense, shape)
    r["dense"]["params"] = count_params(dense)
    lap("build")

    models: dict[str, Any] = {"dense": dense}
    for tool, prune in (("ours", C.prune_ours), ("tp", C.prune_tp)):
        res = r[tool]
        m = copy.deepcopy(dense)
        try:
            info = prune(m, shape, args.ratio, args.round_to)
            if tool == "ours":
                skipped = info.pop("skipped")
                res["layers_left_alone"] = len(skipped)
                res["skip_reasons"] = dict(Counter(_generic(v) for v in skipped.values()).most_common())
                res["skipped"] = skipped
            res.update(info)
        except Exception as exc:  # noqa: BLE001
            fail(f"{tool} prune", exc)
            res["pruned"] = False
            lap(f"{tool} prune")
            continue
        res["params"] = count_params(m)
        res["pruned"] = res["params"] < r["dense"]["params"]
        try:
            with torch.no_grad():
                out = m(example)
            res["forward"] = True
            res["out_shape"] = list(out.shape)
            res["shape_ok"] = res["out_shape"] == r["dense"]["out_shape"]
            res["macs"] = count_macs(m, shape)
            res["mac_ratio"] = r["dense"]["macs"] / res["macs"] if res["macs"] else None
            models[tool] = m
        except Exception as exc:  # noqa: BLE001
            res["forward"] = False
            fail(f"{tool} forward", exc)
        lap(f"{tool} prune")

    del dense, m  # from here on each model lives only in ``models`` and is dropped once exported and checked
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix=f"cov-{name}-") as tmp:
        for kind in list(models):
            m = models.pop(kind)
            gc.collect()
            if kind != "dense" and not r[kind].get("pruned"):
                continue  # nothing to compare: it is the dense model
            raw, clean = Path(tmp) / f"{kind}.raw.onnx", Path(tmp) / f"{kind}.onnx"
            try:
                export_onnx(m, raw, example)
                cleanup_onnx(raw, clean)
                raw.unlink()
                sidecar_of(raw).unlink(missing_ok=True)
                files[kind] = clean
                r[kind]["onnx_bytes"] = onnx_size(clean)
                r[kind]["external_data"] = sidecar_of(clean).exists()
                r[kind]["export"] = True
            except Exception as exc:  # noqa: BLE001
                r[kind]["export"] = False
                fail(f"{kind} export", exc)
                lap(f"{kind} export")
                continue
            lap(f"{kind} export")
            # batch 1 (the export example's size) and batch 2 (the file declares a dynamic batch) separately,
            # and the dense file too, so an export problem is not mistaken for a pruning one
            per_batch = {}
            for x in inputs:
                b = f"b{x.shape[0]}"
                try:
                    p = parity(clean, m, [x])
                    per_batch[b] = {k: p[k] for k in ("ok", "max_abs_diff", "max_rel_diff", "ref_max_abs", "note")}
                except Exception as exc:  # noqa: BLE001
                    per_batch[b] = {"ok": False, "error": C.one_line(exc)}
                    fail(f"{kind} parity {b}", exc)
            r[kind]["parity_by_batch"] = per_batch
            rels = [v["max_rel_diff"] for v in per_batch.values() if "max_rel_diff" in v]
            notes = [v["note"] for v in per_batch.values() if v.get("note")]
            r[kind]["parity"] = {"ok": all(v["ok"] for v in per_batch.values()),
                                 "ok_b1": per_batch["b1"]["ok"],
                                 "max_rel_diff": max(rels) if rels else None,
                                 "note": notes[0] if notes else None,
                                 "error": next((v["error"] for v in per_batch.values() if "error" in v), None)}
            lap(f"{kind} parity")
        del models
        if "dense" in files and len(files) > 1:
            iters, warmup, block, drop = args.bench_iters, 10, 10, 2
            try:  # slow models: fewer runs, so that one model's timing stays within --bench-budget-s
                s = make_session(files["dense"], "cpu" if args.provider == "cpu" else args.provider, args.threads)
                x = example.numpy()
                iname = s.get_inputs()[0].name
                s.run(None, {iname: x})
                t0 = time.perf_counter()
                s.run(None, {iname: x})
                est = time.perf_counter() - t0
                del s
                per_variant = args.bench_budget_s / len(files)
                if est * (warmup + iters * block / (block - drop)) > per_variant:
                    warmup, block, drop = 2, 4, 1
                    iters = max(3, min(iters, int((per_variant / est - warmup) * (block - drop) / block)))
                r["bench_estimate_ms"] = round(est * 1e3, 2)
            except Exception as exc:  # noqa: BLE001
                fail("bench estimate", exc)
            r["loadavg_before_bench"] = [round(v, 2) for v in os.getloadavg()]  # the machine is shared
            try:
                res = benchmark(files, shape, provider=args.provider, threads=args.threads, iters=iters,
                                warmup=warmup, block=block, drop=drop, progress=False)
                r["bench"] = {"provider": res.provider, "threads": res.threads, "iters": iters, "warmup": warmup,
                              "block": block, "drop": drop}
                for kind, st in res.stats.items():
                    r[kind]["p50_ms"] = st.p50
                    r[kind]["latency_ms"] = st.to_dict()
                for kind in ("ours", "tp"):
                    if kind in res.stats:
                        r[kind]["speedup"] = res.stats["dense"].p50 / res.stats[kind].p50
            except Exception as exc:  # noqa: BLE001
                fail("benchmark", exc)
            lap("benchmark")
    for tool in ("ours", "tp"):
        t = r[tool]
        t["ok"] = bool(t.get("pruned") and t.get("forward") and t.get("shape_ok") and t.get("export")
                       and (t.get("parity") or {}).get("ok"))
    return r


def child_main(args: argparse.Namespace) -> int:
    _limit_memory(args.mem_gb)
    name = args.one
    try:
        r = run_one(name, args)
    except MemoryError as exc:
        r = {"model": name, "family": family(name), "crash": f"MemoryError (> {args.mem_gb:g} GB address space): {exc}"}
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        import compare_torch_pruning as C

        r = {"model": name, "family": family(name), "crash": C.one_line(exc)}
    sys.stdout.write(RESULT_TAG + json.dumps(r, default=str) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------------------
# parent: one subprocess per model


def _tail(path: Path, n: int = 3) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-400:]


def run_child(name: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--ratio", str(args.ratio),
           "--round-to", str(args.round_to), "--cnn-size", str(args.cnn_size), "--bench-iters", str(args.bench_iters),
           "--bench-budget-s", str(args.bench_budget_s), "--provider", args.provider, "--threads", str(args.threads),
           "--seed", str(args.seed), "--mem-gb", str(args.mem_gb)]
    log = log_dir / f"{name}.log"
    t0 = time.perf_counter()
    with open(log, "w") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                                 start_new_session=True) as proc:
        try:
            stdout, _ = proc.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the child and anything it started (its own session)
            proc.communicate()
            return {"model": name, "family": family(name), "crash": f"timeout after {args.timeout} s",
                    "wall_s": round(time.perf_counter() - t0, 1)}
    wall = round(time.perf_counter() - t0, 1)
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            r = json.loads(line[len(RESULT_TAG):])
            r["wall_s"] = wall
            return r
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    if proc.returncode == -9:
        how += " (out of memory?)"
    return {"model": name, "family": family(name), "crash": f"{how}: {_tail(log)}", "wall_s": wall}


# ----------------------------------------------------------------------------------------------------------
# table


def _yn(v: Any) -> str:
    return "—" if v is None else ("yes" if v else "**no**")


def _short(msg: str, n: int = 90) -> str:
    msg = msg.replace("|", "/").replace("`", "'")
    return msg if len(msg) <= n else msg[: n - 1] + "…"


def _ours_cells(r: dict[str, Any]) -> list[str]:
    import compare_torch_pruning as C

    if "crash" in r:
        return ["**crash**", "—", "—", "—", "—", "—", "—"]
    o = r["ours"]
    if "ours prune" in r["errors"]:
        return ["**error**", "—", "—", "—", "—", "—", "—"]
    pruned = f"yes ({o.get('groups', 0)})" if o.get("pruned") else f"**no** ({o.get('groups', 0)})"
    if not o.get("pruned"):
        return [pruned, "—", "—", "—", "—", "—", str(o.get("layers_left_alone", "—"))]
    p = o.get("parity") or {}
    if not o.get("export", True) or "ours export" in r["errors"]:
        par = "**export failed**"
    elif p.get("ok"):
        par = f"ok ({p['max_rel_diff']:.0e})"
    elif p.get("ok_b1"):
        dense_b2 = ((r["dense"].get("parity_by_batch") or {}).get("b2") or {}).get("ok")
        par = "**batch 1 only**" + (" (dense too)" if dense_b2 is False else "")
    elif p:
        par = f"**FAIL** ({p['max_rel_diff']:.0e})" if p.get("max_rel_diff") is not None else "**error**"
    else:
        par = "—"
    return [pruned, _yn(o.get("forward")), _yn(o.get("shape_ok")), par, C.fmt_x(o.get("mac_ratio")),
            C.fmt_x(o.get("speedup")), str(o.get("layers_left_alone", "—"))]


def _tp_cells(r: dict[str, Any]) -> list[str]:
    import compare_torch_pruning as C

    if "crash" in r:
        return ["—", "—", "—", "—", _short(r["crash"])]
    t = r["tp"]
    errs = [f"{k}: {v}" for k, v in r["errors"].items() if k.startswith("tp")]
    err = _short("; ".join(errs)) if errs else ""
    if "tp prune" in r["errors"]:
        return ["**error**", "—", "—", "—", err]
    shape = "—"
    if t.get("forward") is False:
        shape = "**forward fails**"
    elif t.get("out_shape"):
        shape = "same" if t.get("shape_ok") else f"**{tuple(t['out_shape'])}**"
    tpar = t.get("parity") or {}
    if t.get("pruned") and tpar and not tpar.get("ok"):
        what = "ONNX parity fails at batch 2 only" if tpar.get("ok_b1") else "ONNX parity fails"
        if not err or "parity" not in err:
            err = (err + "; " if err else "") + what
    return [_yn(t.get("pruned")), shape, C.fmt_x(t.get("mac_ratio")), C.fmt_x(t.get("speedup")), err]


def summary(results: list[dict[str, Any]]) -> list[str]:
    n = len(results)
    cnn = [r for r in results if r["family"] == "cnn"]
    tfm = [r for r in results if r["family"] == "transformer"]

    def ok(rs: list[dict[str, Any]], tool: str) -> int:
        return sum(1 for r in rs if (r.get(tool) or {}).get("ok"))

    def cnt(tool: str, key: str) -> int:
        return sum(1 for r in results if (r.get(tool) or {}).get(key))

    refused = sum(1 for r in tfm if not (r.get("ours") or {}).get("pruned") and "crash" not in r)
    lines = [
        f"**deploy-prune: {ok(results, 'ours')}/{n} pruned with the forward running, the output shape unchanged and "
        f"ONNX parity ok** (CNNs {ok(cnn, 'ours')}/{len(cnn)}, transformers {ok(tfm, 'ours')}/{len(tfm)}, "
        f"{refused} transformer(s) left unpruned with a reason); pruned at all {cnt('ours', 'pruned')}/{n}.",
        f"**Torch-Pruning: {ok(results, 'tp')}/{n} by the same test** (CNNs {ok(cnn, 'tp')}/{len(cnn)}, "
        f"transformers {ok(tfm, 'tp')}/{len(tfm)}); pruned at all {cnt('tp', 'pruned')}/{n}, "
        f"of which output shape unchanged {sum(1 for r in results if (r.get('tp') or {}).get('pruned') and (r.get('tp') or {}).get('shape_ok'))}.",
    ]
    b1 = [r["model"] for r in results if not (r.get("ours") or {}).get("ok")
          and ((r.get("ours") or {}).get("parity") or {}).get("ok_b1")]
    if b1:
        lines.append(f"deploy-prune pruned {len(b1)} more correctly at batch 1, but their ONNX file fails at batch 2 "
                     f"({', '.join(b1)}); see the notes: the dense export fails the same way where marked \"dense too\".")
    both = [r for r in results if (r.get("ours") or {}).get("ok") and (r.get("tp") or {}).get("ok")
            and r["ours"].get("speedup") and r["tp"].get("speedup")]
    if both:
        import statistics

        ratio = [r["ours"]["speedup"] / r["tp"]["speedup"] for r in both]
        lines.append(f"Where both succeed ({len(both)} models), ours' ORT speedup / TP's: median "
                     f"{statistics.median(ratio):.2f}, range {min(ratio):.2f}–{max(ratio):.2f} "
                     f"(within ±0.1 of 1.0 is timing noise on this machine).")
    return lines


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta["environment"]
    out = [
        "# torchvision coverage: deploy-prune vs Torch-Pruning",
        "",
        "<!-- generated by benchmarks/torchvision_coverage.py; do not edit by hand -->",
        "",
        f"Regenerate: `{meta['command']}`" + (f" (rows last re-run with `{meta['last_command']}`)"
                                             if meta.get("last_command") and meta["last_command"] != meta["command"]
                                             else ""),
        "",
        f"- Date: {env['date']}",
        f"- Machine: {env['cpu']}, {env['cores']} cores — a **shared 2-core VM**: timings carry about ±10% noise.",
        f"- Versions: Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
        f"onnxruntime {env['onnxruntime']}, torch-pruning {env['torch-pruning']}",
        f"- ONNX Runtime: {meta['provider']}, {meta['threads']} intra-op threads; dense, ours and TP timed in one "
        f"interleaved `benchmark()` call per model, {meta['bench_iters']} kept runs per variant "
        f"(fewer for models slower than the {meta['bench_budget_s']:g} s per-model budget: see `iters` in the JSON)",
        f"- Pruning: ratio {meta['ratio']}, L1, round_to {meta['round_to']}, random init (seed {meta['seed']}), "
        f"no finetuning; input 1x3x{meta['cnn_size']}x{meta['cnn_size']} for CNNs, 96x96 for Inception-V3/GoogLeNet, "
        "224x224 for ViT/Swin/MaxViT (they hard-code it)",
        f"- Each model in its own process, {meta['timeout']} s timeout, {meta['mem_gb']:g} GB address-space cap; "
        f"total wall time {meta['wall_s'] / 60:.0f} min",
        "",
        "## Summary",
        "",
        *[f"- {s}" for s in summary(results)],
        "",
        "## How to read",
        "",
        "One row per model. **ours** = deploy-prune (`analyze` → `l1` → `select` → `prune_channels`); "
        "\"pruned\" is yes when parameters went down, with the number of channel groups the analysis found in "
        "brackets; \"fwd\" = the pruned model runs; \"shape\" = its output shape equals the dense model's; "
        "\"parity\" = ONNX Runtime matches PyTorch within rtol 1e-3 / atol 1e-4·max|y| on a batch of 1 and a "
        "batch of 2 (the file declares a dynamic batch), with the worst max|Δ|/max|y| in brackets; \"batch 1 "
        "only\" = the file is right at batch 1 but fails at batch 2, and \"(dense too)\" = so does the dense "
        "model's file, i.e. an export problem rather than a pruning one; \"MAC ratio\" = dense MACs / pruned MACs (higher = smaller); \"ORT speedup\" = "
        "p50 dense / p50 pruned from the same run (higher = faster); \"left alone\" = conv/linear layers whose "
        "output channels the analysis would not prune (always at least the classifier; the reasons are in the "
        "notes below and in the JSON). **TP** = Torch-Pruning `MetaPruner` with `MagnitudeImportance(p=1)`, "
        "ignoring only `nn.Linear` layers with 1000 outputs (what a user writes first); its \"shape\" shows the "
        "output shape when it changed. A model counts as a success for either tool only when it is pruned, "
        "runs, keeps its output shape, exports to ONNX and passes parity. Random-init weights say nothing "
        "about accuracy: this table is about *whether* each tool can prune and deploy each architecture, and "
        "what that buys on ONNX Runtime.",
        "",
        "## Results",
        "",
        "| model | input | ours: pruned (groups) | fwd | shape | parity | MAC ratio | ORT speedup | left alone "
        "| TP: pruned | shape | MAC ratio | ORT speedup | TP error |",
        "|---|---|---|---|---|---|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for r in results:
        hw = r.get("input_shape", [0, 0, 0, 0])[-1] if r.get("input_shape") else input_size(r["model"], meta["cnn_size"])
        out.append("| " + " | ".join([r["model"], str(hw), *_ours_cells(r), *_tp_cells(r)]) + " |")
    notes = []
    for r in results:
        if "crash" in r:
            notes.append(f"- **{r['model']}**: the model's process failed: `{_short(r['crash'], 300)}`")
            continue
        o = r["ours"]
        for stage, msg in r["errors"].items():
            if not stage.startswith("tp"):
                notes.append(f"- **{r['model']}**, {stage}: `{_short(msg, 300)}`")
        reasons = (dict(Counter(_generic(v) for v in o["skipped"].values()).most_common()) if o.get("skipped")
                   else o.get("skip_reasons") or {})
        beyond_head = {k: v for k, v in reasons.items() if k != "reaches the model's output"}
        if beyond_head or not o.get("pruned"):
            why = "; ".join(f"{k} ×{v}" for k, v in list(reasons.items())[:4])
            head = "not pruned" if not o.get("pruned") else f"{o.get('layers_left_alone')} layers left alone"
            notes.append(f"- {r['model']} (ours): {head}: {_short(why, 400)}")
        if r.get("redrawn_zero_weights"):
            notes.append(f"- {r['model']}: torchvision initializes {', '.join(r['redrawn_zero_weights'])} to zero "
                         "(the output would be identically zero); redrawn from N(0, 0.01²) before pruning")
        p = o.get("parity") or {}
        if p.get("note"):
            notes.append(f"- {r['model']} (ours): {p['note']}")
    if notes:
        out += ["", "## Notes: deploy-prune's failures, refusals and layers left alone", "", *notes]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------


def _timm_section(path: Path) -> str:
    """The sections that benchmarks/timm_coverage.py and dense_prediction_coverage.py keep in the same file (kept
    when this table is rewritten)."""
    old = path.read_text() if path.exists() else ""
    kept = ""
    for tag in ("timm-coverage", "dense-coverage"):
        begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
        if begin in old and end in old:
            kept += "\n" + begin + old.split(begin, 1)[1].split(end, 1)[0] + end + "\n"
    return kept


def parent_main(args: argparse.Namespace) -> int:
    import torchvision

    import compare_torch_pruning as C

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names]
        if unknown:
            print(f"unknown model(s): {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = wanted
    if args.render:
        if not (args.json and args.json.exists()):
            print("--render needs an existing --json file", file=sys.stderr)
            return 2
        old = json.loads(args.json.read_text())
        text = markdown(old["results"], old["meta"])
        if args.out:
            args.out.write_text(text + _timm_section(args.out))
        else:
            sys.stdout.write(text)
        return 0
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="coverage-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(names)} model(s); per-model logs in {log_dir}", file=sys.stderr, flush=True)

    previous: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    if args.update and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        previous = {r["model"]: r for r in old["results"]}
        meta = old.get("meta", {})
    t0 = time.perf_counter()
    results = dict(previous)
    partial = (args.json or log_dir / "coverage.json").with_suffix(".partial.jsonl")
    for i, name in enumerate(names, 1):
        r = run_child(name, args, log_dir)
        results[name] = r
        with open(partial, "a") as f:
            f.write(json.dumps(r, default=str) + "\n")
        o, t = r.get("ours") or {}, r.get("tp") or {}
        state = r.get("crash") or (f"ours {'ok' if o.get('ok') else 'NOT ok'} x{o.get('speedup') or 0:.2f}, "
                                   f"tp {'ok' if t.get('ok') else 'NOT ok'} x{t.get('speedup') or 0:.2f}")
        print(f"[{i}/{len(names)}] {name}: {r.get('wall_s')} s; {_short(state, 160)}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    order = sorted(torchvision.models.list_models(module=torchvision.models))
    ordered = [results[n] for n in order if n in results]
    first = next((r for r in ordered if r.get("bench")), {})
    full_cmd = C.command_line()
    if args.models:  # the command that regenerates the whole table has no --models / --update
        argv = sys.argv[1:]
        keep, skip = [], False
        for a in argv:
            if skip:
                skip = False
                continue
            if a == "--models":
                skip = True
                continue
            if a.startswith("--models=") or a == "--update":
                continue
            keep.append(a)
        full_cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + keep)
    meta = {
        "command": full_cmd,
        "last_command": C.command_line(),
        "environment": C.environment(),
        "provider": (first.get("bench") or {}).get("provider", args.provider),
        "threads": args.threads, "bench_iters": args.bench_iters, "bench_budget_s": args.bench_budget_s,
        "ratio": args.ratio, "round_to": args.round_to, "seed": args.seed, "cnn_size": args.cnn_size,
        "timeout": args.timeout, "mem_gb": args.mem_gb,
        "wall_s": wall + (meta.get("wall_s", 0) if previous else 0),
        "this_run_wall_s": wall,
    }
    text = markdown(ordered, meta)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + _timm_section(args.out))
    else:
        sys.stdout.write(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": ordered}, indent=2, default=str))
    for s in summary(ordered):
        print(s, file=sys.stderr)
    print(f"wall time {wall / 60:.1f} min", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated subset of the torchvision classification models")
    ap.add_argument("--out", type=Path, help="write the Markdown table here (default: stdout)")
    ap.add_argument("--json", type=Path, help="write the raw per-model results here")
    ap.add_argument("--update", action="store_true",
                    help="keep the rows of --json's models that are not re-run (use with --models)")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8, help="channel multiple for both tools (default 8)")
    ap.add_argument("--cnn-size", type=int, default=64, help="input height/width for CNNs (default 64)")
    ap.add_argument("--bench-iters", type=int, default=20, help="kept timed runs per variant (default 20)")
    ap.add_argument("--bench-budget-s", type=float, default=90.0,
                    help="seconds of timing per model; slow models get fewer runs (default 90)")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per model (default 600)")
    ap.add_argument("--mem-gb", type=float, default=12.0, help="address-space cap per model process (default 12)")
    ap.add_argument("--log-dir", type=Path, help="per-model stderr logs (default: a new temp folder)")
    ap.add_argument("--render", action="store_true", help="only re-render --out from an existing --json file")
    ap.add_argument("--one", metavar="NAME", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        return child_main(args)
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        ap.error("Torch-Pruning is not installed: pip install -e .[bench]")
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
