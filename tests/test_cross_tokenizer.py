"""OPD with a teacher of another tokenizer (cross_tokenizer): the same student with the same tokenizer as today's
per-token estimators, training from a local teacher and from `opdistill serve` (the same student, to rounding), the
pre-flight check's alignment table, and one clear error for a pair that cannot be aligned."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import build_tiny_model
from opdistill.check import preflight
from opdistill.config import load_config
from opdistill.errors import OpdistillError
from opdistill.methods import train
from opdistill.models import load_model, load_tokenizer
from opdistill.serve import ServeOptions, make_server

KEY_ENV = "OPD_CROSS_TOKENIZER_TEST_KEY"


@pytest.fixture(scope="module")
def served(other_teacher: Path) -> Iterator[str]:
    os.environ[KEY_ENV] = "sk-cross"
    server = make_server(ServeOptions(model=str(other_teacher), port=0, precision="fp32", api_key_env=KEY_ENV, model_name="other"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def data(path: Path, count: int = 8) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Tell me fact number {i} about the sea, café and naïve ideas."}) + "\n"
                            for i in range(count)), encoding="utf-8")
    return path


def overrides(student: Path, records: Path, out: Path, *extra: str) -> list[str]:
    return ["method=opd", f"student={student}", f"data={records}", f"out_dir={out}", "max_steps=2", "batch_size=4",
            "micro_batch_size=2", "max_response_tokens=12", "precision=fp32", "lr=1e-3", "seed=3", "temperature=1.0", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_model(str(path)).state_dict()


def test_different_vocabularies_really_differ(tiny_model, other_teacher):
    a, b = load_tokenizer(str(tiny_model)), load_tokenizer(str(other_teacher))
    assert len(a) != len(b) and a("a naïve café", add_special_tokens=False)["input_ids"] != b("a naïve café", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("estimator", ["reward", "reward_to_go"])
def test_with_the_same_tokenizer_cross_tokenizer_trains_exactly_todays_student(tiny_model, tmp_path, estimator):
    teacher = build_tiny_model(tmp_path / "teacher", seed=9)  # the student's tokenizer, other weights
    records = data(tmp_path / "d.jsonl")
    common = (f"teacher={teacher}", f"divergence={estimator}")
    train(load_config(None, overrides(tiny_model, records, tmp_path / "token", *common)))
    train(load_config(None, overrides(tiny_model, records, tmp_path / "span", *common, "cross_tokenizer=true")))
    token, span = weights(tmp_path / "token" / "student"), weights(tmp_path / "span" / "student")
    assert any(not torch.equal(token[n], weights(tiny_model)[n]) for n in token)
    assert all(torch.equal(token[n], span[n]) for n in token)  # one-token spans: the very same losses and gradients


def test_a_teacher_of_another_tokenizer_trains_locally_and_served_to_the_same_student(tiny_model, other_teacher, served, tmp_path):
    records = data(tmp_path / "d.jsonl")
    common = ("divergence=reward_to_go", "cross_tokenizer=true")
    train(load_config(None, overrides(tiny_model, records, tmp_path / "local", f"teacher={other_teacher}", *common)))
    with pytest.raises(OpdistillError, match="different vocabulary"):  # without cross_tokenizer the pair is refused as before
        train(load_config(None, overrides(tiny_model, records, tmp_path / "refused", f"teacher={other_teacher}", "divergence=reward_to_go")))
    train(load_config(None, overrides(tiny_model, records, tmp_path / "remote", f"teacher_url={served}", "teacher_model=other",
                                      f"teacher_api_key_env={KEY_ENV}", f"teacher_tokenizer={other_teacher}", *common)))
    local, remote = weights(tmp_path / "local" / "student"), weights(tmp_path / "remote" / "student")
    assert any(not torch.equal(local[n], weights(tiny_model)[n]) for n in local)
    for name in local:
        torch.testing.assert_close(remote[name], local[name], rtol=0, atol=1e-5)
    logged = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "align_shared_boundaries" in row]
    assert len(steps) == 2 and all(0.5 < row["align_shared_boundaries"] <= 1.0 and row["align_mean_teacher_tokens"] >= 1.0 for row in steps)


def test_check_prints_the_alignment_table(tiny_model, other_teacher, tmp_path):
    config = load_config(None, overrides(tiny_model, data(tmp_path / "d.jsonl"), tmp_path / "c", f"teacher={other_teacher}",
                                         "divergence=reward", "cross_tokenizer=true"))
    report = preflight(config, load_tokenizer(str(tiny_model)))
    text = "\n".join(report.lines())
    assert not report.problems, text
    for expected in ("tokenizer", "another vocabulary", "of the student's token boundaries are shared", "end token",
                     "a response cut by the horizon gets no end span", "chat template"):
        assert expected in text


def test_a_full_vocabulary_divergence_is_refused_with_cross_tokenizer(tiny_model, other_teacher, tmp_path):
    with pytest.raises(OpdistillError, match="use divergence: reward or reward_to_go"):
        load_config(None, overrides(tiny_model, data(tmp_path / "d.jsonl"), tmp_path / "c", f"teacher={other_teacher}",
                                    "divergence=rkl", "cross_tokenizer=true"))


def test_a_pair_that_cannot_be_aligned_gets_one_error_with_its_fix(tiny_model, tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A word-level tokenizer that lower-cases and strips accents: it cannot give back the student's text.
    vocab = {"[UNK]": 0, "<|im_end|>": 1, "<|im_start|>": 2}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    lossy = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", eos_token="<|im_end|>", pad_token="<|im_end|>",
                                    bos_token="<|im_start|>")
    lossy.chat_template = load_tokenizer(str(tiny_model)).chat_template
    lossy.save_pretrained(tmp_path / "lossy")
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=3, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "lossy")
    config = load_config(None, overrides(tiny_model, data(tmp_path / "d.jsonl"), tmp_path / "c", f"teacher={tiny_model}",
                                         "divergence=reward", "cross_tokenizer=true"))
    from opdistill.check import CheckReport, check_alignment
    from opdistill.data import load_records

    report = CheckReport()
    check_alignment(report, "teacher", str(tmp_path / "lossy"), config, load_tokenizer(str(tiny_model)), load_records(str(tmp_path / "d.jsonl")))
    assert len(report.problems) == 1 and "cannot be aligned" in report.problems[0].message
    assert "gad" in report.problems[0].fix


def test_a_local_and_a_served_teacher_together_train_with_a_sampled_estimator(tiny_model, other_teacher, served, tmp_path):
    """Records that name a local teacher and records that name a served one in the same steps: every teacher's answer
    is reduced to its token log-probs before they meet (the local one's full logits and the served one's top-k used to
    be concatenated, and failed)."""
    records = tmp_path / "mixed.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"Tell me fact {i} about the sea.", "teacher": "near" if i % 2 else "far"}) + "\n"
                               for i in range(8)), encoding="utf-8")
    out = tmp_path / "mixed"
    train(load_config(None, overrides(tiny_model, records, out, "divergence=reward_to_go", "cross_tokenizer=true",
                                      f"teachers={{near: {other_teacher}, far: '{served}#other'}}", f"teacher_tokenizers={{far: {other_teacher}}}",
                                      f"teacher_api_key_env={KEY_ENV}")))
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"kl"' in line]
    assert len(steps) == 2 and all(row["kl"] == row["kl"] and row["teacher_cache_rows"] > 0 for row in steps)
    assert any(not torch.equal(p, q) for p, q in zip(weights(out / "student").values(), weights(tiny_model).values()))
