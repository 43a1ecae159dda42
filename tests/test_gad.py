"""GAD on a tiny model: both stages run, diagnostics are logged, resume mid-stage is exact, freezing works."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdistill.config import load_config
from opdistill.methods import train

from test_engine import assert_same_weights, wait_for

DIAGNOSTICS = {"d_loss", "d_acc", "teacher_score", "student_score", "reward_mean", "reward_std", "response_length",
               "kl", "clipped", "entropy", "g_loss", "truncated"}


def gad_overrides(model: Path, data: Path, out: Path, **extra) -> list[str]:
    values = {"method": "gad", "student": str(model), "data": f"{data}[:16]", "out_dir": str(out), "lr": "1e-3", "d_lr": "1e-3",
              "precision": "fp32", "max_response_tokens": 8, "seed": 1, "batch_size": 4, "micro_batch_size": 4, "n_samples": 2,
              "warmup_steps": 2, "d_only_steps": 1, "max_steps": 2, "checkpoint_every": 1, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"stage"' in line]


def test_gad_runs_warmup_then_adversarial_with_diagnostics(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "gad"
    summary = train(load_config(None, gad_overrides(tiny_model, selfinstruct, out)))
    assert summary["steps"] == 4
    lines = metric_lines(out)
    assert [line["stage"] for line in lines] == [0, 0, 1, 1]
    assert "g_ce_loss" not in lines[0] and "g_ce_loss" in lines[1], "discriminator alone for d_only_steps"
    assert DIAGNOSTICS <= set(lines[2]) and DIAGNOSTICS <= set(lines[3])
    assert lines[0]["d_loss"] == pytest.approx(0.6931, abs=1e-3), "a fresh zero head scores 0: BT loss log 2"
    assert 0 <= lines[3]["d_acc"] <= 1 and lines[3]["kl"] >= 0
    assert (out / "reference" / "config.json").is_file() and (out / "student" / "config.json").is_file()


def disc_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model_1.safetensors"))


def test_freeze_discriminator_after_warmup(tiny_model, selfinstruct, tmp_path):
    out = tmp_path / "frozen"
    train(load_config(None, gad_overrides(tiny_model, selfinstruct, out, freeze_discriminator="true", keep_checkpoints=4)))
    after_warmup, final = out / "checkpoints" / "step-000002", out / "checkpoints" / "step-000004"
    a, b = disc_weights(after_warmup), disc_weights(final)
    assert all(torch.equal(a[k], b[k]) for k in a), "a frozen discriminator does not change in the adversarial stage"
    first = disc_weights(out / "checkpoints" / "step-000001")
    assert not all(torch.equal(first[k], a[k]) for k in a), "it does train during warm-up"


def test_kill_9_mid_adversarial_stage_then_resume_is_exact(tiny_model, selfinstruct, tmp_path):
    straight = tmp_path / "straight"
    cmd = lambda out: [sys.executable, "-m", "opdistill", "train", *gad_overrides(tiny_model, selfinstruct, out, max_steps=4)]  # noqa: E731
    subprocess.run(cmd(straight), check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(killed / "checkpoints" / "step-000003" / "trainer_state.json", proc, seconds=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "student").exists()
    resumed = subprocess.run(cmd(killed), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(straight, killed)
    final = sorted((killed / "checkpoints").glob("step-*"))[-1]
    reference = sorted((straight / "checkpoints").glob("step-*"))[-1]
    a, b = disc_weights(final), disc_weights(reference)
    assert all(torch.equal(a[k], b[k]) for k in a), "the discriminator resumes exactly too"


def test_gad_config_defaults_and_checks():
    from opdistill.methods.gad import GADConfig
    from opdistill.errors import ConfigError

    config = load_config(None, ["data=x.jsonl"], method="gad")
    assert isinstance(config, GADConfig)
    assert (config.n_samples, config.batch_size, config.lr, config.d_lr, config.max_grad_norm, config.temperature,
            config.clip_ratio, config.kl_coef) == (8, 256, 1e-6, 1e-6, 0.2, 0.8, 0.2, 0.001), "the paper's defaults"
    assert load_config(None, ["data=x.jsonl", "batch_size=2", "micro_batch_size=16"], method="gad").micro_batch_size == 16
    for bad in (["n_samples=1"], ["temperature=0"], ["warmup_steps=-2"], ["clip_ratio=0"]):
        with pytest.raises(ConfigError):
            load_config(None, ["data=x.jsonl", *bad], method="gad")


def test_a_discriminator_learns_to_separate_two_toy_text_distributions(tiny_model):
    """Teacher texts use one word set, student texts another: BT training drives pairwise accuracy on fresh
    samples to ~1."""
    import random

    from opdistill.data import Example, collate, render_prompt
    from opdistill.discriminator import load_discriminator
    from opdistill.models import load_tokenizer
    from opdistill.objectives.preference import bradley_terry, pairwise_accuracy

    tokenizer = load_tokenizer(str(tiny_model))
    rng = random.Random(0)
    prompt = render_prompt(tokenizer, [{"role": "user", "content": "Say something"}])
    french, english = "le la les de des une est pour avec dans".split(), "the a of and to is for with in that".split()

    def examples(words: list[str], count: int) -> list[Example]:
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(count)]
        return [Example(prompt, tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

    torch.manual_seed(0)
    disc = load_discriminator(str(tiny_model))
    optimizer = torch.optim.AdamW(disc.parameters(), lr=3e-3)

    def scores(batch: list[Example]) -> torch.Tensor:
        collated = collate(batch, tokenizer.pad_token_id)
        return disc(collated["input_ids"], collated["attention_mask"])

    for _ in range(40):
        teacher, student = scores(examples(french, 8)), scores(examples(english, 16)).view(8, 2)
        loss = bradley_terry(teacher, student)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = pairwise_accuracy(scores(examples(french, 32)), scores(examples(english, 64)).view(32, 2)).item()
    assert loss.item() < 0.2 and accuracy > 0.95


def test_an_adversarial_step_moves_the_generator_towards_higher_discriminator_scores(tiny_model, selfinstruct, tmp_path):
    """Spy on one real adversarial step (frozen, pre-trained discriminator): afterwards the samples with higher
    advantage are more likely under the student and those with lower advantage less, Σ A_i Δ log π(y_i) > 0."""
    from opdistill.data import collate
    from opdistill.engine import Engine
    from opdistill.methods import load_student
    from opdistill.methods.gad import GAD
    from opdistill.models import load_tokenizer
    from opdistill.objectives.policy import group_advantages
    from opdistill.rollout import token_logprobs

    config = load_config(None, gad_overrides(tiny_model, selfinstruct, tmp_path / "spy", warmup_steps=3, d_only_steps=3, max_steps=1,
                                             freeze_discriminator="true", n_samples=4, lr="5e-3", kl_coef=0, checkpoint_every=0))
    tokenizer = load_tokenizer(config.student)
    method = GAD(config, tokenizer)
    engine = Engine(config, load_student(config), tokenizer, method.total_steps)
    seen: dict[str, object] = {}
    sample, update, adversarial = method.sample, method.discriminator_update, method.adversarial_step

    def spy_sample(*args, **kwargs):
        seen["rollouts"] = sample(*args, **kwargs)
        return seen["rollouts"]

    def spy_update(*args, **kwargs):
        metrics, rewards = update(*args, **kwargs)
        seen["rewards"] = rewards
        return metrics, rewards

    def spy_adversarial(engine_, step):
        seen["before"] = {k: v.detach().clone() for k, v in engine_.model.state_dict().items()}
        return adversarial(engine_, step)

    method.sample, method.discriminator_update, method.adversarial_step = spy_sample, spy_update, spy_adversarial
    engine.fit(method)

    batch = collate(seen["rollouts"].examples, tokenizer.pad_token_id)
    mask = batch["loss_mask"][:, 1:].float()

    def mean_logprob() -> torch.Tensor:
        with torch.no_grad():
            return (token_logprobs(engine.model, batch, config.temperature) * mask).sum(1) / mask.sum(1)

    after = mean_logprob()
    engine.model.load_state_dict(seen["before"])
    before = mean_logprob()
    advantages = group_advantages(seen["rewards"]).view(-1)
    assert advantages.abs().sum() > 0, "the pre-trained discriminator gives a signal"
    assert (advantages * (after - before)).sum() > 0


def test_cross_tokenizer_gad_from_smollm2_text_into_a_tiny_student(tiny_model, tmp_path):
    """Teacher text from SmolLM2-135M (49,152-token vocabulary) trains a student with a 384-token BPE: GAD only
    reads the teacher's text, so it runs with no shared tokenizer."""
    from opdistill.models import load_tokenizer
    from opdistill.teachers.collect import CollectOptions, collect

    data = tmp_path / "smollm2.jsonl"
    summary = collect(CollectOptions(prompts="builtin:train[:8]", out=str(data), teacher_model="smollm2-135m-instruct",
                                     system="Always respond in French.", max_tokens=12, temperature=0.7, progress=False))
    assert summary.stored == 8
    teacher_vocab, student_vocab = len(load_tokenizer("smollm2-135m-instruct")), len(load_tokenizer(str(tiny_model)))
    assert teacher_vocab != student_vocab
    out = tmp_path / "gad"
    overrides = gad_overrides(tiny_model, data, out)
    overrides = [o for o in overrides if not o.startswith("data=")] + [f"data={data}"]
    summary = train(load_config(None, overrides))
    assert summary["steps"] == 4 and (out / "student" / "config.json").is_file()
    assert [line["stage"] for line in metric_lines(out)] == [0, 0, 1, 1]


@pytest.mark.parametrize("policy_loss", ["ppo_clip", "drpo"])
def test_several_ppo_epochs_per_rollout_batch_make_the_trust_region_act(policy_loss, tiny_model, selfinstruct, tmp_path):
    """With ppo_epochs 3 the later epochs move the policy away from the behaviour policy, so PPO clips (or DRPO's
    weight crosses its boundary) on some tokens; the lr schedule and the step count still advance per rollout batch."""
    out = tmp_path / policy_loss
    summary = train(load_config(None, gad_overrides(tiny_model, selfinstruct, out, policy_loss=policy_loss, ppo_epochs=3, lr="2e-2",
                                                    drpo_delta="0.02", clip_ratio="0.05", lr_schedule="linear", max_steps=3,
                                                    checkpoint_every=0)))
    assert summary["steps"] == 5
    adversarial = [line for line in metric_lines(out) if line["stage"] == 1]
    assert len(adversarial) == 3 and all(torch.isfinite(torch.tensor(line["g_loss"])) for line in adversarial)
    assert max(line["clipped"] for line in adversarial) > 0, f"{policy_loss} never acted over 3 epochs per batch"
    lrs = [line["lr"] for line in adversarial]
    assert lrs[0] > lrs[1] > lrs[2], "the linear schedule steps once per rollout batch, not once per epoch"


def test_one_ppo_clip_epoch_never_clips(tiny_model, selfinstruct, tmp_path):
    """One epoch: the update's own detached log-probs are the old ones (ratio 1), as documented."""
    out = tmp_path / "one"
    train(load_config(None, gad_overrides(tiny_model, selfinstruct, out, clip_ratio="0.01", checkpoint_every=0)))
    assert all(line["clipped"] == 0 for line in metric_lines(out) if line["stage"] == 1)


def test_clamped_k3_has_zero_gradient_past_its_saturation_and_the_exact_one_before():
    """Float64: k3(r) = e^r − r − 1 reaches the clamp of 10 at r = ℓ_ref − ℓ_θ ≈ 2.6109 (and ≈ −11.0), as its docstring says:
    past those points the gradient is exactly 0, just inside them it is the unclamped one, ∂k3/∂ℓ_θ = 1 − e^r."""
    import math

    from opdistill.objectives.policy import K3_SATURATES_ABOVE, K3_SATURATES_BELOW, kl_k3

    for edge in (K3_SATURATES_ABOVE, K3_SATURATES_BELOW):
        assert math.exp(edge) - edge - 1 == pytest.approx(10.0, abs=1e-9)
    assert 2.5 < K3_SATURATES_ABOVE < 2.7
    ratios = torch.tensor([K3_SATURATES_BELOW - 1e-3, K3_SATURATES_BELOW + 1e-3, -1.0, 0.5, 2.0, 2.6, K3_SATURATES_ABOVE + 1e-3, 3.0, 5.0,
                           19.0, 25.0], dtype=torch.float64)
    ref = torch.full_like(ratios, -1.0)
    logprobs = (ref - ratios).requires_grad_(True)
    kl_k3(logprobs, ref).sum().backward()
    inside = (ratios > K3_SATURATES_BELOW) & (ratios < K3_SATURATES_ABOVE)
    assert inside.tolist() == [False, True, True, True, True, True, False, False, False, False, False]
    torch.testing.assert_close(logprobs.grad[inside], 1.0 - ratios[inside].exp())
    assert (logprobs.grad[inside] != 0).all() and (logprobs.grad[~inside] == 0).all()
    torch.testing.assert_close(kl_k3(ref - ratios, ref)[~inside], torch.full_like(ratios[~inside], 10.0))  # a constant penalty


def test_the_progress_bar_of_an_adversarial_step_shows_reward_kl_and_clip_share_not_g_loss(tiny_model, selfinstruct, tmp_path,
                                                                                         monkeypatch, capsys):
    """What the engine puts beside the bar is each of `progress_metrics` that a step returned (engine.py). g_loss is not
    among them: at ratio 1 the advantages sum to 0 per group, so its value says little about the step (methods/gad.py)."""
    from tqdm import tqdm

    from opdistill import engine

    postfixes: list[str] = []  # the bar's own postfix text after each step, as tqdm formats and prints it

    class RecordingBar(tqdm):  # the engine's real bar; only what it was told to show is also kept here
        def set_postfix(self, *args, **kwargs) -> None:  # type: ignore[override]
            super().set_postfix(*args, **kwargs)
            postfixes.append(self.postfix)

    monkeypatch.delenv("TQDM_DISABLE", raising=False)  # tqdm reads it: a bar switched off from outside shows nothing
    monkeypatch.setattr(engine, "tqdm", RecordingBar)
    out = tmp_path / "bar"
    capsys.readouterr()
    train(load_config(None, gad_overrides(tiny_model, selfinstruct, out, warmup_steps=1, d_only_steps=1, max_steps=2, checkpoint_every=0)))
    printed = capsys.readouterr().err
    lines = metric_lines(out)
    assert [line["stage"] for line in lines] == [0, 1, 1] and len(postfixes) == len(lines)  # warm-up, then 2 adversarial
    shown = [dict(item.split("=", 1) for item in postfix.split(", ")) for postfix in postfixes]
    for bar, line in zip(shown[1:], lines[1:]):  # the adversarial steps
        assert list(bar) == ["d_loss", "d_acc", "reward_mean", "kl", "clipped"], bar  # progress_metrics' order
        assert bar == {k: f"{line[k]:.4f}" for k in bar}, (bar, line)  # the step's own numbers, not stale ones
    assert "g_loss" in lines[1] and "g_loss" not in shown[1]  # returned by the step, yet not beside the bar
    assert list(shown[0]) == ["d_loss", "d_acc"]  # the discriminator-only warm-up has no reward to show
    assert shown[1]["reward_mean"] != shown[2]["reward_mean"]  # a reading that changes with the run
    # What reached the terminal: the closed bar's final line ends with the last step's postfix (other bars,
    # e.g. saving the model, print after it; which intermediate lines tqdm drew depends on its refresh interval).
    drawn = [segment.strip() for segment in printed.split("\r") if segment.startswith("train gad")]
    assert drawn and drawn[-1].endswith(f", {postfixes[-1]}]") and not any("g_loss" in line for line in drawn), printed[-1000:]
