"""Update-geometry analysis and sparse-subnetwork training (arXiv 2606.13657, 2511.08567): every metric on a planted update with a
known answer, streaming == in-memory, randomised == exact SVD on a low-rank matrix, the CLI's outputs, and
masked training that leaves unmasked weights bitwise unchanged."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from opdistill.analysis import metrics as M
from opdistill.masks import MaskWriter, build_masks, load_mask, mask_density, save_mask
from opdistill.analysis import AnalysisOptions, analyze_checkpoints, analyze_tensors, compare_runs
from opdistill.cli import main
from opdistill.config import load_config
from opdistill.errors import ConfigError, ModelError
from opdistill.methods import train

Q = "model.layers.0.self_attn.q_proj.weight"
OPTS = AnalysisOptions(progress=False)


def one(base: torch.Tensor, tuned: torch.Tensor, name: str = Q, options: AnalysisOptions = OPTS) -> dict:
    """Per-tensor metrics of a single pair."""
    return analyze_tensors({name: base}, {name: tuned}, options).summary["tensors"][name]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- planted updates, known answers


def test_planted_rank_r_update_has_numerical_rank_r_and_all_energy_in_top_r():
    g = gen(0)
    base = torch.randn(96, 64, generator=g, dtype=torch.float64)
    update = torch.randn(96, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 64, generator=g, dtype=torch.float64) * 1e-2
    r = one(base, base + update)
    sigma = torch.linalg.svdvals(update)
    assert r["svd"] == "exact"
    assert r["numerical_rank"] == 3 and r["numerical_rank_pct"] == pytest.approx(100 * 3 / 64)
    assert r["topk_energy_k4"] == pytest.approx(1.0, abs=1e-9)
    assert r["topk_energy_k2"] == pytest.approx(float((sigma[:2] ** 2).sum() / (sigma**2).sum()), rel=1e-9)
    assert r["topk_energy_k2"] < 0.999
    assert r["stable_rank"] == pytest.approx(float((sigma**2).sum() / sigma[0] ** 2), rel=1e-9)
    p = sigma[:3] / sigma[:3].sum()
    assert r["effective_rank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert r["relative_update"] == pytest.approx(float(update.norm() / base.norm()), rel=1e-12)


@pytest.mark.parametrize("shape", [(120, 50), (50, 120)])
def test_exact_spectrum_matches_lapack_svd(shape):
    a = torch.randn(*shape, generator=gen(1), dtype=torch.float64)
    spec = M.exact_spectrum(a, k=10)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(spec.sigma, s, rtol=1e-10, atol=1e-12)
    assert float(M.principal_sines(u[:, :10], spec.u).max()) < 1e-8
    assert float(M.principal_sines(vh[:10].T, spec.v).max()) < 1e-8


def test_planted_sparse_update_gives_exact_sparsity_and_concentration():
    g = gen(2)
    base = torch.randn(200, 100, generator=g, dtype=torch.float64)
    n, changed = base.numel(), 137
    index = torch.randperm(n, generator=g)[:changed]
    delta = torch.zeros(n, dtype=torch.float64)
    delta[index] = base.reshape(-1)[index] * torch.linspace(0.05, 0.5, changed, dtype=torch.float64)  # >> η relative, >> 1e-5
    r = one(base, base + delta.reshape(base.shape))
    assert r["sparsity_bf16"] == 1 - changed / n
    assert r["sparsity_abs_1e-5"] == 1 - changed / n
    assert r["changed_density"] == changed / n
    squares = (delta**2).sort(descending=True).values
    assert r["energy_top_0.1pct"] == pytest.approx(float(squares[:20].sum() / squares.sum()), rel=1e-12)  # 0.1% of 20000 = 20
    assert r["energy_top_1pct"] == 1.0  # 200 coordinates hold all 137 changes


def test_bf16_round_trip_is_unchanged_bf16_aware_but_not_under_the_absolute_cut():
    g = gen(3)
    base = torch.randn(64, 64, generator=g).bfloat16().float()  # a bf16 model, as fp32
    wiggle = (torch.rand(base.shape, generator=g) * 2 - 1) * 0.9e-3  # below half a bf16 ulp (≥ 1.95e-3 relative)
    tuned = base * (1 + wiggle)
    assert torch.equal(tuned.bfloat16(), base.bfloat16()), "the tuned weights round back to the base in bf16"
    r = one(base, tuned)
    assert r["sparsity_bf16"] == 1.0
    assert r["sparsity_abs_1e-5"] < 0.5, "the absolute cut calls most of these rounding-sized moves changes"

    moved = base.bfloat16().clone()
    moved.view(torch.int16)[5, 7] += 1  # one bf16 ulp on one coordinate
    assert one(base, moved.float())["sparsity_bf16"] == 1 - 1 / base.numel()


def test_bf16_aware_definition_is_bitwise_equality_of_bf16_values():
    g = gen(4)
    x = (torch.randn(20000, generator=g) * torch.logspace(-4, 2, 20000)).bfloat16()
    steps = torch.randint(-2, 3, (20000,), generator=g, dtype=torch.int16)
    y = (x.view(torch.int16) + steps).view(torch.bfloat16)  # 0, 1 or 2 ulps away
    unchanged = M.unchanged_bf16(x.double(), y.double(), 1e-3)
    assert torch.equal(unchanged, x == y)


def test_update_confined_to_low_magnitude_coordinates_has_enrichment_one_over_alpha():
    alpha = 0.1
    g = gen(5)
    base = torch.randn(128, 128, generator=g, dtype=torch.float64)
    k = round(alpha * base.numel())
    low = base.abs().reshape(-1).argsort()[:k]
    delta = torch.zeros(base.numel(), dtype=torch.float64)
    delta[low] = 0.5  # far above both cuts, even next to a near-zero weight
    r = one(base, base + delta.reshape(base.shape), options=AnalysisOptions(progress=False, mask_alpha=alpha))
    assert r["lowmag_overlap"] == 1.0
    assert r["lowmag_enrichment"] == pytest.approx(base.numel() / k, rel=1e-12)  # 1/α up to rounding of αN
    assert r["principal_enrichment"] < 1.0, "the smallest weights are not where the rank-k reconstruction is large"


def test_update_confined_to_the_principal_mask_has_principal_enrichment_one_over_alpha():
    alpha, g = 0.05, gen(6)
    base = torch.randn(100, 80, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(base, full_matrices=False)
    k = 1  # principal_rank_frac 0.01 of min(100, 80) rounds to 1
    reconstruction = (u[:, :k] * s[:k]) @ vh[:k]
    top = reconstruction.abs().reshape(-1).argsort(descending=True)[: round(alpha * base.numel())]
    delta = torch.zeros(base.numel(), dtype=torch.float64)
    delta[top] = 0.3
    r = one(base, base + delta.reshape(base.shape), options=AnalysisOptions(progress=False, mask_alpha=alpha))
    assert r["principal_mask_rank"] == 1
    assert r["principal_overlap"] == 1.0 and r["principal_enrichment"] == pytest.approx(1 / alpha)


def test_identical_singular_subspaces_have_zero_principal_angles():
    g = gen(7)
    base = torch.randn(90, 60, generator=g, dtype=torch.float64)
    r = one(base, base * 1.01)  # same singular vectors, every σ up by 1%
    for side in ("u", "v"):
        for percent in (1, 5, 10, 20):
            assert r[f"angle_{side}_mean_sin_r{percent}"] < 1e-7
            assert r[f"angle_{side}_max_deg_r{percent}"] < 1e-5
    assert r["spectrum_drift"] == pytest.approx(0.01, rel=1e-9)
    sigma = torch.linalg.svdvals(base)
    k = round(0.10 * 60)
    assert r["proj_energy_r10"] == pytest.approx(float((sigma[:k] ** 2).sum() / (sigma**2).sum()), rel=1e-9)

    # and a known non-zero angle: span(e1, e2) vs span(e1, cos θ e2 + sin θ e3)
    theta = 0.3
    a = torch.eye(5, dtype=torch.float64)[:, :2]
    b = torch.zeros(5, 2, dtype=torch.float64)
    b[0, 0], b[1, 1], b[2, 1] = 1.0, math.cos(theta), math.sin(theta)
    torch.testing.assert_close(M.principal_sines(a, b), torch.tensor([0.0, math.sin(theta)], dtype=torch.float64), atol=1e-12, rtol=0)


def test_randomized_svd_agrees_with_exact_on_a_low_rank_matrix():
    g = gen(8)
    left = torch.linalg.qr(torch.randn(300, 200, generator=g, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64)).Q
    base = (left * 0.85 ** torch.arange(200, dtype=torch.float64)) @ right.T  # fast-decaying spectrum
    update = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 200, generator=g, dtype=torch.float64) * 1e-3
    exact = one(base, base + update)
    randomized = one(base, base + update, options=AnalysisOptions(progress=False, exact_svd_max_dim=100))
    assert exact["svd"] == "exact" and randomized["svd"] == "randomized-top128"
    assert randomized["numerical_rank"] == exact["numerical_rank"] == 5
    assert randomized["effective_rank"] is None, "the entropy rank needs the whole spectrum"
    for key in ("stable_rank", "topk_energy_k1", "topk_energy_k4", "proj_energy_r1", "proj_energy_r5", "proj_energy_r10",
                "proj_energy_r20", "principal_enrichment", "spectrum_drift"):
        assert randomized[key] == pytest.approx(exact[key], rel=1e-6), key
    for key in ("angle_u_mean_sin_r5", "angle_v_mean_sin_r20"):
        assert randomized[key] == pytest.approx(exact[key], abs=1e-7), key


# ---------------------------------------------------------------- streaming


def fake_model(seed: int) -> dict[str, torch.Tensor]:
    g = gen(seed)
    shapes = {"model.embed_tokens.weight": (300, 24), "model.layers.0.self_attn.q_proj.weight": (24, 24),
              "model.layers.0.mlp.down_proj.weight": (24, 64), "model.layers.1.mlp.up_proj.weight": (64, 24),
              "model.layers.1.input_layernorm.weight": (24,), "model.norm.weight": (24,)}
    return {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}


def perturbed(weights: dict[str, torch.Tensor], seed: int, density: float, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {name: (w + scale * torch.randn(w.shape, generator=g) ** 3 * (torch.rand(w.shape, generator=g) < density)).contiguous()
            for name, w in weights.items()}


def test_streaming_two_checkpoints_equals_in_memory_and_the_concatenated_model(tmp_path):
    base = fake_model(0)
    tuned = perturbed(base, 1, density=0.4)
    save_file({**base, "lm_head.weight": base["model.embed_tokens.weight"].clone()}, str(tmp_path / "base.safetensors"))
    shard_dir = tmp_path / "tuned"  # a sharded checkpoint directory
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text("{}")
    names = list(tuned)
    save_file({n: tuned[n] for n in names[:3]}, str(shard_dir / "model-00001-of-00002.safetensors"))
    save_file({n: tuned[n] for n in names[3:]}, str(shard_dir / "model-00002-of-00002.safetensors"))

    streamed = analyze_checkpoints(str(tmp_path / "base.safetensors"), str(shard_dir), OPTS).summary
    in_memory = analyze_tensors(base, tuned, OPTS).summary
    assert streamed["skipped"] == {"lm_head.weight": "only in BASE (tied to the input embeddings in TUNED)"}
    assert streamed["tensors"] == in_memory["tensors"]
    assert streamed["global"] == in_memory["global"]

    w = torch.cat([base[n].double().reshape(-1) for n in names])
    d = torch.cat([(tuned[n].double() - base[n].double()).reshape(-1) for n in names])
    g = streamed["global"]
    assert g["relative_update"] == pytest.approx(float(d.norm() / w.norm()), rel=1e-12)
    assert g["sparsity_abs_1e-5"] == float((d.abs() < 1e-5).double().mean())
    tuned_all = w + d
    assert g["sparsity_bf16"] == float(((tuned_all - w).abs() <= 1e-3 * torch.maximum(w.abs(), tuned_all.abs())).double().mean())
    squares = (d**2).sort(descending=True).values
    for percent in (0.1, 1, 5):
        k = math.ceil(percent / 100 * d.numel())
        exact = float(squares[:k].sum() / squares.sum())
        assert g[f"energy_top_{percent:g}pct"] == pytest.approx(exact, rel=5e-3), "the histogram estimate is within 0.5%"


def test_printed_lines_of_an_in_memory_analysis_have_no_mask_or_comparison():
    base = fake_model(0)
    lines = analyze_tensors(base, perturbed(base, 1, density=0.4), OPTS).lines()
    assert lines[0].startswith(f"{len(base)} tensors, ") and "|delta| < 1e-05 " in lines[1]
    assert lines[2].startswith("enrichment of changed coordinates: principal mask ")
    assert len(lines) == 3, "no skipped tensors, no saved mask, no comparison"


def test_different_architectures_are_a_clear_error_naming_the_tensor(tmp_path):
    small = fake_model(0)
    wider = {**small, Q: torch.zeros(32, 24)}
    save_file(small, str(tmp_path / "a.safetensors"))
    save_file(wider, str(tmp_path / "b.safetensors"))
    with pytest.raises(ModelError, match=r"q_proj.weight: \[24, 24\] vs \[32, 24\]") as err:
        analyze_checkpoints(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), OPTS)
    assert "same architecture" in (err.value.fix or "")


def test_mask_writer_streams_a_valid_bool_safetensors_file(tmp_path):
    masks = {"a": torch.rand(3, 5, generator=gen(9)) < 0.5, "b": torch.tensor([True, False, True])}
    path = save_mask(masks, tmp_path / "m.safetensors", {"definition": "bf16"})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"definition": "bf16"}
    loaded = load_mask(path)
    assert loaded.keys() == masks.keys() and all(torch.equal(loaded[k], masks[k]) for k in masks)
    writer = MaskWriter(tmp_path / "n.safetensors", [("a", (2,))])
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", torch.ones(2, dtype=torch.bool))
    writer.abort()
    assert not list(tmp_path.glob("n.safetensors*")), "an unfinished mask leaves nothing behind"


# ---------------------------------------------------------------- the command


def write_checkpoint(src: Path, dst: Path, weights: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(src, dst)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def planted(tiny_model, tmp_path_factory):
    """The tiny model, a copy with a known update on layer-0 q_proj (rank 1 on a known set of rows),
    and a second run changing an overlapping set; plus an untied lm_head in the tuned file."""
    root = tmp_path_factory.mktemp("planted")
    base = load_file(str(tiny_model / "model.safetensors"))
    q = base[Q]
    g = gen(10)
    rows_a = torch.zeros(q.shape[0], dtype=torch.bool)
    rows_a[:12] = True
    rows_b = torch.zeros(q.shape[0], dtype=torch.bool)
    rows_b[8:20] = True
    direction = torch.randn(q.shape[1], generator=g)
    update_a = torch.outer(rows_a.float() * torch.linspace(1, 2, q.shape[0]), direction) * 0.05
    update_b = torch.outer(rows_b.float(), direction) * 0.05
    tuned_a = {**base, Q: (q + update_a).contiguous(), "lm_head.weight": base["model.embed_tokens.weight"].clone()}
    tuned_b = {**base, Q: (q + update_b).contiguous()}
    return {
        "base": tiny_model, "a": write_checkpoint(tiny_model, root / "a", tuned_a), "b": write_checkpoint(tiny_model, root / "b", tuned_b),
        "update": update_a, "weights": base, "root": root,
    }


def test_cli_analyze_writes_summary_report_mask_and_compare(planted, capsys):
    out, mask = planted["root"] / "analysis", planted["root"] / "mask.safetensors"
    code = main(["analyze", str(planted["base"]), str(planted["a"]), "--out", str(out), "--save-mask", str(mask),
                 "--compare", str(planted["a"]), str(planted["b"]), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "relative update" in printed and "report:" in printed

    summary = json.loads((out / "summary.json").read_text())
    weights, update = planted["weights"], planted["update"].double()
    total = sum(float(w.double().pow(2).sum()) for w in weights.values())
    n = sum(w.numel() for w in weights.values())
    changed = int((update != 0).sum())
    g = summary["global"]
    assert g["relative_update"] == pytest.approx(math.sqrt(float(update.pow(2).sum()) / total), rel=1e-6)
    assert g["sparsity_bf16"] == pytest.approx(1 - changed / n, abs=0.5 / n)
    assert g["sparsity_abs_1e-5"] == pytest.approx(1 - changed / n, abs=0.5 / n)
    assert summary["tensors"][Q]["numerical_rank"] == 1 and summary["tensors"][Q]["topk_energy_k1"] == pytest.approx(1.0)
    assert summary["tensors"]["model.layers.1.mlp.up_proj.weight"]["sparsity_bf16"] == 1.0
    assert summary["skipped"] == {"lm_head.weight": "only in TUNED (tied to the input embeddings in BASE)"}
    assert summary["by_module"]["q"]["update_energy_share"] == pytest.approx(1.0)

    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') >= 4 and "lm_head.weight" in page

    saved = load_mask(mask)
    assert set(saved) == set(weights)
    assert torch.equal(saved[Q], update != 0) and not any(saved[k].any() for k in saved if k != Q)

    # --compare: rows 0..11 (A) vs rows 8..19 (B) of q_proj, every column changed
    compare = summary["compare"]
    cols = weights[Q].shape[1]
    p, q = 12 * cols / n, 12 * cols / n
    assert compare["jaccard"] == pytest.approx(4 / 20)
    assert compare["random_baseline"] == pytest.approx(p * q / (p + q - p * q))
    assert compare["by_module"]["q"]["jaccard"] == pytest.approx(4 / 20)
    # a saved mask stands for its run
    against_mask = compare_runs(str(planted["base"]), str(planted["a"]), str(mask), OPTS)
    assert against_mask["jaccard"] == 1.0 and against_mask["density_b"] == pytest.approx(changed / n)


def test_cli_analyze_rejects_a_directory_without_a_model(tmp_path, tiny_model, capsys):
    assert main(["analyze", str(tiny_model), str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "no config.json" in err and "fix:" in err


# ---------------------------------------------------------------- sparse-subnetwork training


def masked_run(model: Path, data: Path, out: Path, mask: str) -> dict[str, torch.Tensor]:
    values = {"student": str(model), "data": f"{data}[:48]", "out_dir": str(out), "lr": "1e-3", "precision": "fp32",
              "max_response_tokens": 48, "seed": 3, "max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "checkpoint_every": 0,
              "train_mask": mask}
    train(load_config(None, [f"{k}={v}" for k, v in values.items()]))
    return load_file(str(out / "student" / "model.safetensors"))


def assert_only_masked_coordinates_moved(base: dict, trained: dict, masks: dict, min_moved: float) -> None:
    moved = masked = 0
    for name, weight in base.items():
        diff = trained[name] != weight
        assert not (diff & ~masks[name]).any(), f"{name}: an unmasked coordinate changed"
        assert torch.equal(trained[name][~masks[name]], weight[~masks[name]])
        if "embed" not in name:  # embedding rows of tokens absent from the batch get no gradient at all
            moved += int((diff & masks[name]).sum())
            masked += int(masks[name].sum())
    assert masked and moved / masked >= min_moved


def test_masked_training_with_a_saved_mask_moves_only_masked_coordinates(planted, selfinstruct, tmp_path):
    mask = planted["root"] / "train_mask.safetensors"
    masks = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in planted["weights"].items()}
    masks[Q] = planted["update"] != 0
    masks["model.layers.1.mlp.down_proj.weight"] = torch.rand(masks["model.layers.1.mlp.down_proj.weight"].shape, generator=gen(11)) < 0.3
    save_mask(masks, mask)
    trained = masked_run(planted["base"], selfinstruct, tmp_path / "run", str(mask))
    assert_only_masked_coordinates_moved(planted["weights"], trained, masks, min_moved=0.9)


def test_masked_training_with_a_random_mask_and_its_density(tiny_model, selfinstruct, tmp_path):
    base = load_file(str(tiny_model / "model.safetensors"))
    trained = masked_run(tiny_model, selfinstruct, tmp_path / "run", "random:0.2")
    masks = build_masks("random:0.2", {k: tuple(v.shape) for k, v in base.items()}, seed=3)  # the run's seed
    assert all(int(m.sum()) == round(0.2 * m.numel()) for m in masks.values())
    assert mask_density(masks) == pytest.approx(0.2, abs=1e-3)
    assert_only_masked_coordinates_moved(base, trained, masks, min_moved=0.9)
    other_seed = build_masks("random:0.2", {k: tuple(v.shape) for k, v in base.items()}, seed=4)
    assert not all(torch.equal(masks[k], other_seed[k]) for k in masks)


@pytest.mark.parametrize("overrides, message", [
    (["train_mask=random:0.1", "weight_decay=0.01"], "weight_decay"),
    (["train_mask=random:0.1", "lora_r=8"], "lora_r"),
    (["train_mask=random:abc"], "not a number"),
    (["train_mask=random:1.5"], "outside"),
    (["train_mask=/nonexistent/mask.safetensors"], "does not exist"),
])
def test_train_mask_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, ["data=x.jsonl", *overrides])
    assert err.value.fix
