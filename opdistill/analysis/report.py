"""report.html for `opdistill analyze`: one self-contained page (PNG plots embedded as base64) that a person
reads: the global numbers, heat maps per layer × module, ΔW spectra, mask enrichment, cross-run overlap."""

from __future__ import annotations

import html
import math
from typing import Any, Mapping

import torch

from ..htmlpage import fmt as _fmt
from ..htmlpage import img as _img
from ..htmlpage import page, use_agg
from ..htmlpage import png as _png
from ..htmlpage import table as _table
from .names import threshold_key

LAYER_MODULES = ("q", "k", "v", "o", "gate", "up", "down", "norms", "other")


def layer_grid(tensors: Mapping[str, Mapping[str, Any]], metric: str) -> tuple[list[int], list[str], list[list[float]]]:
    """layers × module types of one metric, from the per-tensor results (NaN where a cell has no tensor;
    several tensors of one cell, e.g. two norms, are averaged weighted by size)."""
    cells: dict[tuple[int, str], tuple[float, int]] = {}
    for metrics in tensors.values():
        layer, value = metrics.get("layer"), metrics.get(metric)
        if layer is None or value is None:
            continue
        key = (layer, metrics["module"])
        total, weight = cells.get(key, (0.0, 0))
        cells[key] = (total + value * metrics["numel"], weight + metrics["numel"])
    layers = sorted({layer for layer, _ in cells})
    modules = [m for m in LAYER_MODULES if any(module == m for _, module in cells)]
    grid = [[cells[(layer, m)][0] / cells[(layer, m)][1] if (layer, m) in cells else math.nan for m in modules] for layer in layers]
    return layers, modules, grid


def _heatmaps(summary: Mapping[str, Any], abs_key: str) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("sparsity_bf16", "sparsity, bf16-aware", False), (f"sparsity_abs_{abs_key}", f"sparsity, |Δ| < {abs_key}", False),
              ("relative_update", "log10 relative update", True)]
    grids = [(title, layer_grid(summary["tensors"], metric), log) for metric, title, log in panels]
    if not grids[0][1][0]:
        return None
    layers = grids[0][1][0]
    fig, axes = plt.subplots(1, 3, figsize=(13, max(3.0, 0.22 * len(layers) + 1.5)))
    for ax, (title, (rows, modules, grid), log) in zip(axes, grids):
        data = np.array(grid, dtype=float)
        if log:
            data = np.log10(np.where(data > 0, data, np.nan))
        image = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=None if log else 0.0, vmax=None if log else 1.0)
        ax.set_xticks(range(len(modules)), modules, rotation=45)
        ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=7)
        ax.set_title(title)
        ax.set_xlabel("module")
        fig.colorbar(image, ax=ax, fraction=0.046)
    axes[0].set_ylabel("layer")
    return _png(fig)


def _spectra(summary: Mapping[str, Any], spectra: Mapping[str, torch.Tensor]) -> str | None:
    """σ_i/σ_1 and cumulative energy of ΔW for each module type in the first, middle and last layer."""
    import matplotlib.pyplot as plt

    if not spectra:
        return None
    tensors = summary["tensors"]
    layers = sorted({m["layer"] for n, m in tensors.items() if n in spectra and m["layer"] is not None})
    picked_layers = sorted({layers[0], layers[len(layers) // 2], layers[-1]}) if layers else []
    chosen = [n for n in spectra if tensors[n]["layer"] in picked_layers or tensors[n]["layer"] is None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for name in chosen[:40]:
        sigma = spectra[name].double()
        if sigma.numel() == 0 or float(sigma[0]) <= 0:
            continue
        meta = tensors[name]
        label = f"L{meta['layer']} {meta['module']}" if meta["layer"] is not None else meta["module"]
        index = range(1, sigma.numel() + 1)
        left.semilogy(index, (sigma / sigma[0]).clamp_min(1e-12).tolist(), lw=0.9, label=label)
        energy = (sigma**2).cumsum(0) / (sigma**2).sum()
        right.semilogx(index, energy.tolist(), lw=0.9, label=label)
    left.axhline(1e-5, color="k", ls=":", lw=0.8)
    left.set(title="spectrum of ΔW (σ_i / σ_1; dotted: numerical-rank cut 1e-5)", xlabel="i", ylabel="σ_i / σ_1")
    right.set(title="share of ‖ΔW‖² in the top i singular values", xlabel="i", ylabel="share of energy", ylim=(0, 1.01))
    right.legend(fontsize=6, ncol=3, loc="lower right")
    return _png(fig)


def _enrichment(summary: Mapping[str, Any]) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    modules = {k: v for k, v in summary["by_module"].items() if v.get("principal_enrichment") is not None or v.get("lowmag_enrichment") is not None}
    if not modules:
        return None
    names = list(modules) + ["all"]
    principal = [modules[k].get("principal_enrichment") or 0.0 for k in modules] + [summary["global"].get("principal_enrichment") or 0.0]
    low = [modules[k].get("lowmag_enrichment") or 0.0 for k in modules] + [summary["global"].get("lowmag_enrichment") or 0.0]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(x - 0.2, principal, 0.4, label="principal mask")
    ax.bar(x + 0.2, low, 0.4, label="low-magnitude mask")
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xticks(x, names)
    alpha = summary.get("options", {}).get("mask_alpha")
    ax.set(ylabel="enrichment (1 = random)", title=f"share of changed coordinates in each mask ÷ its density α = {alpha}")
    ax.legend()
    return _png(fig)


def _layer_profile(summary: Mapping[str, Any], abs_key: str) -> str | None:
    import matplotlib.pyplot as plt

    layers = summary.get("by_layer") or {}
    if not layers:
        return None
    index = [int(k) for k in layers]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 3.6))
    left.plot(index, [v["relative_update"] or 0.0 for v in layers.values()], marker=".")
    left.set(title="relative update per layer", xlabel="layer", ylabel="‖ΔW‖ / ‖W‖")
    right.plot(index, [v["sparsity_bf16"] for v in layers.values()], marker=".", label="bf16-aware")
    right.plot(index, [v[f"sparsity_abs_{abs_key}"] for v in layers.values()], marker=".", label=f"|Δ| < {abs_key}")
    right.set(title="sparsity per layer", xlabel="layer", ylabel="share unchanged", ylim=(-0.02, 1.02))
    right.legend()
    return _png(fig)


def _compare_plot(compare: Mapping[str, Any]) -> str | None:
    import matplotlib.pyplot as plt
    import numpy as np

    modules = compare.get("by_module") or {}
    if not modules:
        return None
    names = list(modules) + ["all"]
    observed = [modules[k]["jaccard"] or 0.0 for k in modules] + [compare["jaccard"] or 0.0]
    baseline = [modules[k]["random_baseline"] or 0.0 for k in modules] + [compare["random_baseline"] or 0.0]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(x - 0.2, observed, 0.4, label="Jaccard of changed masks")
    ax.bar(x + 0.2, baseline, 0.4, label="random baseline pq/(p+q−pq)")
    ax.set_xticks(x, names)
    ax.set(ylabel="Jaccard", title="cross-run overlap of changed coordinates")
    ax.legend()
    return _png(fig)


def render_report(summary: Mapping[str, Any], spectra: Mapping[str, torch.Tensor]) -> str:
    """The whole page as one string."""
    use_agg()
    abs_key = threshold_key(summary.get("options", {}).get("abs_threshold", 1e-5))
    g = summary["global"]
    parts = [
        "<h1>What fine-tuning did to the weights</h1>",
        f"<p>BASE <code>{html.escape(str(summary.get('base', '')))}</code> → TUNED <code>{html.escape(str(summary.get('tuned', '')))}</code>; "
        f"{g['tensors_analysed']} tensors, {g['numel']:,} coordinates, {summary.get('seconds', 0):.0f} s. "
        "Definitions: docs/analysis.md (after arXiv 2606.13657 and 2511.08567).</p>",
        "<h2>Global</h2>",
    ]
    keys = ["relative_update", "sparsity_bf16", f"sparsity_abs_{abs_key}", "changed_density", "energy_top_0.1pct", "energy_top_1pct",
            "energy_top_5pct", "principal_overlap", "principal_enrichment", "lowmag_overlap", "lowmag_enrichment"]
    parts.append(_table([[k, g.get(k)] for k in keys], ["metric", "value"]))
    means = g.get("matrices_mean") or {}
    mean_keys = ["numerical_rank_pct", "stable_rank", "effective_rank", "topk_energy_k1", "topk_energy_k16", "topk_energy_k64",
                 "proj_energy_r1", "proj_energy_r10", "angle_u_mean_sin_r1", "angle_u_max_deg_r10", "spectrum_drift"]
    if means:
        svd = g.get("svd", {})
        parts.append(f"<h3>Mean over 2-D tensors</h3><p>Spectra: {svd.get('exact', 0)} exact, {svd.get('randomized', 0)} randomised "
                     f"(top {summary.get('options', {}).get('svd_rank')}).</p>")
        parts.append(_table([[k, means.get(k)] for k in mean_keys if k in means], ["metric", "mean"]))
    parts.append("<h2>By module type</h2>")
    module_cols = ["numel", "relative_update", "sparsity_bf16", f"sparsity_abs_{abs_key}", "update_energy_share", "principal_enrichment", "lowmag_enrichment"]
    parts.append(_table([[k] + [v.get(c) for c in module_cols] for k, v in summary["by_module"].items()], ["module"] + module_cols))
    for title, image in (("Per layer and module", _heatmaps(summary, abs_key)), ("Per layer", _layer_profile(summary, abs_key)),
                         ("Spectra of ΔW", _spectra(summary, spectra)), ("Mask enrichment", _enrichment(summary))):
        if image:
            parts.append(f"<h2>{title}</h2>{_img(image, title)}")
    compare = summary.get("compare")
    if compare:
        parts.append(f"<h2>Cross-run overlap</h2><p><code>{html.escape(compare['run_a'])}</code> vs <code>{html.escape(compare['run_b'])}</code> "
                     f"(changed by the {html.escape(compare['definition'])} definition): Jaccard {_fmt(compare['jaccard'])}, random baseline "
                     f"{_fmt(compare['random_baseline'])} (densities {_fmt(compare['density_a'])}, {_fmt(compare['density_b'])}).</p>")
        image = _compare_plot(compare)
        if image:
            parts.append(_img(image, "cross-run Jaccard"))
    skipped = summary.get("skipped") or {}
    if skipped:
        parts.append("<h2>Skipped tensors</h2>" + _table([[k, v] for k, v in skipped.items()], ["tensor", "why"]))
    return page("opdistill analyze", parts)
